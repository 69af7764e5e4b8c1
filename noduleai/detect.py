"""Detection: preprocess, score, explain (Grad-CAM), and list candidates in physical coordinates.

Patch models scan the lung densely: every grid point (``stride`` mm apart) is scored with exactly the
patch the model was trained on, giving a probability map. Its local maxima and the centres of
compact tissue blobs are then re-centred on the tissue and re-scored. Scan models give one
probability per scan and candidates at the Grad-CAM peaks.

A fully convolutional pass (trunk shared between overlapping patches, 64x less work) was tried and
dropped: a patch classifier learns where its centre is from the zero padding at the patch border,
which the dense pass does not have; on the demo phantoms it scored nodules ~1e-6 where the exact
patch scored 0.75-0.99.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from noduleai import DISCLAIMER, __version__
from noduleai.cam import blended_candidate_cams, cam_to_ct, grad_cam
from noduleai.candidates import TISSUE_THRESHOLD, blob_centres, inscribed_radius
from noduleai.checkpoint import MODEL_FORMAT, ModelInfo, model_from_payload, safe_load
from noduleai.geometry import lps_to_ras, resample_like
from noduleai.models import ResNet3D, pick_device
from noduleai.patches import extract_patch
from noduleai.preprocess import PreprocessedCT, preprocess_ct


class DetectionCancelled(RuntimeError):
    """Raised inside :meth:`Detector.detect` when the progress callback asks to stop."""


ProgressCallback = Callable[[float], "bool | None"]


@dataclass
class Candidate:
    """A nodule candidate. Positions in millimetres, the coordinate system in the name."""

    rank: int
    position_lps: tuple[float, float, float]
    position_ras: tuple[float, float, float]
    probability: float
    diameter_mm: float

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "position_lps": list(self.position_lps),
                "position_ras": list(self.position_ras), "probability": self.probability,
                "diameter_mm": self.diameter_mm}


DEFAULT_DECISION_THRESHOLD = 0.5  # for models that store no operating threshold


@dataclass
class DetectionResult:
    """What one CT yields: candidates, a scan-level probability and maps on the CT's own grid."""

    scan_probability: float
    candidates: list[Candidate]
    heatmap: sitk.Image  # Grad-CAM in [0, 1], same size/spacing/origin/direction as the input CT
    probability_map: sitk.Image | None  # patch models: P(nodule) on the CT grid
    lung_found: bool
    model: dict[str, Any]
    timings_s: dict[str, float] = field(default_factory=dict)

    def decision_threshold(self, requested: float | None = None) -> tuple[float, str]:
        """The threshold on P(nodule) that reports and the Slicer panel decide at, and where it comes from:
        the user's, else the model's operating threshold (chosen on validation, stored in the detector
        file), else 0.5 for models without one."""
        if requested is not None:
            return float(requested), "requested"
        stored = self.model.get("operating_threshold")
        if stored is None:
            return DEFAULT_DECISION_THRESHOLD, "default"
        return float(stored), "model's operating threshold (chosen on validation)"

    def report(self, case_id: str, threshold: float | None = None) -> dict[str, Any]:
        """The JSON report, deciding at :meth:`decision_threshold`."""
        threshold, source = self.decision_threshold(threshold)
        return {
            "case": case_id,
            "disclaimer": DISCLAIMER,
            "engine_version": __version__,
            "model": self.model,
            "scan_probability": self.scan_probability,
            "decision_threshold": threshold,
            "decision_threshold_source": source,
            # No candidate is never a finding, whatever the threshold (a working point may be 0).
            "decision": "nodule suspected" if self.candidates and self.scan_probability >= threshold
            else "no nodule found",
            "n_candidates": len(self.candidates),
            "n_candidates_at_or_above_threshold": sum(c.probability >= threshold for c in self.candidates),
            "candidates": [c.to_dict() for c in self.candidates],
            "coordinate_systems": {"position_lps": "DICOM/ITK patient LPS, millimetres",
                                   "position_ras": "Slicer RAS, millimetres"},
            "lung_found": self.lung_found,
            "timings_s": self.timings_s,
        }


def describe_model(detector) -> dict[str, Any]:
    """What every detector's reports say about it (v1 and v2 add their own keys)."""
    info = detector.info
    return {"name": info.name, "file": Path(detector.source).name if detector.source else None,
            "arch": info.arch, "width": info.width, "engine_version": info.engine_version,
            "cam_method": detector.cam_method, "cam_layer": detector.cam_layer, "device": str(detector.device)}


