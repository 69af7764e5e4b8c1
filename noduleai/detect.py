"""Detection: preprocess, score, explain (Grad-CAM), and list candidates in physical coordinates.

Patch models scan the lung densely (fully convolutional, see ``ResNet3D.dense_logits``), then every
local maximum is re-centred on its tissue blob and re-scored exactly as in training. Scan models give
one probability per scan and candidates at the Grad-CAM peaks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from noduleai import DISCLAIMER, __version__
from noduleai.cam import cam_to_ct, grad_cam
from noduleai.checkpoint import ModelInfo, load_model
from noduleai.geometry import image_from_array, lps_to_ras, resample_like
from noduleai.models import ResNet3D, pick_device
from noduleai.patches import extract_patch, paste_patch_max
from noduleai.preprocess import PreprocessedCT, preprocess_ct

BLOB_THRESHOLD = 0.3  # normalised intensity ~ -580 HU: solid and most ground-glass tissue


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

    def report(self, case_id: str, threshold: float = 0.5) -> dict[str, Any]:
        return {
            "case": case_id,
            "disclaimer": DISCLAIMER,
            "engine_version": __version__,
            "model": self.model,
            "scan_probability": self.scan_probability,
            "decision_threshold": threshold,
            "decision": "nodule suspected" if self.scan_probability >= threshold else "no nodule found",
            "n_candidates": len(self.candidates),
            "candidates": [c.to_dict() for c in self.candidates],
            "coordinate_systems": {"position_lps": "DICOM/ITK patient LPS, millimetres",
                                   "position_ras": "Slicer RAS, millimetres"},
            "lung_found": self.lung_found,
            "timings_s": self.timings_s,
        }


class Detector:
    """A loaded model ready to run on CT images (SimpleITK, in HU)."""

    def __init__(self, model: ResNet3D, info: ModelInfo, device: str | torch.device = "auto",
                 cam_method: str = "gradcam", cam_layer: str | None = None, min_probability: float = 0.1,
                 max_candidates: int = 20, source: str = ""):
        self.device = pick_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.info = info
        self.cam_method = cam_method
        self.cam_layer = cam_layer or info.cam_layer
        self.min_probability = min_probability
        self.max_candidates = max_candidates
        self.source = source

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "auto", **kwargs) -> Detector:
        model, info = load_model(path, "cpu")
        return cls(model, info, device, source=str(path), **kwargs)

    def describe(self) -> dict[str, Any]:
        return {"name": self.info.name, "file": Path(self.source).name if self.source else None,
                "arch": self.info.arch, "width": self.info.width, "task": self.info.task,
                "engine_version": self.info.engine_version, "cam_method": self.cam_method,
                "cam_layer": self.cam_layer, "device": str(self.device)}

    def detect(self, ct: sitk.Image, progress=None) -> DetectionResult:
        """Run detection on a CT in HU (validated by :func:`noduleai.io.read_ct`)."""
        t0 = time.perf_counter()
        pre = preprocess_ct(ct, self.info.preprocess_config)
        timings = {"preprocess": time.perf_counter() - t0}
        if self.info.task == "patch":
            result = self._detect_patch(ct, pre, timings)
        else:
            result = self._detect_scan(ct, pre, timings)
        timings["total"] = time.perf_counter() - t0
        return result

    # -- patch models -------------------------------------------------------------------------------
    def probability_grid(self, volume: np.ndarray, slab: int = 8) -> np.ndarray:
        """P(nodule) for the patch centred at every ``stride``-th voxel (z, y, x) of ``volume``."""
        size, stride = self.info.input_size[0], self.model.total_stride
        halo = 2 * stride  # context beyond each patch so slab borders do not change the result
        counts = [int(np.ceil(n / stride)) for n in volume.shape]
        before = size // 2 + halo
        after = [c * stride - n + size // 2 + halo + stride for c, n in zip(counts, volume.shape)]
        padded = np.pad(volume.astype(np.float32), [(before, a) for a in after])
        out = np.zeros(counts, np.float32)
        with torch.no_grad():
            for a in range(0, counts[0], slab):
                b = min(a + slab, counts[0])
                chunk = padded[a * stride: (b - 1) * stride + size + 2 * halo]
                logits = self.model.dense_logits(torch.from_numpy(chunk)[None, None].to(self.device), size)
                prob = torch.softmax(logits, 1)[0, 1].cpu().numpy()
                k = halo // stride
                out[a:b] = prob[k:k + b - a, k:k + counts[1], k:k + counts[2]]
        return out

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
        stride = self.model.total_stride
        grid = self.probability_grid(volume)
        grid *= mask[::stride, ::stride, ::stride][tuple(slice(0, n) for n in grid.shape)]
        timings["dense_scan"] = time.perf_counter() - t
        t = time.perf_counter()
        spacing = np.asarray(pre.image.GetSpacing()[::-1])
        # Proposals: peaks of the dense map, plus compact tissue blobs. The dense map sees context
        # beyond the patch that training never saw, so it proposes; exact patch scoring decides.
        peaks = (grid == ndimage.maximum_filter(grid, size=3)) & (grid >= self.min_probability / 2)
        order = np.argsort(-grid[peaks])[: 4 * self.max_candidates]
        proposals = [q * stride for q in np.argwhere(peaks)[order]] + blob_proposals(volume, mask, spacing)
        refined = [_blob_centre(volume, p, spacing, self.info.input_size[0]) for p in proposals]
        centres = [c for c, _d in refined]
        probs = self.score_patches(volume, centres)
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
        t = time.perf_counter()
        cam_volume = np.zeros(volume.shape, np.float32)
        size = self.info.input_size[0]
        for c, p, _d in kept:
            patch = torch.from_numpy(extract_patch(volume, c, size))[None, None].to(self.device)
            cam, _ = grad_cam(self.model, patch, self.cam_layer, 1, self.cam_method)
            paste_patch_max(cam_volume, cam[0] * p, c)
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
        peaks = (cam_map == ndimage.maximum_filter(cam_map, size=9)) & (cam_map >= 0.5)
        idx = np.argwhere(peaks)
        idx = idx[np.argsort(-cam_map[peaks])][: self.max_candidates]
        spacing = np.asarray(pre.image.GetSpacing()[::-1])
        candidates = []
        for zyx in idx:
            centre, diameter = _blob_centre(pre.array, zyx, spacing, 32)
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


def blob_proposals(volume: np.ndarray, mask: np.ndarray, spacing: np.ndarray,
                   diameter_range_mm: tuple[float, float] = (3.0, 40.0)) -> list[np.ndarray]:
    """Centroids of compact tissue blobs in the lung (a classical candidate generator).

    Tissue above ``BLOB_THRESHOLD`` inside the lung mask, opened to cut thin vessels, labelled;
    blobs whose volume-equivalent diameter lies in ``diameter_range_mm`` are kept.
    """
    solid = ndimage.binary_opening((volume > BLOB_THRESHOLD) & mask,
                                   structure=ndimage.generate_binary_structure(3, 1))
    labels, n = ndimage.label(solid)
    if n == 0:
        return []
    counts = np.bincount(labels.ravel())[1:]
    diameters = (6 * counts * np.prod(spacing) / np.pi) ** (1 / 3)
    keep = np.flatnonzero((diameters >= diameter_range_mm[0]) & (diameters <= diameter_range_mm[1])) + 1
    if len(keep) == 0:
        return []
    return [np.asarray(c) for c in ndimage.center_of_mass(solid, labels, keep)]


def _blob_centre(volume: np.ndarray, zyx, spacing: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Re-centre on the tissue blob nearest ``zyx`` and estimate its volume-equivalent diameter (mm).

    An opening detaches thin vessels before labelling, so a juxta-vascular nodule keeps its own size.
    Returns the original point and 0 mm when no blob lies within 6 mm.
    """
    zyx = np.asarray(zyx, float)
    patch = extract_patch(volume, zyx, size)
    solid = ndimage.binary_opening(patch > BLOB_THRESHOLD, structure=ndimage.generate_binary_structure(3, 1))
    labels, n = ndimage.label(solid)
    if n == 0:
        return zyx, 0.0
    c = size // 2
    pts = np.argwhere(labels > 0)
    dist = np.linalg.norm((pts - c) * spacing, axis=1)
    nearest = int(np.argmin(dist))
    if dist[nearest] > 6.0:
        return zyx, 0.0
    blob = labels == labels[tuple(pts[nearest])]
    volume_mm3 = float(blob.sum() * np.prod(spacing))
    centre = zyx + np.argwhere(blob).mean(axis=0) - c
    return centre, float((6 * volume_mm3 / np.pi) ** (1 / 3))


def heatmap_image(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    """A float32 heatmap image with the geometry of ``like`` (for callers holding arrays)."""
    return image_from_array(np.asarray(array, np.float32), like)
