"""Thin stand-ins for what slicer-core lacks (qt, ctk, slicer.app, ScriptedLoadableModule, parameterNodeWrapper,
slicer.util.loadUI), so that the module files can be imported and their Widgets built on a real MRML scene.

Each fake does only what the real one does for our panels, with the rule it follows named:
- ``loadUI`` builds widgets of the classes named in the .ui; ``connect`` refuses a signal the class lacks
  (PythonQt would only print to stderr: here it fails loudly), from slicer_panel_rules.SIGNALS.
- ``connectGui`` builds a connector per bound widget first and raises RuntimeError on a pairing that
  Slicer's guiConnectors.py refuses (slicer_panel_rules.CONNECTOR_RULES), like ``_connectParametersToGui``.
- ScriptedLoadableModuleLogic.getParameterNode: a singleton vtkMRMLScriptedModuleNode tagged with the module
  name (Base/Python/slicer/ScriptedLoadableModule.py).
Run in a fresh interpreter (the panel test starts one): it installs modules named qt and ctk.
"""

from __future__ import annotations

import enum
import importlib.abc
import inspect
import pathlib
import sys
import types
import typing
from pathlib import Path

import slicer
import slicer.util
from slicer_panel_rules import CONNECTOR_RULES, Field, UiWidget, binding_errors, read_ui, signals_of


# -- imports that must fail --------------------------------------------------------------------------------
class BlockImports(importlib.abc.MetaPathFinder):
    """Makes packages unimportable (as on a fresh Slicer) and records every attempt."""

    def __init__(self, names: set[str]):
        self.names = set(names)
        self.attempts: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            self.attempts.append(fullname)
            raise ImportError(f"{fullname} is not installed (blocked by the test)")
        return None


# -- qt / ctk ------------------------------------------------------------------------------------------------
class FakeIndex:
    def __init__(self, row: int = -1):
        self._row = row

    def isValid(self) -> bool:
        return self._row >= 0

    def row(self) -> int:
        return self._row


class ReversingProxy:
    """A sorted view: view row r shows source row n-1-r (so a test sees whether rows are mapped)."""

    def __init__(self, view: FakeWidget):
        self.view = view
        self.hiddenNodeIDs: list[str] = []

    def mapToSource(self, index: FakeIndex) -> FakeIndex:
        n = self.view.modelRowCount()
        return FakeIndex(n - 1 - index.row()) if index.isValid() else FakeIndex()


class FakeWidget:
    """A widget of a .ui class: properties are plain attributes; connect() checks the signal exists."""

    def __init__(self, spec: UiWidget):
        self.cls = spec.cls
        self.name = spec.name
        self._properties = dict(spec.properties)
        self.connections: dict[str, list] = {}
        self.enabled = spec.properties.get("enabled", True)
        self.text = spec.properties.get("text", "")
        self.toolTip = ""
        self.value = spec.properties.get("value", 0)
        self.directory = "."
        self.currentPath = ""
        self._table = None
        self._proxy = ReversingProxy(self)
        self._current = FakeIndex()
        self.lines: list[str] = []
        self.maximum = 100

    def property(self, name):
        return self._properties.get(name)

    def connect(self, signal: str, slot) -> None:
        normalised = signal.replace(" ", "").replace("constQModelIndex&", "QModelIndex")
        if normalised not in signals_of(self.cls):
            raise AssertionError(f"{self.name}: {self.cls} has no signal {signal}")
        self.connections.setdefault(normalised, []).append(slot)

    def emit(self, signal: str, *args) -> None:
        """Call the slots as PythonQt does: a slot taking fewer arguments than the signal gets the first ones
        (PythonQtSignalReceiver), so ``connect("clicked(bool)", self.onApply)`` with ``onApply(self)`` works."""
        for slot in self.connections.get(signal, []):
            slot(*args[:_positional_count(slot, len(args))])

    def setMRMLScene(self, scene) -> None:
        self.scene = scene

    # QProgressBar / QPlainTextEdit / QLabel
    def setValue(self, value) -> None:
        self.value = value

    def setMaximum(self, value) -> None:
        self.maximum = value

    def appendPlainText(self, line: str) -> None:
        self.lines.append(line)

    def clear(self) -> None:
        self.lines = []

    def setPixmap(self, pixmap) -> None:
        self.pixmap = pixmap

    # qMRMLTableView / qMRMLNodeComboBox (sortFilterProxyModel() is Q_INVOKABLE on both)
    def setMRMLTableNode(self, node) -> None:
        self._table = node
        self._current = FakeIndex()

    def mrmlTableNode(self):
        return self._table

    def sortFilterProxyModel(self) -> ReversingProxy:
        return self._proxy

    def currentIndex(self) -> FakeIndex:
        return self._current

    def modelRowCount(self) -> int:
        """Rows of qMRMLTableModel: the column-name row first unless used as the header."""
        if self._table is None:
            return 0
        return self._table.GetNumberOfRows() + (0 if self._table.GetUseColumnTitleAsColumnHeader() else 1)

    def clickViewRow(self, row: int) -> None:
        """The user clicks view row ``row``: it becomes current and clicked(QModelIndex) is emitted."""
        self._current = FakeIndex(row)
        self.emit("clicked(QModelIndex)", self._current)


