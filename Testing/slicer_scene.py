"""A real MRML scene from slicer-core, set up as Slicer's application would (without the GUI)."""

from __future__ import annotations

import os

import slicer
import vtk
from NoduleDetectLib.scene import plain_python_scene


def new_scene() -> slicer.vtkMRMLScene:
    """The batch's scene (application, colour, volumes, markups and subject-hierarchy logics) with the
    default colour nodes and the three slice views (Red, Yellow, Green); ``slicer.mrmlScene`` points at it."""
    scene = plain_python_scene()
    app, logics = scene._noduleai_keep
    logics["Colors"].AddDefaultColorNodes()
    slice_logics = []
    for view in ("Red", "Yellow", "Green"):
        slice_logic = slicer.vtkMRMLSliceLogic()
        slice_logic.SetMRMLScene(scene)
        slice_logic.SetMRMLApplicationLogic(app)
        slice_logic.AddSliceNode(view)
        slice_logics.append(slice_logic)
    scene._keep = (app, logics, slice_logics)  # keep the logics alive as long as the scene
    return scene


def load_volume(scene: slicer.vtkMRMLScene, path: str, name: str) -> slicer.vtkMRMLScalarVolumeNode:
    """Read a NRRD or NIfTI file, or a DICOM series folder, through Slicer's volumes logic.

    For DICOM the files are passed in slice-position order (as Slicer's DICOM plugin does): the archetype
    reader alone takes file-name order, which for LIDC-IDRI-0001 is not the order along z.
    """
    import SimpleITK as sitk

    volumes = scene._keep[1]["Volumes"]
    files = vtk.vtkStringArray()
    if os.path.isdir(path):
        ordered = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path))
        for name_ in ordered:
            files.InsertNextValue(name_)
        path = ordered[0]
    node = volumes.AddArchetypeVolume(str(path), name, 0, files)
    if node is None:
        raise OSError(f"{path}: Slicer's volumes logic could not read it")
    return node


def read_mrb(path: str, cache_dir: str) -> slicer.vtkMRMLScene:
    """A new scene, with the logics of :func:`new_scene` (markups need theirs to read their files) and the
    IO managers Slicer's application would provide, read from a ``.mrb`` bundle."""
    previous = slicer.mrmlScene
    scene = new_scene()
    slicer.mrmlScene = previous
    cache = slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(str(cache_dir))
    scene.SetCacheManager(cache)
    data_io = slicer.vtkDataIOManager()
    scene.SetDataIOManager(data_io)
    io_logic = slicer.vtkDataIOManagerLogic()
    io_logic.SetMRMLScene(scene)
    io_logic.SetAndObserveDataIOManager(data_io)
    remote = slicer.vtkMRMLRemoteIOLogic()
    remote.SetMRMLScene(scene)
    remote.AddDataIOToScene()
    if not scene.ReadFromMRB(str(path)):
        raise OSError(f"{path}: could not read the scene bundle")
    scene._keep = (*scene._keep, cache, data_io, io_logic, remote)
    return scene
