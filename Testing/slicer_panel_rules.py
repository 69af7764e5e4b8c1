"""What the real Slicer application does with a module panel, as small tables read from its source.

The application cannot run here, so the rules its code applies are transcribed (not copied) and checked:

- ``CONNECTOR_RULES``: which parameter types Slicer's parameterNodeWrapper can bind to which widget class,
  from ``Base/Python/slicer/parameterNodeWrapper/guiConnectors.py`` (Slicer commit
  583e9b37d50ead7daf7b783dce465ccaecec8809; the file is identical at tag v5.10.0). ``connectGui`` builds a
  connector for every widget with a ``SlicerParameterName`` before connecting any, and
  ``createGuiConnector`` raises ``RuntimeError`` for an unsupported pairing: one bad field breaks setup().
- ``SIGNALS``: the signals of the widget classes our panels connect to, from the headers (Qt classes as
  documented by Qt 5; CTK commit 868d56c72d2899f0f5595745c7c39765fed80eef ``Libs/Widgets/*.h``; Slicer
  ``Libs/MRML/Widgets/*.h``). PythonQt's ``connect`` to a missing signal only prints to stderr.
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = {"NoduleDetect": REPO / "NoduleDetect", "NoduleTraining": REPO / "NoduleTraining"}

PATH_TYPES = {"Path", "pathlib.Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}
NUMBER = {"float", "int"}

# widget class -> (unannotated types it binds, requirement). Requirements, each a RuntimeError in guiConnectors.py:
#   "choice": QComboBoxToStringableConnector.create needs validators.Choice (or the type is an Enum),
#   "bounded": ctkSliderWidget/qMRMLSliderWidget/QSlider need WithinRange, or Minimum and Maximum,
#   "rangebounds": range widgets need RangeBounds.
# "bounded-policy" (QSpinBox): Slicer accepts an unbounded int but then sets the range to -2^31..2^31-1, so
# 0 epochs or a negative batch size could be entered: our rule, not Slicer's, and named as such.
CONNECTOR_RULES: dict[str, tuple[set[str], str | None]] = {
    "QCheckBox": ({"bool"}, None),
    "ctkCheckBox": ({"bool"}, None),
    "QPushButton": ({"bool"}, None),
    "ctkCheckablePushButton": ({"bool"}, None),
    "QSlider": ({"int"}, "bounded"),
    "QSpinBox": ({"int"}, "bounded-policy"),
    "QDoubleSpinBox": (NUMBER, None),
    "ctkDoubleSpinBox": (NUMBER, None),
    "ctkDoubleSlider": (NUMBER, None),
    "qMRMLSpinBox": (NUMBER, None),
    "ctkSliderWidget": (NUMBER, "bounded"),
    "qMRMLSliderWidget": (NUMBER, "bounded"),
    "QComboBox": ({"int", "float", "str", "bool"}, "choice"),
    "ctkComboBox": ({"int", "float", "str", "bool"}, "choice"),
    "QLineEdit": ({"str"}, None),
    "QLabel": ({"str"}, None),
    "QTextEdit": ({"str"}, None),
    "ctkRangeWidget": ({"FloatRange"}, "rangebounds"),
    "ctkDoubleRangeSlider": ({"FloatRange"}, "rangebounds"),
    "qMRMLRangeWidget": ({"FloatRange"}, "rangebounds"),
    "ctkPathLineEdit": (PATH_TYPES, None),
    "ctkDirectoryButton": (PATH_TYPES, None),
    "qMRMLNodeComboBox": ({"<node>"}, None),  # isNodeOrUnionOfNodes: a vtkMRML*Node class (or a Union of them)
    "ctkColorPickerButton": ({"QColor", "qt.QColor"}, None),
}

# Signals (normalised as QMetaObject does) and each class's parent, for the classes we use.
_QT_SIGNALS: dict[str, set[str]] = {
    "QObject": {"destroyed()", "destroyed(QObject*)", "objectNameChanged(QString)"},
    "QWidget": {"customContextMenuRequested(QPoint)", "windowTitleChanged(QString)", "windowIconChanged(QIcon)"},
    "QAbstractButton": {"clicked()", "clicked(bool)", "pressed()", "released()", "toggled(bool)"},  # qabstractbutton.h
    "QTimer": {"timeout()"},  # qtimer.h
    "QAbstractItemView": {"pressed(QModelIndex)", "clicked(QModelIndex)", "doubleClicked(QModelIndex)",
                          "activated(QModelIndex)", "entered(QModelIndex)", "viewportEntered()",
                          "iconSizeChanged(QSize)"},  # qabstractitemview.h; QTableView adds none
    "QComboBox": {"currentIndexChanged(int)", "currentTextChanged(QString)", "activated(int)",
                  "editTextChanged(QString)", "highlighted(int)"},
    "QLineEdit": {"textChanged(QString)", "textEdited(QString)", "editingFinished()", "returnPressed()",
                  "selectionChanged()", "cursorPositionChanged(int,int)"},
    "QSpinBox": {"valueChanged(int)", "textChanged(QString)"},
    "QAbstractSpinBox": {"editingFinished()"},
    "QCheckBox": {"stateChanged(int)"},
    "QPlainTextEdit": {"textChanged()", "selectionChanged()", "cursorPositionChanged()"},
    "QProgressBar": {"valueChanged(int)"},
    "QLabel": {"linkActivated(QString)", "linkHovered(QString)"},
}
_CTK_SLICER_SIGNALS: dict[str, set[str]] = {
    # CTK Libs/Widgets/ctkSliderWidget.h, ctkPathLineEdit.h, ctkDirectoryButton.h, ctkCollapsibleButton.h,
    # ctkDoubleSpinBox.h
    "ctkSliderWidget": {"valueChanged(double)", "valueIsChanging(double)", "decimalsChanged(int)"},
    "ctkPathLineEdit": {"validInputChanged(bool)", "currentPathChanged(QString)"},
    "ctkDirectoryButton": {"directoryChanged(QString)", "directorySelected(QString)"},
    "ctkCollapsibleButton": {"contentsCollapsed(bool)"},
    "ctkDoubleSpinBox": {"valueChanged(double)", "valueChanged(QString)", "editingFinished()", "decimalsChanged(int)"},
    # Slicer Libs/MRML/Widgets/qMRMLTableView.h (a QTableView: no cellClicked(int,int)), qMRMLNodeComboBox.h,
    # qMRMLWidget.h
    "qMRMLTableView": {"mrmlSceneChanged(vtkMRMLScene*)", "selectionChanged()"},
    "qMRMLNodeComboBox": {"currentNodeChanged(vtkMRMLNode*)", "currentNodeIDChanged(QString)",
                          "nodeActivated(vtkMRMLNode*)", "currentNodeChanged(bool)", "nodeAdded(vtkMRMLNode*)",
                          "nodeAddedByUser(vtkMRMLNode*)", "nodeAboutToBeRemoved(vtkMRMLNode*)",
                          "currentNodeRenamed(QString)", "nodeAboutToBeEdited(vtkMRMLNode*)"},
    "qMRMLWidget": {"mrmlSceneChanged(vtkMRMLScene*)"},
}
PARENT_CLASS = {
    "QWidget": "QObject", "QTimer": "QObject", "QAbstractButton": "QWidget", "QPushButton": "QAbstractButton",
    "QCheckBox": "QAbstractButton", "QAbstractItemView": "QWidget", "QTableView": "QAbstractItemView",
    "qMRMLTableView": "QTableView", "QComboBox": "QWidget", "QLineEdit": "QWidget", "QAbstractSpinBox": "QWidget",
    "QSpinBox": "QAbstractSpinBox", "QPlainTextEdit": "QWidget", "QProgressBar": "QWidget", "QLabel": "QWidget",
    "ctkSliderWidget": "QWidget", "ctkPathLineEdit": "QWidget", "ctkDirectoryButton": "QWidget",
    "ctkCollapsibleButton": "QAbstractButton", "ctkDoubleSpinBox": "QWidget", "qMRMLNodeComboBox": "QWidget",
    "qMRMLWidget": "QWidget",
}


def signals_of(class_name: str) -> set[str]:
    """Every signal of a class, its own and its parents'; KeyError for a class not in the tables."""
    if class_name not in PARENT_CLASS and class_name != "QObject":
        raise KeyError(f"{class_name}: not in the signal tables; add it from its header")
    found: set[str] = set()
    name: str | None = class_name
    while name:
        found |= _QT_SIGNALS.get(name, set()) | _CTK_SLICER_SIGNALS.get(name, set())
        name = PARENT_CLASS.get(name)
    return found


