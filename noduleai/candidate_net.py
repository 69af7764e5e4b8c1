"""Candidates from a fully convolutional network, trained the way it is used (issue 10, stage 1).

A MONAI ``BasicUNet`` (narrow: CPU budget) segments lesions on the shared preprocessing's grid. It is
trained on crops of the v2 cohorts (``CandidateNetConfig.patch``) with per-voxel targets from their label
maps (real lesions and pasted real crops), or a heat peak at each lesion's centre (``centre_heat``), and
used with ``sliding_window_inference`` and Gaussian blending over the whole lung region: the same network,
the same grid, the same inputs. Candidates are the map's peaks, one per lesion (basins of a watershed
merged by peak dynamics, ``lesion_regions``), with a size from the lesion's region. The v1 generator
(inscribed-sphere blobs) capped sensitivity: 200 thickest blobs, nothing under ~7 mm on LIDC-IDRI-0001.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from noduleai.checkpoint import CheckpointError, safe_load
from noduleai.files import atomic_path
from noduleai.geometry import resample_like
from noduleai.io import read_ct
from noduleai.models import pick_device
from noduleai.preprocess import PreprocessConfig, preprocess_ct

CANDIDATE_FORMAT = "noduleai-candidate-net"
CANDIDATE_FORMAT_VERSION = 1
CANDIDATE_NET_FILE = "candidate_net.pt"  # in a training run's folder
PRIOR = 0.01  # initial P(lesion) of every voxel
CENTRE_LOSS = "centre_focal"  # the loss that trains on centre heat instead of lesion masks


@dataclass
class CandidateNetConfig:
    """Network and training parameters, stored in the checkpoint."""

    features: tuple[int, ...] = (8, 16, 32, 64, 128, 8)
    patch: int = 64
    batch_size: int = 4
    lr: float = 2e-3
    steps: int = 600
    positive_share: float = 0.6  # share of crops centred near a lesion (lesions are a tiny share of voxels)
    seed: int = 2026
    roi: int = 96  # sliding window at inference
    overlap: float = 0.25
    # "dice_ce" or "dice_focal" on the lesion masks, or "centre_focal": a Gaussian at each lesion's centre
    # (CenterNet's penalty-reduced focal loss, each lesion weighing the same whatever its size; see
    # centre_heat). A proposal's size is read from the map at :func:`size_fraction` of its peak.
    loss: str = "dice_ce"
    # Where a positive crop is centred: "per_voxel" (any lesion voxel: an 80 mm mass is drawn ~1000x as
    # often as an 8 mm nodule) or "per_lesion" (a lesion first, uniformly, then one of its voxels).
    # "per_voxel" is the default because checkpoints written before the setting existed were trained so.
    lesion_sampling: str = "per_voxel"
    # Lesions smaller than this are trained as a ball of this diameter at their centre: on the 2 mm grid
    # a 5 mm nodule's label (nearest neighbour from 3 mm slices) is 1-5 voxels. 0: as labelled.
    min_target_diameter_mm: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def size_fraction(config: CandidateNetConfig) -> float:
    """Where a lesion's edge lies on the map, as a share of its peak: half height for a map trained on the
    lesion masks; exp(-2) for centre heat, whose target falls to exp(-2) at the lesion's equivalent radius
    (sigma is half of it). Fold lidc0001's network on its validation cohorts (31 nodules found; no test
    cohort): half height gave sizes a median 2.5x too small (6x for 40 mm masses), within 2x of the
    readers' diameter for 23 %; exp(-2) a median 1.4x too small (3x for masses), within 2x for 74 %."""
    return float(np.exp(-2.0)) if config.loss == "centre_focal" else 0.5


def build_net(config: CandidateNetConfig) -> torch.nn.Module:
    """MONAI's BasicUNet: one input channel (normalised HU), one output (lesion logit)."""
    from monai.networks.nets import BasicUNet

    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=1, features=tuple(config.features))
    # Prior initialisation (RetinaNet, Lin et al. 2017): start at P = 0.01, not 0.5. Adam moves the bias
    # by about the learning rate a step, so from 0 the background took thousands of steps to fall: after
    # 250 steps every voxel still read ~0.2-0.3 and the map ranked nothing (measured here).
    with torch.no_grad():
        net.final_conv.bias.fill_(float(np.log(PRIOR / (1 - PRIOR))))
    return net


