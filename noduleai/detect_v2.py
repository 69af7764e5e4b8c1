"""Two-stage detection (v2): the candidate network proposes, the 3D ResNet decides and explains.

1. The shared preprocessing on the candidate grid, the candidate network over the whole lung region
   (sliding windows, Gaussian blending), its components as proposals with a size.
2. The shared preprocessing on the classifier grid; each proposal's patch scored by the ResNet, the
   logit difference calibrated by the validation-fitted temperature and bias (:mod:`noduleai.calibration`).
3. Grad-CAM (or Grad-CAM++) of the listed candidates, each blended with a Tukey window into one map on
   the CT's own grid.
The result has the v1 :class:`noduleai.detect.DetectionResult` type, so every writer and the Slicer
module take it unchanged.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from noduleai import __version__
from noduleai.calibration import calibrated
from noduleai.cam import blended_candidate_cams, cam_to_ct
from noduleai.candidate_net import (
    PROPOSAL_LIMIT,
    CandidateNetConfig,
    candidate_net_from_payload,
    probability_map,
    proposals_from_map,
    size_fraction,
)
from noduleai.checkpoint import FORMAT_VERSION as MODEL_FORMAT_VERSION
from noduleai.checkpoint import MODEL_FORMAT, CheckpointError, ModelInfo, model_from_payload, safe_load
from noduleai.detect import (
    Candidate,
    DetectionCancelled,
    DetectionResult,
    Detector,
    ProgressCallback,
    _candidate,
    describe_model,
)
from noduleai.files import atomic_path
from noduleai.geometry import array_index_to_lps, image_from_array, lps_to_array_index, resample_like
from noduleai.models import ResNet3D, pick_device
from noduleai.patches import extract_patch
from noduleai.preprocess import PreprocessConfig, PreprocessedCT, lung_mask, preprocess_ct, same_lung_region

# The candidate map as written and shown: values under 1 % are background (proposals start at 5 %). Without
# the floor the map's faint noise made the written NRRD incompressible: LIDC-IDRI-0001, 46 MB in 0.74 s;
# with it 4.8 MB in 0.11 s (measured on this machine).
MAP_FLOOR = 0.01
DETECTOR_FORMAT = "noduleai-detector"  # one file: candidate network + classifier + calibration
DETECTOR_FORMAT_VERSION = 1


@dataclass
class ScoredProposals:
    """One CT through both networks: proposals (LPS, candidate score, diameter), their voxel centres on the
    classifier grid, the classifier's logit differences, that grid's preprocessing, the candidate map."""

    proposals: list[tuple[tuple[float, float, float], float, float]]
    centres: list[np.ndarray]
    z: np.ndarray
    pre: PreprocessedCT  # on the classifier grid
    candidate_map: sitk.Image
    lung_found: bool
    timings: dict[str, float]


class TwoStageDetector:
    """A candidate network and a calibrated patch classifier, ready to run on CT images in HU."""

    def __init__(self, candidate_net: torch.nn.Module, candidate_config: CandidateNetConfig,
                 candidate_preprocess: PreprocessConfig, classifier: ResNet3D, info: ModelInfo,
                 temperature: float = 1.0, device: str | torch.device = "auto", max_candidates: int = 20,
                 min_probability: float = 0.0, cam_method: str | None = None, cam_layer: str | None = None,
                 source: str = "", bias: float = 0.0, candidate_weight: float = 0.0,
                 operating_threshold: float | None = None, proposal_limit: int = PROPOSAL_LIMIT):
        self.source = source
        self.device = pick_device(device) if isinstance(device, str) else device
        self.candidate_net = candidate_net.to(self.device).eval()
        self.candidate_config = candidate_config
        self.candidate_preprocess = candidate_preprocess
        self.classifier = classifier.to(self.device).eval()
        self.info = info
        self.temperature = float(temperature)
        # P = sigmoid(z / T + w * logit(candidate score) + b), fitted on validation (noduleai.calibration)
        self.bias = float(bias)
        self.candidate_weight = float(candidate_weight)
        # The working point chosen on validation (see recipe_v2); None for files written before it existed.
        self.operating_threshold = operating_threshold
        self.max_candidates = max_candidates
        self.proposal_limit = proposal_limit  # peaks of the candidate map the classifier scores
        self.min_probability = min_probability
        self.cam_method = cam_method or info.cam_method
        self.cam_layer = cam_layer or info.cam_layer
        self._progress: ProgressCallback | None = None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "auto", **options) -> TwoStageDetector:
        """A detector file written by :func:`save_detector` (weights only)."""
        return cls.from_payload(safe_load(path, {DETECTOR_FORMAT: DETECTOR_FORMAT_VERSION}), path, device, **options)

    @classmethod
    def from_payload(cls, payload: dict[str, Any], path: str | os.PathLike, device: str = "auto",
                     **options) -> TwoStageDetector:
        try:
            net, config, preprocess = candidate_net_from_payload(payload["candidate"], path, "cpu")
            classifier, info = model_from_payload(payload["classifier"], path)
            temperature = float(payload["temperature"])
        except KeyError as err:
            raise CheckpointError(path, f"detector file without its {err} part") from err
        threshold = payload.get("operating_threshold")
        return cls(net, config, preprocess, classifier, info, temperature, device, source=str(path),
                   bias=float(payload.get("bias", 0.0)), candidate_weight=float(payload.get("candidate_weight", 0.0)),
                   operating_threshold=None if threshold is None else float(threshold), **options)

    def describe(self) -> dict[str, Any]:
        return describe_model(self) | {
            "task": "two-stage", "candidate_network": f"BasicUNet {list(self.candidate_config.features)}",
            "temperature": self.temperature, "bias": self.bias, "candidate_weight": self.candidate_weight,
            "operating_threshold": self.operating_threshold}

    def _report(self, fraction: float) -> None:
        if self._progress is not None and self._progress(fraction):
            raise DetectionCancelled("detection cancelled")

    def propose(self, ct: sitk.Image, mask: sitk.Image | None = None) -> tuple[
            list[tuple[tuple[float, float, float], float, float]], sitk.Image, bool]:
        """Proposals (LPS, candidate score, diameter), best first; the candidate map on its grid; lungs found.
        ``mask``: this CT's lung region, when already computed (see :func:`preprocess_ct`)."""
        pre = preprocess_ct(ct, self.candidate_preprocess, mask)
        self._report(0.1)
        prob = probability_map(self.candidate_net, pre.array, self.candidate_config)
        spacing = np.asarray(pre.image.GetSpacing()[::-1])
        found = proposals_from_map(prob, pre.mask_array, spacing, limit=self.proposal_limit,
                                   edge=size_fraction(self.candidate_config))
        shown = np.where(prob >= MAP_FLOOR, prob, 0.0).astype(np.float32)
        return ([(array_index_to_lps(pre.image, p.zyx), p.score, p.diameter_mm) for p in found],
                image_from_array(shown, pre.image), pre.lung_found)

    def logit_differences(self, volume: np.ndarray, centres: list) -> np.ndarray:
        """Classifier logit(nodule) - logit(other) for patches at ``centres`` (voxel z, y, x)."""
        size = self.info.input_size[0]
        out = []
        with torch.no_grad():
            for i in range(0, len(centres), 32):
                x = np.stack([extract_patch(volume, c, size) for c in centres[i:i + 32]])[:, None]
                logits = self.classifier(torch.from_numpy(x).to(self.device)).cpu().numpy()
                out.append(logits[:, 1] - logits[:, 0])
        return np.concatenate(out) if out else np.zeros(0)

    def scored_proposals(self, ct: sitk.Image) -> ScoredProposals:
        """Both stages without the explanation: proposals, their classifier logit differences, the
        classifier-grid volume. One lung region serves both grids when both stages define it alike
        (~1/3 of preprocessing's time)."""
        t0 = time.perf_counter()
        shared = same_lung_region(self.candidate_preprocess, self.info.preprocess_config)
        mask = lung_mask(sitk.Cast(ct, sitk.sitkFloat32), self.candidate_preprocess) if shared else None
        timings = {"lung_region": time.perf_counter() - t0}
        proposals, candidate_map, lung_found = self.propose(ct, mask)
        timings["candidates"] = time.perf_counter() - t0 - timings["lung_region"]
        self._report(0.8)
        t = time.perf_counter()
        pre = preprocess_ct(ct, self.info.preprocess_config, mask)
        centres = [np.asarray(lps_to_array_index(pre.image, p)) for p, _s, _d in proposals]
        z = self.logit_differences(pre.array, centres)
        timings["classifier"] = time.perf_counter() - t
        return ScoredProposals(proposals, centres, z, pre, candidate_map, lung_found, timings)

    def probabilities(self, scored: ScoredProposals, fused: bool = True) -> np.ndarray:
        """Calibrated P(nodule) of each proposal; ``fused=False``: the classifier's evidence alone (the
        candidate weight dropped; for measuring what the fusion adds)."""
        return calibrated(scored.z, self.temperature, self.bias, [s for _p, s, _d in scored.proposals],
                          self.candidate_weight if fused else 0.0)

    def ranked(self, scored: ScoredProposals, probs: np.ndarray) -> list[int]:
        """Proposal indices best first, one per lesion: a proposal that the hit rule places inside a
        better-ranked one (or that holds it) is the same lesion seen twice (a 32 mm nodule was listed three
        times), so it is dropped; then ``min_probability`` and ``max_candidates``."""
        from noduleai.evaluate import hits

        kept: list[int] = []
        for i in np.argsort(-probs, kind="stable"):
            if probs[i] < self.min_probability:
                break
            p, _s, d = scored.proposals[i]
            if any(hits(p, scored.proposals[k][0], scored.proposals[k][2]) or hits(scored.proposals[k][0], p, d)
                   for k in kept):
                continue
            kept.append(int(i))
            if len(kept) == self.max_candidates:
                break
        return kept

    def listed(self, scored: ScoredProposals) -> tuple[list[Candidate], list[int], np.ndarray]:
        """The candidates a reader is shown (ranked, one per lesion), the proposal index of each, and every
        proposal's probability: :meth:`detect` without the explanation."""
        probs = self.probabilities(scored)
        kept = self.ranked(scored, probs)
        return ([_candidate(rank, scored.proposals[i][0], float(probs[i]), scored.proposals[i][2])
                 for rank, i in enumerate(kept, 1)], kept, probs)

    def detect(self, ct: sitk.Image, progress: ProgressCallback | None = None) -> DetectionResult:
        """Detect on a CT in HU; ``progress(fraction)`` returning True cancels (nothing is left behind)."""
        self._progress = progress
        try:  # the callback belongs to this run only (scored_proposals reports too, also when called alone)
            return self._detect(ct)
        finally:
            self._progress = None

    def _detect(self, ct: sitk.Image) -> DetectionResult:
        t0 = time.perf_counter()
        self._report(0.0)
        scored = self.scored_proposals(ct)
        candidates, kept, probs = self.listed(scored)
        timings = dict(scored.timings)
        self._report(0.9)
        t = time.perf_counter()
        cam_volume = blended_candidate_cams(self.classifier, scored.pre.array, [scored.centres[i] for i in kept],
                                            [float(probs[i]) for i in kept], self.info.input_size[0],
                                            self.cam_layer, self.cam_method, self.device)
        heatmap = cam_to_ct(cam_volume, scored.pre.image, ct)
        timings["grad_cam"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        self._report(1.0)
        return DetectionResult(max([c.probability for c in candidates], default=0.0), candidates, heatmap,
                               resample_like(scored.candidate_map, ct, linear=True), scored.lung_found,
                               self.describe(), timings)


def save_detector(path: str | os.PathLike, detector: TwoStageDetector) -> None:
    """Write both networks, their settings and the calibration into one file, atomically (weights and plain
    data only, so that it loads with ``weights_only=True``). The classifier's ``info`` carries the name,
    metrics and training data of the whole detector."""
    def weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in net.state_dict().items()}

    payload = {"format": DETECTOR_FORMAT, "format_version": DETECTOR_FORMAT_VERSION, "engine_version": __version__,
               "temperature": detector.temperature, "bias": detector.bias,
               "candidate_weight": detector.candidate_weight, "operating_threshold": detector.operating_threshold,
               "candidate": {"config": detector.candidate_config.to_dict(),
                             "preprocess": detector.candidate_preprocess.to_dict(),
                             "state_dict": weights(detector.candidate_net)},
               "classifier": {"info": detector.info.to_dict(), "state_dict": weights(detector.classifier)}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_detector(path: str | os.PathLike, device: str = "auto", **options) -> Detector | TwoStageDetector:
    """Any detector file: a two-stage detector (v2) or a v1 patch/scan model, chosen by the file's format.
    ``options`` are the detector's settings (``cam_method``, ``cam_layer``, ``max_candidates``,
    ``min_probability``); ``stride_mm`` only applies to v1 and is ignored for v2, which has no dense scan."""
    payload = safe_load(path, {DETECTOR_FORMAT: DETECTOR_FORMAT_VERSION, MODEL_FORMAT: MODEL_FORMAT_VERSION})
    if payload["format"] == MODEL_FORMAT:
        return Detector.from_payload(payload, path, device, **options)
    options.pop("stride_mm", None)
    return TwoStageDetector.from_payload(payload, path, device, **options)