# -- .ui files ------------------------------------------------------------------------------------------------
@dataclass
class UiWidget:
    name: str
    cls: str
    parameter: str | None  # the SlicerParameterName dynamic property
    properties: dict[str, object] = field(default_factory=dict)
    items: list[str] = field(default_factory=list)  # QComboBox items


def _property_value(prop: ET.Element):
    value = prop[0]
    if value.tag == "stringlist":
        return [s.text or "" for s in value]
    if value.tag in ("number",):
        return int(value.text)
    if value.tag == "double":
        return float(value.text)
    if value.tag == "bool":
        return value.text == "true"
    return value.text or ""


def read_ui(path: Path) -> dict[str, UiWidget]:
    """Every named widget of a Qt Designer file (the top-level one included)."""
    widgets = {}
    for element in ET.parse(path).getroot().iter("widget"):
        props = {p.get("name"): _property_value(p) for p in element.findall("property")}
        items = [(i.find("property/string").text or "") for i in element.findall("item")]
        widgets[element.get("name")] = UiWidget(element.get("name"), element.get("class"),
                                                props.get("SlicerParameterName"), props, items)
    return widgets


# -- parameter-node classes, read with ast (no Slicer needed) -----------------------------------------------
@dataclass
class Field:
    name: str
    base: str  # the unannotated type as written: "str", "Path", "slicer.vtkMRMLScalarVolumeNode", ...
    annotations: dict[str, tuple]  # annotation class name -> its positional arguments
    default: object = None
    has_default: bool = False


