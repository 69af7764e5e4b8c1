"""Acquisitions simulated from a real CT, to measure robustness to them (issue 10, item 6).

Thick slices: a scanner reconstructing at slice thickness T averages the object over a slab of T along the
patient axis (its slice sensitivity profile, taken here as a box) and writes one slice per slab. From a
thinner real acquisition that is the mean of the signal over each slab, which this module computes by
integrating the linear interpolant of the input slices. In-plane resolution, kernel and noise stay the
host's own (the mean lowers the noise as a real thick reconstruction does).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

SAMPLES_PER_SLAB = 16  # points per output slab; the interpolant is piecewise linear, so 16 is ample


def thick_slices(ct: sitk.Image, thickness_mm: float) -> sitk.Image:
    """``ct`` as reconstructed at contiguous ``thickness_mm`` slices (float32, same in-plane grid and
    orientation; slab centres on the axis of the image's third index). The slabs tile the input's extent
    from its first slice's lower edge; a remainder thinner than a slab is dropped."""
    spacing = ct.GetSpacing()
    if thickness_mm <= spacing[2]:
        raise ValueError(f"thick slices of {thickness_mm} mm need thinner input slices; this CT has "
                         f"{spacing[2]:.2f} mm")
    volume = sitk.GetArrayViewFromImage(ct).astype(np.float32)  # z, y, x
    nz = volume.shape[0]
    ratio = thickness_mm / spacing[2]  # input slices per slab
    n_out = int(np.floor(nz / ratio + 1e-6))
    if n_out < 1:
        raise ValueError(f"a CT {nz * spacing[2]:.1f} mm long holds no {thickness_mm} mm slab")
    centres = -0.5 + (np.arange(n_out) + 0.5) * ratio  # in input index units; the input's edge is at -0.5
    offsets = ((np.arange(SAMPLES_PER_SLAB) + 0.5) / SAMPLES_PER_SLAB - 0.5) * ratio
    out = np.zeros((n_out,) + volume.shape[1:], np.float32)
    for j, centre in enumerate(centres):
        at = np.clip(centre + offsets, 0.0, nz - 1.0)  # the outer half-slices hold the edge value
        low = np.floor(at).astype(int)
        high = np.minimum(low + 1, nz - 1)
        w = (at - low).astype(np.float32)
        out[j] = ((1 - w)[:, None, None] * volume[low] + w[:, None, None] * volume[high]).mean(axis=0)
    image = sitk.GetImageFromArray(out)
    image.SetSpacing((spacing[0], spacing[1], float(thickness_mm)))
    image.SetDirection(ct.GetDirection())
    image.SetOrigin(ct.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, float(centres[0]))))
    return image
