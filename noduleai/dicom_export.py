"""Detection results as DICOM objects that PACS, viewers and Slicer's DICOM module load beside the CT.

With highdicom (pydicom underneath), one set per case, each object referencing the source study,
series, frame of reference and (when the image grid is the source's own) SOP instances:

- ``sr.dcm``: Comprehensive 3D SR, TID 1500 measurement report, one volumetric finding (TID 1411)
  per candidate: its centre as a SCOORD3D point in the frame of reference, probability, diameter and
  rank, the model as algorithm identification, and the reviewer's decision when one is given;
- ``seg.dcm``: binary segmentation, one segment per candidate (a sphere of the estimated diameter,
  the same voxels as ``<case>_regions.nrrd``), tracking UIDs shared with the SR findings;
- ``heatmap_pmap.dcm``: parametric map (float32) of the Grad-CAM heatmap, the same values as
  ``<case>_heatmap.nrrd``. A parametric map rather than a fractional SEG: the heatmap is a relevance
  value, not the probability that a voxel belongs to a segment (a fractional SEG's meaning), and a
  float parametric map with a real-world value map keeps it exact where a fractional SEG stores 8 bits.

Every object says "Research use, not for diagnosis" in its series description and its content.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from noduleai import DISCLAIMER, __version__
from noduleai.dicom_series import DicomSource
from noduleai.regions import candidate_regions

DICOM_NAMES = {"sr": "sr.dcm", "seg": "seg.dcm", "pmap": "heatmap_pmap.dcm"}
SERIES_NUMBERS = {"sr": 9901, "seg": 9902, "pmap": 9903}
RESEARCH = "research use, not for diagnosis"
# Concepts with no standard code: a private coding scheme (the "99" prefix is DICOM's private range).
PRIVATE_SCHEME = "99NODULEAI"
RANK = hd.sr.CodedConcept("RANK", PRIVATE_SCHEME, "Candidate rank")
REVIEW = hd.sr.CodedConcept("REVIEW", PRIVATE_SCHEME, "Reviewer decision")
REVIEW_VALUES = {"accepted": hd.sr.CodedConcept("ACCEPTED", PRIVATE_SCHEME, "Accepted by reviewer"),
                 "rejected": hd.sr.CodedConcept("REJECTED", PRIVATE_SCHEME, "Rejected by reviewer"),
                 "unreviewed": hd.sr.CodedConcept("UNREVIEWED", PRIVATE_SCHEME, "Not reviewed")}
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
CT_CHEST = hd.sr.CodedConcept("24627-2", "LN", "CT Chest")
THORAX = hd.sr.CodedConcept("51185008", "SCT", "Thorax")
GRADCAM = hd.sr.CodedConcept("GRADCAM", PRIVATE_SCHEME, "Grad-CAM relevance")


def _source_headers(source: DicomSource) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in source.files]


def _geometry(ct: sitk.Image) -> dict[str, Any]:
    """Explicit plane geometry of the CT grid, for objects on a grid that is not the source slices'."""
    direction = np.asarray(ct.GetDirection()).reshape(3, 3)
    sx, sy, sz = ct.GetSpacing()
    return {
        "pixel_measures": hd.PixelMeasuresSequence(pixel_spacing=(sy, sx), slice_thickness=sz,
                                                   spacing_between_slices=sz),
        "plane_orientation": hd.PlaneOrientationSequence(
            coordinate_system="PATIENT", image_orientation=[*direction[:, 0], *direction[:, 1]]),
        "plane_positions": [hd.PlanePositionSequence(coordinate_system="PATIENT",
                                                     image_position=ct.TransformIndexToPhysicalPoint((0, 0, k)))
                            for k in range(ct.GetSize()[2])],
    }


def _check_grid(ct: sitk.Image, source: DicomSource, headers: Sequence[pydicom.Dataset]) -> None:
    """Frames follow the source images one to one only when the grid is theirs: make sure it is."""
    if source.resampled or len(headers) != ct.GetSize()[2] or any("NumberOfFrames" in h for h in headers):
        return
    for k, header in enumerate(headers):
        expected = ct.TransformIndexToPhysicalPoint((0, 0, k))
        if not np.allclose([float(v) for v in header.ImagePositionPatient], expected, atol=1e-2):
            raise ValueError(f"{header.SOPInstanceUID}: source slice {k} is not at the CT grid's position "
                             f"{expected}; the CT passed is not the source series' grid")


