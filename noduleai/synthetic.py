"""Synthetic chest-CT phantoms with exact ground truth.

Body with a fat layer, spine, two lungs, branching vessel-like tubes, airways with walls, nodules of
chosen size and density (solid, part-solid, ground-glass), partial-volume blur and noise, in HU.
They let the whole pipeline run on a fresh machine with no data, and serve as test input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from noduleai.io import write_image_atomic
from noduleai.records import CaseRecord, NoduleRecord, save_manifest

LUNG_HU = -860.0
SOFT_TISSUE_HU = 40.0
FAT_HU = -100.0
BONE_HU = 500.0
AIR_HU = -1000.0
TEXTURES = {"solid": (0.0, 60.0), "part_solid": (-650.0, 40.0), "ground_glass": (-650.0, -450.0)}


@dataclass(frozen=True)
class PhantomNodule:
    """Ground truth of one inserted nodule (LPS millimetres)."""

    center_lps: tuple[float, float, float]
    diameter_mm: float
    texture: str


@dataclass
class Phantom:
    """A phantom CT in HU with its ground truth."""

    image: sitk.Image
    nodules: list[PhantomNodule]
    vessel_points_lps: list[tuple[float, float, float]] = field(default_factory=list)
    nodule_labels: sitk.Image | None = None  # 0 background, i+1 inside nodule i


class _Canvas:
    """Voxel grid with physical coordinates, drawing objects inside their bounding boxes only."""

    def __init__(self, size_xyz: tuple[int, int, int], spacing_xyz: tuple[float, float, float]):
        self.shape = (size_xyz[2], size_xyz[1], size_xyz[0])
        self.spacing = np.asarray(spacing_xyz, float)
        self.origin = -np.asarray(size_xyz) * self.spacing / 2  # centred on the isocentre, LPS
        self.hu = np.full(self.shape, AIR_HU, np.float32)

    def box(self, lo_mm: np.ndarray, hi_mm: np.ndarray):
        lo = np.floor((lo_mm - self.origin) / self.spacing).astype(int)
        hi = np.ceil((hi_mm - self.origin) / self.spacing).astype(int) + 1
        lo = np.clip(lo, 0, np.array(self.shape[::-1]))
        hi = np.clip(hi, 0, np.array(self.shape[::-1]))
        sl = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
        z, y, x = np.meshgrid(*(np.arange(s.start, s.stop) for s in sl), indexing="ij")
        pts = np.stack([x, y, z], -1) * self.spacing + self.origin
        return sl, pts

    def index_to_lps(self, zyx) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.asarray(zyx[::-1], float) * self.spacing + self.origin)

    def lps_to_index(self, p) -> tuple[int, int, int]:
        ijk = np.round((np.asarray(p) - self.origin) / self.spacing).astype(int)
        return int(ijk[2]), int(ijk[1]), int(ijk[0])


def _segment_distance(pts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((pts - a) @ ab) / max(float(ab @ ab), 1e-9), 0, 1)
    return np.linalg.norm(pts - (a + t[..., None] * ab), axis=-1)


def _draw_tube(cv: _Canvas, a, b, radius: float, value: float, where: np.ndarray | None = None,
               wall: float = 0.0, wall_value: float = 0.0) -> None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    r = radius + wall
    sl, pts = cv.box(np.minimum(a, b) - r - 1, np.maximum(a, b) + r + 1)
    if pts.size == 0:
        return
    d = _segment_distance(pts, a, b)
    region = cv.hu[sl]
    allowed = np.ones(d.shape, bool) if where is None else where[sl]
    if wall > 0:
        region[(d <= r) & (d > radius) & allowed] = wall_value
    region[(d <= radius) & allowed] = value


def make_phantom(seed: int, size_xyz: tuple[int, int, int] = (112, 96, 80),
                 spacing_xyz: tuple[float, float, float] = (1.5, 1.5, 2.0), n_nodules: int = 2,
                 diameter_range_mm: tuple[float, float] = (5.0, 18.0), n_vessels_per_lung: int = 7,
                 textures: tuple[str, ...] = ("solid", "solid", "part_solid", "ground_glass"),
                 noise_hu: float = 20.0) -> Phantom:
    """Draw one phantom. Same ``seed``, same phantom."""
    rng = np.random.default_rng(seed)
    cv = _Canvas(size_xyz, spacing_xyz)
    fov = np.asarray(size_xyz) * cv.spacing
    sl, pts = cv.box(cv.origin, -cv.origin)
    x, y = pts[..., 0], pts[..., 1]
    # Body: an elliptic cylinder with a fat layer; spine posterior.
    ax, ay = 0.46 * fov[0], 0.40 * fov[1]
    body_r = (x / ax) ** 2 + (y / ay) ** 2
    cv.hu[body_r <= 1] = FAT_HU
    cv.hu[body_r <= 0.85] = SOFT_TISSUE_HU
    cv.hu[(x / 10) ** 2 + ((y - 0.28 * fov[1]) / 10) ** 2 <= 1] = BONE_HU
    # Lungs: two ellipsoids with per-lung size jitter.
    lungs = np.zeros(cv.shape, bool)
    for side in (-1, 1):
        c = np.array([side * 0.21 * fov[0], -0.02 * fov[1], 0.05 * fov[2]])
        semi = np.array([0.17, 0.29, 0.47]) * fov * rng.uniform(0.92, 1.05, 3)
        lungs |= (((pts - c) / semi) ** 2).sum(-1) <= 1
    cv.hu[lungs] = LUNG_HU
    # Airways: trachea down the midline, splitting into two main bronchi (air inside a soft wall).
    top = np.array([0.0, -0.08 * fov[1], 0.5 * fov[2]])
    carina = np.array([0.0, -0.05 * fov[1], 0.12 * fov[2]])
    _draw_tube(cv, top, carina, 6.0, AIR_HU, wall=1.5, wall_value=SOFT_TISSUE_HU)
    hila = []
    for side in (-1, 1):
        hilum = np.array([side * 0.16 * fov[0], -0.03 * fov[1], 0.02 * fov[2]])
        hila.append(hilum)
        tip = hilum + np.array([side * 0.06 * fov[0], rng.uniform(-8, 8), -0.15 * fov[2]])
        _draw_tube(cv, carina, hilum, 4.0, AIR_HU, wall=1.5, wall_value=SOFT_TISSUE_HU)
        _draw_tube(cv, hilum, tip, 2.5, AIR_HU, where=lungs, wall=1.2, wall_value=SOFT_TISSUE_HU)
    # Vessels: branching tubes from each hilum, tapering, inside the lungs only.
    vessel_points: list[tuple[float, float, float]] = []
    lung_idx = np.argwhere(lungs)
    for hilum in hila:
        for _ in range(n_vessels_per_lung):
            start = hilum + rng.normal(0, 4, 3)
            radius = rng.uniform(1.8, 3.2)
            for _seg in range(3):
                target = np.asarray(cv.index_to_lps(lung_idx[rng.integers(len(lung_idx))]))
                direction = target - start
                end = start + direction * rng.uniform(0.35, 0.6)
                _draw_tube(cv, start, end, radius, SOFT_TISSUE_HU, where=lungs)
                mid = (start + end) / 2
                if lungs[cv.lps_to_index(mid)]:
                    vessel_points.append(tuple(float(v) for v in mid))
                start, radius = end, max(0.8, radius * rng.uniform(0.6, 0.8))
    # Nodules: inside the lungs, away from each other; some touch the pleura (juxta-pleural).
    depth_mm = ndimage.distance_transform_edt(lungs, sampling=cv.spacing[::-1])
    labels = np.zeros(cv.shape, np.uint8)
    nodules: list[PhantomNodule] = []
    for _ in range(200 * n_nodules):
        if len(nodules) == n_nodules:
            break
        diameter = float(rng.uniform(*diameter_range_mm))
        r = diameter / 2
        juxta = rng.random() < 0.2
        ok = (depth_mm > r * 0.6) & (depth_mm < r + 1.0) if juxta else depth_mm > r + 2.0
        cand = np.argwhere(ok)
        if len(cand) == 0:
            continue
        center = np.asarray(cv.index_to_lps(cand[rng.integers(len(cand))]))
        if any(np.linalg.norm(center - np.asarray(n.center_lps)) < r + n.diameter_mm / 2 + 12 for n in nodules):
            continue
        texture = str(rng.choice(textures))
        sl, pts = cv.box(center - r - 2, center + r + 2)
        semi = r * rng.uniform(0.85, 1.15, 3)
        semi *= r / np.cbrt(np.prod(semi))  # keep the volume-equivalent diameter exact
        dist = np.sqrt((((pts - center) / semi) ** 2).sum(-1))
        edge = 1 / (1 + np.exp((dist - 1) * r / 0.5))  # ~0.5 mm soft edge
        low, high = TEXTURES[texture]
        level = high if texture == "solid" else low
        value = np.full(dist.shape, level, np.float32)
        if texture == "part_solid":
            value = np.where(dist < 0.45, high, low).astype(np.float32)
        region = cv.hu[sl]
        inside_lung = lungs[sl] | (edge > 0.5)
        blend = edge * inside_lung
        region[:] = np.where(blend > 0, np.maximum(region, region * (1 - blend) + value * blend), region)
        labels[sl][(dist <= 1) & (labels[sl] == 0)] = len(nodules) + 1
        nodules.append(PhantomNodule(tuple(float(v) for v in center), diameter, texture))
    # Partial-volume blur (sharper in-plane than along z, as in a real scan) and noise.
    hu = ndimage.gaussian_filter(cv.hu, sigma=(0.7, 0.5, 0.5))
    hu += rng.normal(0, noise_hu, hu.shape).astype(np.float32)
    image = _to_image(np.clip(hu, -1024, 3071).astype(np.int16), cv)
    label_image = _to_image(labels, cv)
    vessel_points = [p for p in vessel_points
                     if all(np.linalg.norm(np.asarray(p) - n.center_lps) > n.diameter_mm / 2 + 8 for n in nodules)]
    return Phantom(image=image, nodules=nodules, vessel_points_lps=vessel_points, nodule_labels=label_image)


def _to_image(array: np.ndarray, cv: _Canvas) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(cv.spacing))
    image.SetOrigin(tuple(cv.origin + 0.0))
    return image


def write_phantom_cohort(out_dir: str | os.PathLike, n_cases: int, seed: int = 0, negative_fraction: float = 0.25,
                         prefix: str = "phantom", **phantom_kwargs) -> list[CaseRecord]:
    """Write ``n_cases`` phantoms as NRRD plus ``manifest.json``; about ``negative_fraction`` have no nodule.

    Each phantom is its own patient. Existing files of the same name are rewritten.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n_cases):
        case_seed = int(rng.integers(2**31))
        n_nodules = 0 if rng.random() < negative_fraction else int(rng.integers(1, 4))
        phantom = make_phantom(case_seed, n_nodules=n_nodules, **phantom_kwargs)
        case_id = f"{prefix}{i:03d}"
        path = out / f"{case_id}.nrrd"
        write_image_atomic(phantom.image, path)
        nodules = [NoduleRecord(n.center_lps, n.diameter_mm, n.texture) for n in phantom.nodules]
        cases.append(CaseRecord(case_id, case_id, str(path), int(bool(nodules)), nodules))
    save_manifest(cases, out / "manifest.json")
    return cases
