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
from torch import nn

from noduleai.geometry import image_from_array, resample_like

CAM_METHODS = ("gradcam", "gradcam++")


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
                # Grad-CAM++ (Chattopadhay et al. 2018) with the exponential of the score, whose
                # higher derivatives are powers of the first one.
                (grads,) = torch.autograd.grad(logits[:, class_index].exp().sum(), activations)
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