def _frames_in_volume_order(ds: pydicom.Dataset, ct: sitk.Image) -> None:
    """Store the frames of a single-valued multi-frame image in the CT grid's slice order.

    highdicom sorts frames along its own normal convention (for an axial CT: head first), which is valid
    DICOM; dcmqi's paramap2itkimage (QuantitativeReporting) stacks frames in stored order from the lowest
    position along row x column, so it needs ascending order to put the heatmap on the right slices.
    """
    normal = np.asarray(ct.GetDirection()).reshape(3, 3)[:, 2]
    groups = ds.PerFrameFunctionalGroupsSequence
    depth = [float(np.dot([float(v) for v in g.PlanePositionSequence[0].ImagePositionPatient], normal))
             for g in groups]
    order = np.argsort(depth, kind="stable")
    if np.array_equal(order, np.arange(len(order))):
        return
    keyword = next(k for k in ("FloatPixelData", "DoubleFloatPixelData", "PixelData") if k in ds)
    dtype = {"FloatPixelData": np.float32, "DoubleFloatPixelData": np.float64}.get(
        keyword, np.uint16 if ds.BitsAllocated == 16 else np.uint8)
    frames = np.frombuffer(getattr(ds, keyword), dtype).reshape(len(groups), -1)
    setattr(ds, keyword, frames[order].tobytes())
    ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence([groups[i] for i in order])


def _common(model: Mapping[str, Any], kind: str, title: str) -> dict[str, Any]:
    return {"series_instance_uid": generate_uid(), "series_number": SERIES_NUMBERS[kind],
            "sop_instance_uid": generate_uid(), "instance_number": 1, "manufacturer": "NoduleAI",
            "series_description": f"NoduleAI {title} - {RESEARCH}"[:64]}


CREATOR = {"content_creator_name": "NoduleAI^Research"}  # a device, in the person-name slot dcmqi expects


def _equipment(model: Mapping[str, Any]) -> dict[str, Any]:
    return {"manufacturer_model_name": str(model.get("name") or "NoduleAI model")[:64],
            "software_versions": f"noduleai {__version__}", "device_serial_number": "none"}


def _model_version(model: Mapping[str, Any]) -> str:
    return f"{model.get('file') or model.get('name')} (engine {model.get('engine_version') or __version__})"[:64]