@dataclass
class PreparedCase:
    """A case on the preprocessing grid: normalised CT, lung region, lesion target, geometry."""

    case_id: str
    volume: np.ndarray  # float32 (z, y, x) in [0, 1]
    lung: np.ndarray  # bool
    target: np.ndarray  # uint8: lesion label numbers
    reference: sitk.Image  # empty image with the grid's geometry
    heat: np.ndarray | None = None  # float32 centre heat of the lesions, for the "centre_focal" loss only


def prepare_case(image_path: str | os.PathLike, label_path: str | os.PathLike | None, config: PreprocessConfig,
                 cache_dir: str | os.PathLike | None = None, case_id: str | None = None) -> PreparedCase:
    """Preprocess a CT (and resample its label map onto the same grid), cached by file and config."""
    image_path = Path(image_path)
    case_id = case_id or image_path.stem
    key = hashlib.sha256(json.dumps([str(image_path), _stamp(image_path), str(label_path),
                                     _stamp(label_path), config.to_dict()], default=str).encode()).hexdigest()[:16]
    cached = Path(cache_dir) / f"{case_id}-{key}.npz" if cache_dir else None
    if cached is not None and cached.exists():
        data = np.load(cached, allow_pickle=False)
        reference = sitk.Image([int(v) for v in data["size"]], sitk.sitkUInt8)
        reference.SetSpacing(tuple(data["spacing"]))
        reference.SetOrigin(tuple(data["origin"]))
        reference.SetDirection(tuple(data["direction"]))
        return PreparedCase(case_id, data["volume"].astype(np.float32), data["lung"].astype(bool),
                            data["target"], reference)
    pre = preprocess_ct(read_ct(image_path), config)
    if label_path is not None:
        target = sitk.GetArrayFromImage(resample_like(sitk.ReadImage(str(label_path)), pre.image, linear=False))
    else:
        target = np.zeros(pre.array.shape, np.uint8)
    reference = sitk.Image(pre.image.GetSize(), sitk.sitkUInt8)
    reference.CopyInformation(pre.image)
    prepared = PreparedCase(case_id, pre.array, pre.mask_array, target.astype(np.uint8), reference)
    if cached is not None:
        with atomic_path(cached) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, volume=prepared.volume.astype(np.float16), lung=prepared.lung, target=prepared.target,
                     size=np.asarray(reference.GetSize()), spacing=np.asarray(reference.GetSpacing()),
                     origin=np.asarray(reference.GetOrigin()), direction=np.asarray(reference.GetDirection()))
    return prepared


def _stamp(path) -> list | None:
    if path is None:
        return None
    stat = Path(path).stat()
    return [stat.st_size, int(stat.st_mtime)]


# -- training -----------------------------------------------------------------------------------------
def _crop(array: np.ndarray, start: np.ndarray, size: int, fill) -> np.ndarray:
    out = np.full((size,) * 3, fill, array.dtype)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, array.shape)
    if np.all(hi > lo):
        out[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))] = array[
            tuple(slice(a, b) for a, b in zip(lo, hi))]
    return out