class Detector:
    """A loaded model ready to run on CT images (SimpleITK, in HU)."""

    def __init__(self, model: ResNet3D, info: ModelInfo, device: str | torch.device = "auto",
                 cam_method: str | None = None, cam_layer: str | None = None, min_probability: float = 0.1,
                 max_candidates: int = 20, stride_mm: float = 8.0, source: str = ""):
        self.device = pick_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.info = info
        self.cam_method = cam_method or info.cam_method
        self.cam_layer = cam_layer or info.cam_layer
        self.min_probability = min_probability
        self.max_candidates = max_candidates
        self.stride_mm = stride_mm
        self._progress: ProgressCallback | None = None
        self.source = source

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "auto", **kwargs) -> Detector:
        return cls.from_payload(safe_load(path, MODEL_FORMAT), path, device, **kwargs)

    @classmethod
    def from_payload(cls, payload: dict[str, Any], path: str | os.PathLike, device: str = "auto",
                     **kwargs) -> Detector:
        """From a model file already read (``path`` names it in errors)."""
        model, info = model_from_payload(payload, path, "cpu")
        return cls(model, info, device, source=str(path), **kwargs)

    def describe(self) -> dict[str, Any]:
        return describe_model(self) | {"task": self.info.task}

    def detect(self, ct: sitk.Image, progress: ProgressCallback | None = None) -> DetectionResult:
        """Run detection on a CT in HU (validated by :func:`noduleai.io.read_ct`).

        ``progress(fraction)`` is called as work advances; returning True cancels the run
        (:class:`DetectionCancelled`), which leaves nothing behind.
        """
        self._progress = progress
        t0 = time.perf_counter()
        self._report(0.0)
        pre = preprocess_ct(ct, self.info.preprocess_config)
        self._report(0.1)
        timings = {"preprocess": time.perf_counter() - t0}
        if self.info.task == "patch":
            result = self._detect_patch(ct, pre, timings)
        else:
            result = self._detect_scan(ct, pre, timings)
        timings["total"] = time.perf_counter() - t0
        self._report(1.0)
        return result

    def _report(self, fraction: float) -> None:
        if self._progress is not None and self._progress(fraction):
            raise DetectionCancelled("detection cancelled")

    # -- patch models -------------------------------------------------------------------------------
    def probability_grid(self, volume: np.ndarray, mask: np.ndarray, stride: int) -> np.ndarray:
        """P(nodule) of the patch centred at every ``stride``-th voxel (z, y, x) inside the lung.

        Grid points whose ``stride``-wide neighbourhood holds no tissue denser than
        ``TISSUE_THRESHOLD`` (pure parenchyma: no nodule can be centred there) are not scored and read 0.
        """
        tissue = ndimage.maximum_filter(volume > TISSUE_THRESHOLD, size=stride)[::stride, ::stride, ::stride]
        inside = mask[::stride, ::stride, ::stride] & tissue
        points = list(np.argwhere(inside) * stride)
        scores, step = [], 256
        for i in range(0, len(points), step):  # in chunks, so progress is reported and cancel is heard
            scores.append(self.score_patches(volume, points[i:i + step]))
            self._report(0.1 + 0.7 * min(1.0, (i + step) / max(len(points), 1)))
        grid = np.zeros(inside.shape, np.float32)
        grid[inside] = np.concatenate(scores) if scores else np.zeros(0, np.float32)
        return grid

    def score_patches(self, volume: np.ndarray, centres: list[np.ndarray], batch: int = 32) -> np.ndarray:
        """Exact P(nodule) of patches centred at ``centres`` (voxel z, y, x), as in training."""
        size = self.info.input_size[0]
        probs = []
        with torch.no_grad():
            for i in range(0, len(centres), batch):
                x = np.stack([extract_patch(volume, c, size) for c in centres[i:i + batch]])[:, None]
                probs.append(torch.softmax(self.model(torch.from_numpy(x).to(self.device)), 1)[:, 1].cpu())
        return torch.cat(probs).numpy() if probs else np.zeros(0)

    def _detect_patch(self, ct: sitk.Image, pre: PreprocessedCT, timings: dict[str, float]) -> DetectionResult:
        t = time.perf_counter()
        volume, mask = pre.array, pre.mask_array
        spacing = np.asarray(pre.image.GetSpacing()[::-1])
        stride = max(1, int(round(self.stride_mm / float(spacing.min()))))
        grid = self.probability_grid(volume, mask, stride)
        timings["dense_scan"] = time.perf_counter() - t
        t = time.perf_counter()
        edt = inscribed_radius(volume, mask, spacing)
        peaks = (grid == ndimage.maximum_filter(grid, size=3)) & (grid >= self.min_probability)
        order = np.argsort(-grid[peaks])[: 4 * self.max_candidates]
        proposals = [q * stride for q in np.argwhere(peaks)[order]] + list(blob_centres(edt).astype(float))
        refined = [_refine(edt, p, spacing) for p in proposals]
        probs = self.score_patches(volume, [c for c, _d in refined])
        kept: list[tuple[np.ndarray, float, float]] = []
        for i in np.argsort(-probs):
            c, d = refined[i]
            if probs[i] < self.min_probability:
                break
            too_close = any(np.linalg.norm((c - k[0]) * spacing) < max(8.0, d / 2, k[2] / 2) for k in kept)
            if not too_close:
                kept.append((c, float(probs[i]), d))
            if len(kept) == self.max_candidates:
                break
        timings["candidates"] = time.perf_counter() - t
        self._report(0.9)
        t = time.perf_counter()
        cam_volume = blended_candidate_cams(self.model, volume, [c for c, _p, _d in kept], [p for _c, p, _d in kept],
                                            self.info.input_size[0], self.cam_layer, self.cam_method, self.device)
        heatmap = cam_to_ct(cam_volume, pre.image, ct)
        probability_map = resample_like(_grid_image(grid, pre.image, stride), ct, linear=True)
        timings["grad_cam"] = time.perf_counter() - t
        candidates = [_candidate(r + 1, pre.index_to_lps(c), p, d) for r, (c, p, d) in enumerate(kept)]
        return DetectionResult(max([c.probability for c in candidates], default=0.0), candidates, heatmap,
                               probability_map, pre.lung_found, self.describe(), timings)

    # -- scan models --------------------------------------------------------------------------------
    def _detect_scan(self, ct: sitk.Image, pre: PreprocessedCT, timings: dict[str, float]) -> DetectionResult:
        t = time.perf_counter()
        x = torch.from_numpy(pre.array)[None, None].to(self.device)
        cam, prob = grad_cam(self.model, x, self.cam_layer, 1, self.cam_method)
        scan_probability = float(prob[0, 1])
        cam_map = cam[0] * pre.mask_array  # attention outside the lungs is not a nodule candidate
        timings["inference_and_cam"] = time.perf_counter() - t
        spacing = np.asarray(pre.image.GetSpacing()[::-1])
        edt = inscribed_radius(pre.array, pre.mask_array, spacing)
        peaks = (cam_map == ndimage.maximum_filter(cam_map, size=9)) & (cam_map >= 0.5)
        idx = np.argwhere(peaks)
        idx = idx[np.argsort(-cam_map[peaks])][: self.max_candidates]
        candidates = []
        for zyx in idx:
            centre, diameter = _refine(edt, zyx, spacing)
            # A scan model scores the scan, not the place: a peak's score is the scan probability
            # weighted by how strongly the network attended there.
            score = scan_probability * float(cam_map[tuple(zyx)])
            candidates.append(_candidate(len(candidates) + 1, pre.index_to_lps(centre), score, diameter))
        return DetectionResult(scan_probability, candidates, cam_to_ct(cam[0], pre.image, ct), None,
                               pre.lung_found, self.describe(), timings)


