"""An MRML scene set up as Slicer's application would, for running outside it (slicer-core, plain Python).

Imports nothing but ``slicer``: the batch uses it under plain Python, and the tests build their scenes on it
without importing the engine.
"""

from __future__ import annotations

import slicer


def plain_python_scene() -> slicer.vtkMRMLScene:
    """A scene with the logics Slicer's application would register (volumes, markups, colours, subject
    hierarchy), for running the batch under plain Python with slicer-core; sets ``slicer.mrmlScene``."""
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    logics = {}
    for name, cls in (("Colors", slicer.vtkSlicerColorLogic), ("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("Markups", slicer.vtkSlicerMarkupsLogic),
                      ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic)):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
        logics[name] = logic
    scene._noduleai_keep = (app, logics)  # the logics (by module name) live as long as the scene
    slicer.mrmlScene = scene
    return scene
