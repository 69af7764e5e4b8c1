"""Grad-CAM and Grad-CAM++ for 3D models, mapped into the original CT's geometry.

Gradients are taken with respect to the target layer's activations only: parameters are frozen for
the pass and the activation is made a leaf, so nothing before the target layer records a graph and
no parameter gradient is ever computed (see ``bench/`` for the cost against MONAI's GradCAM).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import SimpleITK as sitk
import torch
from scipy.signal.windows import tukey
from torch import nn

from noduleai.geometry import image_from_array, resample_like

CAM_METHODS = ("gradcam", "gradcam++")
CAM_LAYERS = ("layer2", "layer3")  # layer4 is 4^3 on a 32^3 patch: too coarse to point inside a nodule


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def grad_cam(model: nn.Module, x: torch.Tensor, target_layer: str = "layer4", class_index: int = 1,
             method: str = "gradcam") -> tuple[np.ndarray, np.ndarray]:
    """Class activation maps for a batch ``x`` (N, 1, D, H, W).

    Returns ``(cams, probabilities)``: cams (N, D, H, W) upsampled to the input size and scaled to
    [0, 1] per sample (0 everywhere where the map is flat), probabilities (N, classes).
    """
    if method not in CAM_METHODS:
        raise ValueError(f"CAM method must be one of {CAM_METHODS}, not {method!r}")
    modules = dict(model.named_modules())
    if target_layer not in modules:
        raise ValueError(f"model has no layer {target_layer!r}")
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        leaf = output.detach().requires_grad_(True)
        captured["a"] = leaf
        return leaf

    was_training = model.training
    model.eval()
    handle = modules[target_layer].register_forward_hook(hook)
    try:
        with _frozen(model), torch.enable_grad():
            logits = model(x)
            activations = captured["a"]
            if method == "gradcam":
                (grads,) = torch.autograd.grad(logits[:, class_index].sum(), activations)
                weights = grads.mean(dim=(2, 3, 4), keepdim=True)
            else:
                # Grad-CAM++ (Chattopadhay et al. 2018, eq. 19) for Y = exp(S) with S the class logit. A ReLU
                # network is piecewise linear in the activations, so dY/dA = exp(S) dS/dA and the higher
                # derivatives are exp(S) times powers of dS/dA: exp(S) cancels in alpha and only scales the
                # weights, which the per-map normalisation below removes. So every term uses dS/dA.
                # (Differentiating exp(S) itself, as v1 did, leaves an extra exp(S) on the third-order term:
                # equal to the paper only at S = 0.)
                (grads,) = torch.autograd.grad(logits[:, class_index].sum(), activations)
                g2, g3 = grads.pow(2), grads.pow(3)
                denom = 2 * g2 + activations.sum(dim=(2, 3, 4), keepdim=True) * g3
                alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
                weights = (alpha * torch.relu(grads)).sum(dim=(2, 3, 4), keepdim=True)
            cam = torch.relu((weights * activations).sum(dim=1, keepdim=True))
    finally:
        handle.remove()
        model.train(was_training)
    cam = nn.functional.interpolate(cam.detach(), size=x.shape[2:], mode="trilinear", align_corners=False)
    cam = cam[:, 0]
    peak = cam.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
    cam = torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
    return cam.cpu().numpy(), torch.softmax(logits.detach(), dim=1).cpu().numpy()


def cam_to_ct(cam: np.ndarray, model_space: sitk.Image, ct: sitk.Image) -> sitk.Image:
    """Resample a map on the model-space grid (z, y, x) onto the original CT's grid (float32)."""
    image = image_from_array(np.asarray(cam, dtype=np.float32), model_space)
    return resample_like(image, ct, linear=True, default=0.0)


def blend_window(size: int) -> np.ndarray:
    """Weights (size^3) for laying a candidate's patch CAM onto the whole-CT heatmap: 1 over the central
    half, a cosine taper to 0 at the patch border (Tukey, alpha 0.5). Without it every candidate's map
    ended at the patch faces and the overlay showed square tile edges around each candidate."""
    w = tukey(size + 2, alpha=0.5)[1:-1].astype(np.float32)  # drop the two exact zeros: the border voxel is ~0
    return w[:, None, None] * w[None, :, None] * w[None, None, :]


def blended_candidate_cams(model: nn.Module, volume: np.ndarray, centres: list, weights: list[float], size: int,
                           layer: str, method: str, device: torch.device) -> np.ndarray:
    """One map on ``volume``'s grid: each candidate's patch CAM (``size``^3 around its voxel centre),
    tapered by :func:`blend_window`, scaled by its weight (its probability) and kept where highest."""
    from noduleai.patches import extract_patch, paste_patch_max

    out = np.zeros(volume.shape, np.float32)
    window = blend_window(size)
    for centre, weight in zip(centres, weights):
        patch = torch.from_numpy(extract_patch(volume, centre, size))[None, None].to(device)
        cam, _ = grad_cam(model, patch, layer, 1, method)
        paste_patch_max(out, cam[0] * window * float(weight), centre)
    return out


def pointing_scores(model: nn.Module, patches: np.ndarray, inside: np.ndarray,
                    layers: tuple[str, ...] = CAM_LAYERS, methods: tuple[str, ...] = CAM_METHODS,
                    batch: int = 32) -> dict[str, float]:
    """Pointing game per ``layer/method``: the fraction of ``patches`` (N, D, H, W) whose CAM maximum lies
    in ``inside`` (N, D, H, W, bool: the nodule). Choose a setting on validation data only."""
    scores: dict[str, float] = {}
    for layer in layers:
        for method in methods:
            hits = []
            for i in range(0, len(patches), batch):
                x = torch.from_numpy(np.ascontiguousarray(patches[i:i + batch], np.float32)[:, None])
                cams, _ = grad_cam(model, x, layer, 1, method)
                hits += [bool(m.ravel()[np.argmax(c)]) for c, m in zip(cams, inside[i:i + batch])]
            scores[f"{layer}/{method}"] = float(np.mean(hits)) if hits else float("nan")
    return scores