def sample_batch(cases: list[PreparedCase], config: CandidateNetConfig, step: int) -> tuple[np.ndarray, np.ndarray]:
    """A training batch for ``step``: crops near lesions and anywhere in the lungs, flipped, with
    noise and thick-slice blur drawn per crop. Depends only on the seed and the step (resumable)."""
    rng = np.random.default_rng([config.seed, step])
    size = config.patch
    xs, ys = [], []
    for _ in range(config.batch_size):
        case = cases[rng.integers(len(cases))]
        lesion = lesion_voxel(case.target, rng, config.lesion_sampling) if rng.random() < config.positive_share \
            else None
        if lesion is not None:
            centre = lesion + rng.integers(-size // 3, size // 3 + 1, 3)
        else:
            lung = np.argwhere(case.lung[::4, ::4, ::4]) * 4
            centre = lung[rng.integers(len(lung))] if len(lung) else np.asarray(case.volume.shape) // 2
        start = np.asarray(centre) - size // 2
        x = _crop(case.volume, start, size, 0.0)
        y = _crop(case.heat, start, size, np.float32(0)) if config.loss == CENTRE_LOSS else \
            (_crop(case.target, start, size, 0) > 0).astype(np.float32)
        for axis in range(3):
            if rng.random() < 0.5:
                x, y = np.flip(x, axis), np.flip(y, axis)
        if rng.random() < 0.3:  # thicker slices than the source: blur along z
            x = ndimage.gaussian_filter1d(x, rng.uniform(0.5, 2.0), axis=0)
        x = x + rng.normal(0, rng.uniform(0, 0.02), x.shape)  # ~0-28 HU of extra noise
        xs.append(np.ascontiguousarray(x, np.float32))
        ys.append(np.ascontiguousarray(y))
    return np.stack(xs)[:, None], np.stack(ys)[:, None]


def lesion_voxel(target: np.ndarray, rng: np.random.Generator, sampling: str) -> np.ndarray | None:
    """A voxel (z, y, x) of a lesion of ``target`` (label numbers), or None where there is none: any lesion
    voxel ("per_voxel"), or a lesion drawn uniformly and then one of its voxels ("per_lesion")."""
    if sampling not in ("per_voxel", "per_lesion"):
        raise ValueError(f"lesion_sampling must be per_voxel or per_lesion, not {sampling!r}")
    voxels = np.argwhere(target)  # full resolution: a 3 mm nodule can fall between every other voxel
    if not len(voxels):
        return None
    if sampling == "per_lesion":
        labels = target[tuple(voxels.T)]
        voxels = voxels[labels == rng.choice(np.unique(labels))]
    return voxels[rng.integers(len(voxels))]


def widened_targets(case: PreparedCase, min_diameter_mm: float) -> PreparedCase:
    """``case`` with every lesion smaller than ``min_diameter_mm`` (volume-equivalent) also labelled as a
    ball of that diameter at its centre (never over another lesion)."""
    if min_diameter_mm <= 0 or not case.target.any():
        return case
    spacing = np.asarray(case.reference.GetSpacing()[::-1], float)
    ball_voxels = np.pi / 6 * min_diameter_mm ** 3 / np.prod(spacing)
    labels = np.unique(case.target[case.target > 0])
    counts = ndimage.sum_labels(np.ones(case.target.shape), case.target, labels)
    small = [int(k) for k, n in zip(labels, counts) if n < ball_voxels]
    if not small:
        return case
    target = case.target.copy()
    reach = np.ceil(min_diameter_mm / 2 / spacing).astype(int)
    for label, centre in zip(small, ndimage.center_of_mass(case.target > 0, case.target, small)):
        centre = np.asarray(centre)
        lo = np.maximum(np.floor(centre).astype(int) - reach, 0)
        hi = np.minimum(np.floor(centre).astype(int) + reach + 2, target.shape)
        grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij"), -1)
        ball = np.linalg.norm((grid - centre) * spacing, axis=-1) <= min_diameter_mm / 2
        box = target[tuple(slice(a, b) for a, b in zip(lo, hi))]
        box[ball & (box == 0)] = label
    return PreparedCase(case.case_id, case.volume, case.lung, target, case.reference)


def centre_heat(case: PreparedCase) -> np.ndarray:
    """The centre-heat target of ``case``: for each lesion a Gaussian at its centre of mass with sigma half
    its volume-equivalent radius (at least one voxel), exactly 1 at the voxel nearest the centre; the
    maximum where lesions overlap."""
    heat = np.zeros(case.target.shape, np.float32)
    labels = [int(k) for k in np.unique(case.target[case.target > 0])]
    if not labels:
        return heat
    spacing = np.asarray(case.reference.GetSpacing()[::-1], float)
    counts = ndimage.sum_labels(np.ones(case.target.shape), case.target, labels)
    for count, centre in zip(counts, ndimage.center_of_mass(case.target > 0, case.target, labels)):
        radius_mm = (3 * count * np.prod(spacing) / (4 * np.pi)) ** (1 / 3)
        sigma = np.maximum(radius_mm / 2 / spacing, 1.0)  # voxels per axis
        centre = np.asarray(centre)
        lo = np.maximum(np.floor(centre - 3 * sigma).astype(int), 0)
        hi = np.minimum(np.ceil(centre + 3 * sigma).astype(int) + 1, heat.shape)
        grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij"), -1)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        heat[box] = np.maximum(heat[box], np.exp(-0.5 * (((grid - centre) / sigma) ** 2).sum(-1)))
        heat[tuple(np.clip(np.round(centre).astype(int), 0, np.asarray(heat.shape) - 1))] = 1.0
    return heat


class CentreFocalLoss(torch.nn.Module):
    """CenterNet's penalty-reduced focal loss (Zhou et al. 2019, eq. 1, alpha 2, beta 4) on logits: the
    peak voxels (target 1) are the positives, every other voxel a negative down-weighted by (1 - target)^4
    near a centre; the sum is divided by the number of peaks, so each lesion weighs the same. MONAI has no
    such loss (its FocalLoss has no penalty reduction), hence ours."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        log_p, log_not_p = torch.nn.functional.logsigmoid(logits), torch.nn.functional.logsigmoid(-logits)
        peak = target >= 1.0
        positive = ((1 - p) ** 2 * log_p)[peak].sum()
        negative = ((1 - target) ** 4 * p ** 2 * log_not_p)[~peak].sum()
        return -(positive + negative) / peak.sum().clamp(min=1)


def train_candidate_net(cases: list[PreparedCase], config: CandidateNetConfig, preprocess: PreprocessConfig,
                        out_dir: str | os.PathLike, device: str = "auto", progress: bool = True,
                        save_every: int = 50, stop: Callable[[int], bool] | None = None) -> Path:
    """Train (or resume) the candidate network; writes ``candidate_net.pt`` (atomically, every
    ``save_every`` steps, with the optimiser) and returns its path.

    ``stop(step)`` is asked after every step; True saves and returns early (a cancel), and a later call
    goes on from there to the same weights as an uninterrupted run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CANDIDATE_NET_FILE
    dev = pick_device(device)
    torch.manual_seed(config.seed)
    net = build_net(config).to(dev)
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    step = 0
    key = data_key(cases, config, preprocess)
    cases = [widened_targets(c, config.min_target_diameter_mm) for c in cases]
    if config.loss == CENTRE_LOSS:
        cases = [replace(c, heat=centre_heat(c)) for c in cases]
    if path.exists():
        payload = safe_load(path, CANDIDATE_FORMAT)
        if payload.get("data_key") == key:
            net.load_state_dict(payload["state_dict"])
            optimiser.load_state_dict(payload["optimiser"])
            step = int(payload["step"])
        elif progress:  # made from other cases or settings: never resumed, started afresh
            print(f"candidate net: {path} was trained on other data or settings; starting afresh", flush=True)
    start = step  # the schedule's offset on resume (not ``step``, which the loop advances)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: float(0.5 * (1 + np.cos(np.pi * min(s + start, config.steps) / config.steps))))
    loss_fn = _loss(config.loss)
    net.train()
    t0, losses = time.perf_counter(), []
    while step < config.steps:
        x, y = sample_batch(cases, config, step)
        loss = loss_fn(net(torch.from_numpy(x).to(dev)), torch.from_numpy(y).to(dev))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        step += 1
        stopping = stop is not None and stop(step)
        if step % save_every == 0 or step == config.steps or stopping:
            _save(path, net, optimiser, step, config, preprocess, {"loss_last_50": float(np.mean(losses[-50:]))},
                  key)
            if progress:
                print(f"candidate net: step {step}/{config.steps}, loss {np.mean(losses[-50:]):.3f}, "
                      f"{(time.perf_counter() - t0) / max(len(losses), 1):.2f} s/step", flush=True)
        if stopping:
            break
    return path


def data_key(cases: list[PreparedCase], config: CandidateNetConfig, preprocess: PreprocessConfig) -> str:
    """A hash of the training cases (ids, targets, a subsample of the volumes) and every setting: a
    checkpoint is resumed only by the run that made it."""
    digest = hashlib.sha256(json.dumps([config.to_dict(), preprocess.to_dict()], sort_keys=True).encode())
    for case in cases:
        digest.update(case.case_id.encode())
        digest.update(np.ascontiguousarray(case.target).tobytes())
        digest.update(np.ascontiguousarray(case.volume[::4, ::4, ::4], np.float16).tobytes())
    return digest.hexdigest()


def _loss(name: str) -> torch.nn.Module:
    """Batch Dice (crops without a lesion still count) plus a voxel term: cross-entropy, or focal loss
    that spends its gradient on the rare lesion voxels and the hard background."""
    from monai.losses import DiceCELoss, DiceFocalLoss

    if name == "dice_ce":
        return DiceCELoss(sigmoid=True, batch=True)
    if name == "dice_focal":
        return DiceFocalLoss(sigmoid=True, batch=True, gamma=2.0, lambda_focal=10.0)
    if name == CENTRE_LOSS:
        return CentreFocalLoss()
    raise ValueError(f"candidate loss must be dice_ce, dice_focal or {CENTRE_LOSS}, not {name!r}")


def _save(path: Path, net, optimiser, step: int, config: CandidateNetConfig, preprocess: PreprocessConfig,
          metrics: dict, key: str) -> None:
    payload = {"format": CANDIDATE_FORMAT, "format_version": CANDIDATE_FORMAT_VERSION, "step": step, "data_key": key,
               "config": config.to_dict(), "preprocess": preprocess.to_dict(), "metrics": metrics,
               "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
               "optimiser": optimiser.state_dict()}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_candidate_net(path: str | os.PathLike, device: str = "auto"):
    """The network (eval mode), its config and its preprocessing, from a checkpoint (weights only)."""
    return candidate_net_from_payload(safe_load(path, CANDIDATE_FORMAT), path, device)


def candidate_net_from_payload(payload: dict, path: str | os.PathLike, device: str = "auto"):
    """:func:`load_candidate_net` from a loaded payload (``config``, ``preprocess``, ``state_dict``): also the
    candidate part of a two-stage detector file. ``path`` names the file in errors."""
    try:
        data = dict(payload["config"])
        data["features"] = tuple(data["features"])
        config = CandidateNetConfig(**data)
        net = build_net(config)
        net.load_state_dict(payload["state_dict"])
        preprocess = PreprocessConfig.from_dict(payload["preprocess"])
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(path, f"not a valid candidate network ({err})") from err
    return net.to(pick_device(device)).eval(), config, preprocess


# -- inference ----------------------------------------------------------------------------------------
def probability_map(net: torch.nn.Module, volume: np.ndarray, config: CandidateNetConfig) -> np.ndarray:
    """P(lesion) per voxel: sliding windows with Gaussian blending (no tile edges)."""
    from monai.inferers import sliding_window_inference

    device = next(net.parameters()).device
    with torch.no_grad():
        logits = sliding_window_inference(torch.from_numpy(np.ascontiguousarray(volume, np.float32))[None, None]
                                          .to(device), (config.roi,) * 3, 1, net, overlap=config.overlap,
                                          mode="gaussian")
    return torch.sigmoid(logits)[0, 0].cpu().numpy()


@dataclass
class Proposal:
    """A candidate on the preprocessing grid: centre (z, y, x), volume-equivalent diameter, score."""

    zyx: tuple[float, float, float]
    diameter_mm: float
    score: float


# A peak is its own lesion when the map falls by this much (in log P) on every path to a higher peak:
# by a quarter or more (x0.74). Bumps on a mass (0.8-0.9) fall by less; two nodules 18 mm apart whose
# blurred maps join at 0.6 (seen on a validation CT: one proposal between them hit neither) fall by more.
PEAK_PROMINENCE_LOG = 0.3
# The lowest candidate-map peak proposed: on fold lidc0001's validation cohorts 0.01 added 3 proposals/CT, no hit.
PROPOSAL_THRESHOLD = 0.05
# Proposals per scan: the candidate stage's budget (the issue measures it "within 50 candidates per scan").
PROPOSAL_LIMIT = 50


def _forward_neighbours(ndim: int) -> list[tuple[int, ...]]:
    """Half of the full neighbourhood's offsets (13 in 3D): every touching pair of voxels once."""
    offsets = np.stack(np.meshgrid(*[(-1, 0, 1)] * ndim, indexing="ij"), -1).reshape(-1, ndim)
    return [tuple(int(v) for v in o) for o in offsets if tuple(o) > (0,) * ndim]


def lesion_regions(prob: np.ndarray, peaks: np.ndarray, support: np.ndarray,
                   prominence_log: float = PEAK_PROMINENCE_LOG) -> tuple[np.ndarray, np.ndarray]:
    """Split ``support`` into one region per lesion: a watershed of ``prob`` from the ``peaks`` (bool), whose
    basins merge into their neighbour when the lower one's peak stands less than ``prominence_log`` (log P)
    above the saddle between them (the peak's *dynamic*, Grimaud 1992; scikit-image's ``h_maxima`` keeps
    the same peaks but took 2.0 s on a 2 mm TotalSegmentator map where this takes 0.2 s). Returns the
    region labels (a region is named by the label of its peak in ``ndimage.label(peaks)``) and one voxel
    of each peak."""
    from skimage.segmentation import watershed

    markers, count = ndimage.label(peaks)
    basins = watershed(-prob, markers, mask=support, connectivity=prob.ndim)  # 26-connected, as the peaks
    tops = np.zeros(count)
    tops[markers[peaks] - 1] = prob[peaks]  # a peak's voxels share its height (local maxima that touch)
    pairs, saddles = [], []
    for step in _forward_neighbours(prob.ndim):  # touching basins and the saddles between them
        a = tuple(slice(max(-d, 0), n - max(d, 0)) for d, n in zip(step, prob.shape))
        b = tuple(slice(max(d, 0), n - max(-d, 0)) for d, n in zip(step, prob.shape))
        touching = (basins[a] != basins[b]) & (basins[a] > 0) & (basins[b] > 0)
        first, second = basins[a][touching], basins[b][touching]
        pairs.append(np.stack([np.minimum(first, second), np.maximum(first, second)], 1))
        saddles.append(np.minimum(prob[a][touching], prob[b][touching]))
    order = np.argsort(-np.concatenate(saddles), kind="stable")
    pairs, saddles = np.concatenate(pairs)[order], np.concatenate(saddles)[order]
    _, best = np.unique(pairs, axis=0, return_index=True)  # each pair's highest saddle
    best = np.sort(best)
    pairs, saddles = pairs[best], saddles[best]
    parent = np.arange(count + 1)

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for index in range(len(saddles)):  # highest saddle first: each peak meets its best path first
        i, j = root(pairs[index, 0]), root(pairs[index, 1])
        if i == j:
            continue
        low, high = (i, j) if tops[i - 1] < tops[j - 1] else (j, i)
        if np.log(tops[low - 1]) - np.log(max(float(saddles[index]), 1e-12)) < prominence_log:
            parent[low] = high
    names = np.asarray([0] + [root(k) for k in range(1, count + 1)])
    points = np.argwhere(peaks)
    _, first = np.unique(markers[peaks], return_index=True)
    return names[basins], points[first]


def proposals_from_map(prob: np.ndarray, lung: np.ndarray, spacing_zyx,
                       threshold: float = PROPOSAL_THRESHOLD, limit: int = PROPOSAL_LIMIT,
                       min_separation_mm: float = 8.0, edge: float = 0.5) -> list[Proposal]:
    """Peaks of ``prob`` whose lesion is centred in the lung region, best first, one per lesion.

    Peaks are the local maxima (3-voxel neighbourhood) at or above ``threshold`` in the lung region,
    split into lesions by :func:`lesion_regions` (touching lesions apart, bumps of one mass together).
    Within its lesion region, each peak's connected part at or above half its height gives the centre
    (probability-weighted); its connected part at or above ``edge`` times its height (see
    :func:`size_fraction`) the size (volume-equivalent diameter). A peak closer than
    ``min_separation_mm`` to a better one is the same lesion. Peaks rank the map even where an
    under-trained network is uncalibrated; components at a fixed threshold merged a whole lung into one.
    """
    spacing_zyx = np.asarray(spacing_zyx, float)
    inside = ndimage.binary_dilation(lung, iterations=2)
    support = prob >= threshold / 2  # every region reaches down to half its peak
    if not support.any():
        return []
    box = ndimage.find_objects(support.astype(np.uint8))[0]
    box = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(box, prob.shape))
    origin = np.asarray([b.start for b in box])
    local = prob[box]
    peaks = (local == ndimage.maximum_filter(local, size=3)) & (local >= threshold) & inside[box]
    if not peaks.any():
        return []
    regions, tops = lesion_regions(local, peaks, support[box])
    names = np.unique(regions[regions > 0])
    extents = ndimage.find_objects(regions)
    tops = tops[names - 1]
    out: list[Proposal] = []
    for k in np.argsort(-local[tuple(tops.T)], kind="stable"):
        extent, top = extents[names[k] - 1], np.asarray(tops[k])
        corner = np.asarray([e.start for e in extent])
        height = float(local[tuple(top)])
        parts, _ = ndimage.label((regions[extent] == names[k]) & (local[extent] >= 0.5 * height))
        part = parts == parts[tuple(top - corner)]
        points = np.argwhere(part)
        sized, _ = ndimage.label((regions[extent] == names[k]) & (local[extent] >= edge * height))
        size_points = int((sized == sized[tuple(top - corner)]).sum())
        weights = local[extent][part]
        zyx = origin + corner + (points * weights[:, None]).sum(0) / weights.sum()
        if not inside[tuple(np.round(zyx).astype(int))]:  # the lesion's centre, not just its peak voxel
            continue
        if any(np.linalg.norm((np.asarray(p.zyx) - zyx) * spacing_zyx) < min_separation_mm for p in out):
            continue
        diameter = float(2 * (3 * size_points * np.prod(spacing_zyx) / (4 * np.pi)) ** (1 / 3))
        out.append(Proposal(tuple(float(v) for v in zyx), diameter, height))
        if len(out) == limit:
            break
    return out