def _grid_image(grid: np.ndarray, like: sitk.Image, stride: int) -> sitk.Image:
    """The stride grid as an image: its voxel q sits on voxel ``q * stride`` of ``like``."""
    image = sitk.GetImageFromArray(grid.astype(np.float32))
    image.SetOrigin(like.GetOrigin())
    image.SetSpacing(tuple(s * stride for s in like.GetSpacing()))
    image.SetDirection(like.GetDirection())
    return image


def _candidate(rank: int, lps, probability: float, diameter: float) -> Candidate:
    lps = tuple(float(v) for v in lps)
    return Candidate(rank, lps, lps_to_ras(lps), float(probability), float(diameter))


def _refine(edt: np.ndarray, zyx, spacing: np.ndarray, radius_mm: float = 6.0) -> tuple[np.ndarray, float]:
    """Move to the thickest tissue within ``radius_mm`` and estimate the diameter (2x inscribed radius).

    Returns the point unchanged and 0 mm when no tissue lies within reach.
    """
    zyx = np.round(np.asarray(zyx, float)).astype(int)
    reach = np.ceil(radius_mm / spacing).astype(int)
    lo = np.maximum(zyx - reach, 0)
    hi = np.minimum(zyx + reach + 1, edt.shape)
    window = edt[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    if window.size == 0 or window.max() <= 0:
        return zyx.astype(float), 0.0
    offsets = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij"), -1) - zyx
    within = np.linalg.norm(offsets * spacing, axis=-1) <= radius_mm
    best = np.unravel_index(np.argmax(np.where(within, window, 0)), window.shape)
    return (lo + np.asarray(best)).astype(float), float(2 * window[best])
