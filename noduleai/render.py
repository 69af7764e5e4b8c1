"""Overlay pictures: CT (lung window) with the heatmap, through a point, in three planes."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from noduleai import DISCLAIMER  # noqa: E402
from noduleai.files import atomic_path  # noqa: E402
from noduleai.geometry import lps_to_array_index  # noqa: E402

PLANES = ("axial", "coronal", "sagittal")
LUNG_WINDOW = (-1000.0, 400.0)


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Stamp the disclaimer on a figure, write it as PNG atomically, and close it."""
    fig.text(0.01, 0.01, DISCLAIMER, fontsize=8, color="gray")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def render_overlays(ct: sitk.Image, heatmap: sitk.Image, point_lps: Sequence[float],
                    paths: dict[str, str | os.PathLike], title: str = "", threshold: float = 0.2,
                    opacity: float = 0.5) -> None:
    """Write one PNG per plane in ``paths`` (keys from :data:`PLANES`), in radiological convention.

    Both images are reoriented to LPS for display only, so the patient's right is on the left,
    anterior up in axial, superior up in coronal and sagittal.
    """
    ct_lps = sitk.DICOMOrient(ct, "LPS")
    heat_lps = sitk.DICOMOrient(heatmap, "LPS")
    ct_a, heat_a = sitk.GetArrayViewFromImage(ct_lps), sitk.GetArrayViewFromImage(heat_lps)
    z, y, x = (int(round(v)) for v in lps_to_array_index(ct_lps, point_lps))
    z, y, x = (int(np.clip(v, 0, n - 1)) for v, n in zip((z, y, x), ct_a.shape))
    sx, sy, sz = ct_lps.GetSpacing()
    views = {  # slice, aspect (row spacing / column spacing), flip vertically, marker (col, row)
        "axial": (lambda a: a[z], sy / sx, False, (x, y)),
        "coronal": (lambda a: a[:, y, :], sz / sx, True, (x, z)),
        "sagittal": (lambda a: a[:, :, x], sz / sy, True, (y, z)),
    }
    for plane, path in paths.items():
        take, aspect, flip, (mc, mr) = views[plane]
        image, heat = np.asarray(take(ct_a), float), np.asarray(take(heat_a), float)
        origin = "lower" if flip else "upper"
        fig, ax = plt.subplots(figsize=(6, 6 * min(2.0, max(0.5, image.shape[0] * aspect / image.shape[1]))))
        ax.imshow(image, cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1], aspect=aspect, origin=origin)
        ax.imshow(np.ma.masked_less(heat, threshold), cmap="inferno", vmin=0, vmax=1, alpha=opacity,
                  aspect=aspect, origin=origin)
        ax.plot([mc], [mr], marker="o", markersize=18, markerfacecolor="none", markeredgecolor="cyan")
        ax.set_title(f"{title} {plane}".strip(), fontsize=10)
        ax.axis("off")
        fig.tight_layout()
        save_figure(fig, path, dpi=90)


def _crop_around(ct: sitk.Image, point_lps: Sequence[float], half_mm: float, plane: str,
                 step_mm: float = 0.5) -> np.ndarray:
    """A square section (``2 * half_mm`` wide, ``step_mm`` pixels) through ``point_lps``, LPS-aligned."""
    n = int(round(2 * half_mm / step_mm))
    axes = {"axial": (0, 1), "coronal": (0, 2)}[plane]  # display columns, rows (rows increase down)
    grid = sitk.Image([n, n, 1], sitk.sitkFloat32)
    spacing = [step_mm, step_mm, step_mm]
    direction = np.zeros((3, 3))
    direction[axes[0], 0] = 1.0
    direction[axes[1], 1] = 1.0 if plane == "axial" else -1.0  # coronal: superior up
    direction[:, 2] = np.cross(direction[:, 0], direction[:, 1])
    grid.SetSpacing(spacing)
    grid.SetDirection(tuple(direction.ravel()))
    grid.SetOrigin(tuple(np.asarray(point_lps) - direction[:, :2] @ np.full(2, half_mm)))
    section = sitk.Resample(ct, grid, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(section)[0]


def plot_lesion_gallery(items: Sequence[tuple[str, sitk.Image, Sequence[float]]], path: str | os.PathLike,
                        half_mm: float = 24.0, columns: int = 6) -> None:
    """Axial and coronal 48 mm sections (lung window) through each ``(title, ct, point_lps)``."""
    rows = int(np.ceil(len(items) / columns))
    fig, axes = plt.subplots(2 * rows, columns, figsize=(2.2 * columns, 4.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, (title, ct, point) in enumerate(items):
        r, c = divmod(k, columns)
        for p, plane in enumerate(("axial", "coronal")):
            ax = axes[2 * r + p, c]
            ax.imshow(_crop_around(ct, point, half_mm, plane), cmap="gray", vmin=LUNG_WINDOW[0],
                      vmax=LUNG_WINDOW[1])
            ax.set_title(f"{title}\n{plane}" if p == 0 else plane, fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, path, dpi=110)
