"""A classical baseline detector, measured the same way as the network (see :mod:`noduleai.recipe`).

Compact tissue blobs in the lung mask (the detector's own candidate generator: local maxima of the
inscribed-sphere radius), scored by that radius: thicker blobs first. No learning; vessels are cut by
a morphological opening only. Its numbers say how much of the network's score is more than "find round
dense things in the lung".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from noduleai.candidates import blob_centres, inscribed_radius
from noduleai.detect import Candidate, DetectionResult
from noduleai.geometry import lps_to_ras
from noduleai.preprocess import PreprocessConfig, preprocess_ct

HALF_SCORE_RADIUS_MM = 5.0  # score r / (r + 5): a 10 mm blob scores 0.5


@dataclass
class BaselineInfo:
    name: str = "classical-blob-baseline"


class BlobBaseline:
    """Detect like :class:`noduleai.detect.Detector` (same result type) with no model."""

    def __init__(self, preprocess: PreprocessConfig, max_candidates: int = 20):
        self.preprocess = preprocess
        self.max_candidates = max_candidates
        self.info = BaselineInfo()

    def describe(self) -> dict:
        return {"name": self.info.name, "file": None, "arch": "inscribed-sphere blob detector",
                "score": f"r / (r + {HALF_SCORE_RADIUS_MM} mm)"}

    def detect(self, ct: sitk.Image) -> DetectionResult:
        pre = preprocess_ct(ct, self.preprocess)
        spacing = np.asarray(pre.image.GetSpacing()[::-1])
        radius = inscribed_radius(pre.array, pre.mask_array, spacing)
        candidates = []
        for zyx in blob_centres(radius, limit=self.max_candidates):
            r = float(radius[tuple(zyx)])
            lps = tuple(float(v) for v in pre.index_to_lps(zyx))
            candidates.append(Candidate(len(candidates) + 1, lps, lps_to_ras(lps), r / (r + HALF_SCORE_RADIUS_MM),
                                        2 * r))
        evidence = sitk.GetImageFromArray((radius / max(float(radius.max()), 1e-6)).astype(np.float32))
        evidence.CopyInformation(pre.image)
        heatmap = sitk.Resample(evidence, ct, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        return DetectionResult(max((c.probability for c in candidates), default=0.0), candidates, heatmap, None,
                               pre.lung_found, self.describe())