def _literal(node: ast.AST):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)


def parameter_fields(source: str) -> dict[str, Field]:
    """The fields of the module's ``@parameterNodeWrapper`` class."""
    tree = ast.parse(source)
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        if not any(ast.unparse(d).endswith("parameterNodeWrapper") for d in cls.decorator_list):
            continue
        fields = {}
        for item in cls.body:
            if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
                continue
            ann, extras = item.annotation, {}
            if isinstance(ann, ast.Subscript) and ast.unparse(ann.value).endswith("Annotated"):
                parts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
                ann = parts[0]
                for extra in parts[1:]:
                    if isinstance(extra, ast.Call):
                        extras[ast.unparse(extra.func).split(".")[-1]] = tuple(_literal(a) for a in extra.args)
            default = _literal(item.value) if item.value is not None else None
            fields[item.target.id] = Field(item.target.id, ast.unparse(ann), extras, default, item.value is not None)
        return fields
    raise LookupError("no @parameterNodeWrapper class")


def enum_classes(source: str) -> set[str]:
    """Names of the module's Enum classes (a QComboBox binds those without Choice)."""
    tree = ast.parse(source)
    return {n.name for n in tree.body if isinstance(n, ast.ClassDef)
            and any(ast.unparse(b).split(".")[-1] in ("Enum", "StrEnum", "IntEnum") for b in n.bases)}