def _positional_count(slot, available: int) -> int:
    try:
        params = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return available
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return available
    return min(available, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params))


class FakeTimer:
    def __init__(self):
        self.active = False
        self.interval = 0
        self.slots = []
        self.cls = "QTimer"

    def setInterval(self, ms: int) -> None:
        self.interval = ms

    def connect(self, signal: str, slot) -> None:
        if signal not in signals_of("QTimer"):
            raise AssertionError(f"QTimer has no signal {signal}")
        self.slots.append(slot)

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def isActive(self) -> bool:
        return self.active

    def fire(self) -> None:
        for slot in self.slots:
            slot()


class FakeLayout:
    def __init__(self):
        self.widgets = []

    def addWidget(self, widget) -> None:
        self.widgets.append(widget)


SETTINGS: dict[str, object] = {}


class FakeSettings:
    def setValue(self, key, value) -> None:
        SETTINGS[key] = value

    def value(self, key, default=None):
        return SETTINGS.get(key, default)


def _make_qt() -> types.ModuleType:
    qt = types.ModuleType("qt")
    qt.QTimer = FakeTimer
    qt.QSettings = FakeSettings
    qt.QPixmap = lambda path: ("pixmap", path)
    qt.QColor = type("QColor", (), {})
    qt.QWidget = FakeWidget
    return qt


# -- slicer.parameterNodeWrapper (validators as in validators.py; the binding check as guiConnectors.py) ----
class Choice:
    def __init__(self, choices):
        self.choices = choices


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


class Minimum:
    def __init__(self, minimum):
        self.minimum = minimum


class Maximum:
    def __init__(self, maximum):
        self.maximum = maximum


class Decimals:
    def __init__(self, value):
        self.value = value


class SingleStep:
    def __init__(self, value):
        self.value = value


def _field_of(name: str, hint) -> Field:
    if typing.get_origin(hint) is typing.Annotated:
        base, *extras = typing.get_args(hint)
    else:
        base, extras = hint, []
    annotations = {}
    for extra in extras:
        if isinstance(extra, Choice):
            annotations["Choice"] = (extra.choices,)
        elif isinstance(extra, WithinRange):
            annotations["WithinRange"] = (extra.minimum, extra.maximum)
        else:
            annotations[type(extra).__name__] = ()
    base_name = base.__name__ if isinstance(base, type) else str(base)
    if isinstance(base, type) and issubclass(base, pathlib.PurePath):
        base_name = "Path"
    return Field(name, base_name, annotations)