def write_dicom_results(out_dir: str | os.PathLike, candidates: Sequence[Any], heatmap: sitk.Image,
                        ct: sitk.Image, source: DicomSource, model: Mapping[str, Any],
                        regions: sitk.Image | None = None,
                        review: Mapping[int, Mapping[str, str]] | None = None) -> dict[str, Path]:
    """Write the SR, SEG (when there are candidates) and parametric map of one case into ``out_dir``.

    ``ct`` is the image detection ran on (the grid of ``heatmap``); ``source`` the DICOM series it was
    read from (:attr:`noduleai.io.LoadedCT.dicom`); ``model`` the detector's description (name, file,
    engine version, CAM method); ``review`` maps a candidate's rank to ``{"review": "accepted" |
    "rejected" | "unreviewed", "note": ...}`` (NoduleDetect's review rows). Returns paths by kind.
    The caller makes the set atomic (see :func:`noduleai.report.write_detection`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    headers = _source_headers(source)
    _check_grid(ct, source, headers)
    # Frames carry explicit positions on the CT grid; where the grid is the source's, highdicom
    # matches each frame to its source image by position (per-frame references).
    geometry = _geometry(ct)
    regions = regions if regions is not None else candidate_regions(ct, candidates)
    tracking = {c.rank: generate_uid() for c in candidates}
    algorithm = hd.AlgorithmIdentificationSequence(name=str(model.get("name") or "NoduleAI")[:64],
                                                   family=codes.cid7162.ArtificialIntelligence,
                                                   version=_model_version(model))
    paths: dict[str, Path] = {}

    if candidates:
        segments = [hd.seg.SegmentDescription(
            segment_number=c.rank, segment_label=f"Candidate {c.rank} P={c.probability:.2f}",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Nodule, algorithm_type="AUTOMATIC",
            algorithm_identification=algorithm, tracking_uid=tracking[c.rank],
            tracking_id=f"NoduleAI candidate {c.rank}", anatomic_regions=[codes.SCT.Lung])
            for c in sorted(candidates, key=lambda c: c.rank)]
        seg = hd.seg.Segmentation(
            source_images=headers, pixel_array=sitk.GetArrayFromImage(regions), segmentation_type="BINARY",
            segment_descriptions=segments, content_description=f"{DISCLAIMER} Candidate spheres"[:64],
            content_label="NODULEAI_CAND", **CREATOR, **_common(model, "seg", "candidates SEG"), **_equipment(model),
            **geometry)
        paths["seg"] = out / DICOM_NAMES["seg"]
        seg.save_as(paths["seg"])

    values = sitk.GetArrayFromImage(sitk.Cast(heatmap, sitk.sitkFloat32))
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="GRADCAM", lut_explanation=f"{model.get('cam_method', 'Grad-CAM')} relevance "
                                             f"({model.get('cam_layer', '')}), 0..1"[:64],
        unit=NO_UNITS, value_range=(float(min(0.0, values.min())), float(max(1.0, values.max()))),
        slope=1.0, intercept=0.0, quantity_definition=GRADCAM)
    pmap = hd.pm.ParametricMap(
        source_images=headers, pixel_array=values, contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_description=f"{DISCLAIMER} Grad-CAM heatmap"[:64], content_label="NODULEAI_GRADCAM", **CREATOR,
        **_common(model, "pmap", "Grad-CAM map"), **_equipment(model), **geometry)
    # Frame Anatomy (thorax, unpaired): dcmqi's paramap2itkimage, behind QuantitativeReporting, needs it.
    anatomy = pydicom.Dataset()
    anatomy.AnatomicRegionSequence = [THORAX]
    anatomy.FrameLaterality = "U"
    pmap.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [anatomy]
    _frames_in_volume_order(pmap, ct)
    paths["pmap"] = out / DICOM_NAMES["pmap"]
    pmap.save_as(paths["pmap"])

    sr = _structured_report(candidates, source, headers, model, tracking, review)
    paths["sr"] = out / DICOM_NAMES["sr"]
    sr.save_as(paths["sr"])
    return paths


def _structured_report(candidates: Sequence[Any], source: DicomSource, headers: Sequence[pydicom.Dataset],
                       model: Mapping[str, Any], tracking: Mapping[int, str],
                       review: Mapping[int, Mapping[str, str]] | None) -> hd.sr.Comprehensive3DSR:
    algorithm = hd.sr.AlgorithmIdentification(name=str(model.get("name") or "NoduleAI")[:64],
                                              version=_model_version(model))
    groups = []
    for c in sorted(candidates, key=lambda c: c.rank):
        # A diameter of 0 means the detector did not estimate one: no measurement rather than "0 mm".
        measurements = [
            hd.sr.Measurement(name=codes.SCT.Diameter, value=float(c.diameter_mm), unit=codes.UCUM.Millimeter,
                              algorithm_id=algorithm)] if c.diameter_mm > 0 else []
        measurements += [
            hd.sr.Measurement(name=codes.DCM.Probability, value=float(c.probability), unit=NO_UNITS,
                              algorithm_id=algorithm),
            hd.sr.Measurement(name=RANK, value=int(c.rank), unit=NO_UNITS, algorithm_id=algorithm),
        ]
        evaluations = None
        mark = (review or {}).get(c.rank)
        if mark and mark.get("review") in REVIEW_VALUES:
            evaluations = [hd.sr.QualitativeEvaluation(name=REVIEW, value=REVIEW_VALUES[mark["review"]])]
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking[c.rank], identifier=f"NoduleAI candidate "
                                                                                           f"{c.rank}"),
            referenced_volume_surface=hd.sr.VolumeSurface(
                graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                graphic_data=np.asarray([c.position_lps], float),
                frame_of_reference_uid=source.frame_of_reference_uid,
                source_series=hd.sr.SourceSeriesForSegmentation(source.series_uid)),
            finding_type=codes.SCT.Nodule, finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
            algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=evaluations))
    observer = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="NoduleAI", manufacturer_name="NoduleAI",
            model_name=str(model.get("name") or "NoduleAI model")[:64])))
    report = hd.sr.MeasurementReport(observation_context=observer, procedure_reported=CT_CHEST,
                                     imaging_measurements=groups)
    # The disclaimer as content: a comment on the report's root container, read by any SR viewer.
    report[0].ContentSequence.append(hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=f"{DISCLAIMER} Candidates of NoduleAI for review; not findings.",
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return hd.sr.Comprehensive3DSR(
        evidence=headers, content=report[0], is_complete=True, **_common(model, "sr", "candidates SR"))