def binding_errors(widget_class: str, fld: Field, enums: set[str] = frozenset()) -> list[str]:
    """Why Slicer (or our QSpinBox policy) would refuse binding ``fld`` to a ``widget_class``; [] if fine."""
    if widget_class not in CONNECTOR_RULES:
        return [f"{widget_class}: no GUI connector in guiConnectors.py binds this widget class"]
    accepted, requirement = CONNECTOR_RULES[widget_class]
    base = fld.base.split(".")[-1] if fld.base.startswith(("slicer.", "pathlib.", "qt.")) else fld.base
    errors = []
    if "<node>" in accepted:
        if not base.startswith("vtkMRML"):
            errors.append(f"{widget_class} binds MRML node types, not {fld.base}")
        return errors
    if requirement == "choice" and base in enums:
        return []
    if base not in accepted and fld.base not in accepted:
        errors.append(f"{widget_class} binds {sorted(accepted)}, not {fld.base}")
        return errors
    bounded = "WithinRange" in fld.annotations or {"Minimum", "Maximum"} <= set(fld.annotations)
    if requirement == "choice" and "Choice" not in fld.annotations:
        errors.append(f"{widget_class} bound to {fld.base} needs Annotated[{fld.base}, Choice([...])] or an Enum")
    if requirement in ("bounded", "bounded-policy") and not bounded:
        errors.append(f"{widget_class} bound to {fld.base} needs WithinRange (or Minimum and Maximum)")
    if requirement == "rangebounds" and "RangeBounds" not in fld.annotations:
        errors.append(f"{widget_class} needs a RangeBounds annotation")
    return errors


def value_errors(fld: Field) -> list[str]:
    """A default outside its own Choice or WithinRange (the validators reject it when it is written)."""
    errors = []
    if not fld.has_default:
        return errors
    if "Choice" in fld.annotations and fld.default not in fld.annotations["Choice"][0]:
        errors.append(f"{fld.name}: default {fld.default!r} is not among {fld.annotations['Choice'][0]}")
    if "WithinRange" in fld.annotations:
        low, high = fld.annotations["WithinRange"]
        if not low <= fld.default <= high:
            errors.append(f"{fld.name}: default {fld.default!r} outside [{low}, {high}]")
    return errors


def panel_binding_errors(module_source: str, ui_path: Path) -> list[str]:
    """Every problem connectGui would meet for this module's parameter node and .ui file."""
    fields = parameter_fields(module_source)
    enums = enum_classes(module_source)
    errors = []
    for widget in read_ui(ui_path).values():
        if widget.parameter is None:
            continue
        if widget.parameter not in fields:  # wrapper._checkParamName raises ValueError
            errors.append(f"{widget.name}: SlicerParameterName {widget.parameter!r} is no parameter-node field")
            continue
        fld = fields[widget.parameter]
        errors += [f"{widget.name} ({widget.cls}) <-> {fld.name}: {e}" for e in binding_errors(widget.cls, fld, enums)]
        errors += value_errors(fld)
    return errors


# -- signal connections in the Widget code ------------------------------------------------------------------
@dataclass
class Connection:
    receiver: str  # the expression, e.g. "self.ui.applyButton"
    signal: str
    line: int


def widget_connections(source: str, widget_class_name: str) -> list[Connection]:
    """Every ``X.connect("signal(...)", ...)`` and ``X.signal.connect(...)`` in the Widget class."""
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == widget_class_name)
    found = []
    for node in ast.walk(cls):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"):
            continue
        target = node.func.value
        if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.append(Connection(ast.unparse(target), node.args[0].value.replace(" ", ""), node.lineno))
        elif isinstance(target, ast.Attribute):  # pythonic: widget.signal.connect(slot)
            found.append(Connection(ast.unparse(target.value), target.attr + "(*)", node.lineno))
    return found


def attribute_classes(source: str, widget_class_name: str) -> dict[str, str]:
    """``self.x = qt.QTimer()``-style assignments in the Widget: attribute expression -> Qt class name."""
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == widget_class_name)
    classes = {}
    for node in ast.walk(cls):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            name = ast.unparse(node.value.func)
            if name.startswith(("qt.", "ctk.", "slicer.q")):
                for target in node.targets:
                    classes[ast.unparse(target)] = name.split(".")[-1]
    return classes


def ui_references(source: str, widget_class_name: str) -> set[str]:
    """Names used as ``self.ui.<name>`` in the Widget class."""
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == widget_class_name)
    return {node.attr for node in ast.walk(cls)
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "self.ui"}