def parameterNodeWrapper(cls):
    """Typed access to a vtkMRMLScriptedModuleNode: values as parameters, nodes as node references."""
    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {name: getattr(cls, name) for name in hints if hasattr(cls, name)}

    class Wrapper:
        _hints = hints

        def __init__(self, node):
            object.__setattr__(self, "parameterNode", node)
            object.__setattr__(self, "_guis", {})
            for name, hint in hints.items():  # the real wrapper writes defaults of absent parameters
                base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
                if not _is_node(base) and not node.HasParameter(name):
                    setattr(self, name, defaults.get(name, base() if base is not str else ""))

        def __getattr__(self, name):
            if name not in hints:
                raise AttributeError(name)
            hint = hints[name]
            base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
            if _is_node(base):
                return self.parameterNode.GetNodeReference(name)
            text = self.parameterNode.GetParameter(name)
            if base is bool:
                return text == "True"
            return base(text)

        def __setattr__(self, name, value):
            hint = hints[name]
            base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
            if _is_node(base):
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value else None)
                return
            for extra in typing.get_args(hint)[1:]:  # validators.py: Choice and WithinRange reject bad values
                if isinstance(extra, Choice) and value not in extra.choices:
                    raise ValueError(f"{name}: {value!r} not in {extra.choices}")
                if isinstance(extra, WithinRange) and not extra.minimum <= value <= extra.maximum:
                    raise ValueError(f"{name}: {value!r} outside [{extra.minimum}, {extra.maximum}]")
            self.parameterNode.SetParameter(name, str(value))

        def connectGui(self, gui) -> int:
            bound = {w.property("SlicerParameterName"): w for w in vars(gui).values()
                     if isinstance(w, FakeWidget) and w.property("SlicerParameterName")}
            for param, widget in bound.items():  # every connector first, as _connectParametersToGui
                if param not in hints:
                    raise ValueError(f"Cannot find a param with the given name: {param}")
                fld = _field_of(param, hints[param])
                enums = {fld.base} if isinstance(hints[param], type) and issubclass(hints[param], enum.Enum) else set()
                errors = binding_errors(widget.cls, fld, enums)
                if errors and CONNECTOR_RULES.get(widget.cls, (None, ""))[1] != "bounded-policy":
                    raise RuntimeError(f"Unable to create GUI connector: {errors}")
                if errors:
                    raise AssertionError(f"policy: {errors}")
            tag = len(self._guis) + 1
            self._guis[tag] = bound
            return tag

        def disconnectGui(self, tag) -> None:
            self._guis.pop(tag, None)

        def AddObserver(self, event, callback, priority=0.0):
            return self.parameterNode.AddObserver(event, callback, priority)

        def RemoveObserver(self, tag):
            return self.parameterNode.RemoveObserver(tag)

    Wrapper.__name__ = cls.__name__
    return Wrapper


def _is_node(base) -> bool:
    return isinstance(base, type) and base.__name__.startswith("vtkMRML")


# -- slicer.ScriptedLoadableModule ---------------------------------------------------------------------------
class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class FakeModuleParent:
    def __init__(self):
        self._layout = FakeLayout()
        self.isEntered = True

    def layout(self):
        return self._layout


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__.removesuffix("Widget")
        self.parent = parent or FakeModuleParent()
        self.layout = self.parent.layout()

    def resourcePath(self, filename: str) -> str:
        module = sys.modules[self.moduleName]
        return str(Path(module.__file__).parent / "Resources" / filename)

    def setup(self) -> None:
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__.removesuffix("Logic")

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            slicer.mrmlScene.AddNode(node)
        return node


class ScriptedLoadableModuleTest:
    def delayDisplay(self, message, msec=0):
        pass


# -- slicer.app and the dialogs of slicer.util ----------------------------------------------------------------
class Dialogs:
    """What the panels showed the user."""

    def __init__(self):
        self.errors: list[str] = []
        self.infos: list[str] = []
        self.confirms: list[str] = []
        self.confirm_answer = False
        self.pip: list = []


DIALOGS = Dialogs()


def install(scene_path: str) -> None:
    """Put the fakes where Slicer's modules are, and slicer.util's GUI functions on them."""
    sys.modules["qt"] = _make_qt()
    sys.modules["ctk"] = types.ModuleType("ctk")
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    sys.modules["slicer.ScriptedLoadableModule"] = slm
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    for obj in (parameterNodeWrapper, Choice, WithinRange, Minimum, Maximum, Decimals, SingleStep):
        setattr(pnw, obj.__name__, obj)
    sys.modules["slicer.parameterNodeWrapper"] = pnw
    slicer.app = types.SimpleNamespace(defaultScenePath=scene_path, processEvents=lambda: None,
                                       testingEnabled=lambda: False)

    def load_ui(path):
        widgets = {name: FakeWidget(spec) for name, spec in read_ui(Path(path)).items()}
        top = next(w for w in widgets.values() if w.cls == "qMRMLWidget")
        top.children = widgets
        return top

    def confirm(text, windowTitle=None, **kwargs):
        DIALOGS.confirms.append(text)
        return DIALOGS.confirm_answer

    slicer.util.loadUI = load_ui
    slicer.util.childWidgetVariables = lambda top: types.SimpleNamespace(**top.children)
    slicer.util.errorDisplay = lambda text, **kw: DIALOGS.errors.append(text)
    slicer.util.infoDisplay = lambda text, **kw: DIALOGS.infos.append(text)
    slicer.util.confirmOkCancelDisplay = confirm
    slicer.util.showStatusMessage = lambda text, duration=0: None
    slicer.util.settingsValue = lambda key, default, **kw: SETTINGS.get(key, default)
    slicer.util.pip_install = lambda requirements, **kw: DIALOGS.pip.append(requirements)
