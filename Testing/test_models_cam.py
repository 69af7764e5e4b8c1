"""3D ResNets and Grad-CAM: shapes, the dense/patch equivalence, CAM against a full-backward reference."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from noduleai.cam import cam_to_ct, grad_cam
from noduleai.geometry import same_geometry
from noduleai.models import ARCHITECTURES, build_model, resnet18_3d, resnet50_3d


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_classifies_a_volume(arch):
    model = build_model(arch, width=0.125).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64, 64))
    assert out.shape == (2, 2)


def test_seed_names_and_width_multiplier():
    full = sum(p.numel() for p in resnet18_3d(num_classes=2).parameters())
    narrow = sum(p.numel() for p in resnet18_3d(num_classes=2, width=0.25).parameters())
    assert 30e6 < full < 40e6  # ResNet-18-3D has ~33 M parameters
    assert narrow < full / 10
    assert resnet50_3d(num_classes=2, width=0.125).fc.in_features == 4 * 64  # bottleneck expansion
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet99_3d")


def _reference_grad_cam(model, x, layer):
    """Textbook Grad-CAM: hooks and a full backward pass through every parameter."""
    store = {}
    module = dict(model.named_modules())[layer]
    h1 = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    h2 = module.register_full_backward_hook(lambda m, gi, go: store.__setitem__("g", go[0]))
    model.zero_grad()
    model(x)[:, 1].sum().backward()
    h1.remove()
    h2.remove()
    weights = store["g"].mean(dim=(2, 3, 4), keepdim=True)
    cam = torch.relu((weights * store["a"]).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[2:], mode="trilinear", align_corners=False)[:, 0]
    return (cam / cam.flatten(1).amax(1).view(-1, 1, 1, 1)).detach().numpy()


def test_grad_cam_matches_full_backward_and_leaves_no_parameter_gradients():
    torch.manual_seed(1)
    model = build_model("resnet10_3d", width=0.125, small_input=True).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    reference = _reference_grad_cam(model, x.clone(), "layer3")
    model.zero_grad(set_to_none=True)
    cams, probs = grad_cam(model, x, "layer3")
    assert np.allclose(cams, reference, atol=1e-4)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored
    assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1)


def _paper_grad_cam_plus_plus(model, x, layer):
    """Grad-CAM++ as Chattopadhay et al. (2018) write it (eq. 19), for Y = exp(S) with S the class logit,
    computed independently: hooks, a full backward pass of exp(S), and the alpha formula in NumPy with
    the second and third derivatives of Y in closed form (exp(S) g^2, exp(S) g^3; the network is
    piecewise linear in the activations)."""
    store = {}
    module = dict(model.named_modules())[layer]
    h1 = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    h2 = module.register_full_backward_hook(lambda m, gi, go: store.__setitem__("dy", go[0]))
    model.zero_grad()
    score = model(x)[:, 1]
    score.exp().sum().backward()
    h1.remove()
    h2.remove()
    a = store["a"].detach().double().numpy()
    ey = score.detach().double().exp().numpy()[:, None, None, None, None]
    dy = store["dy"].double().numpy()  # dY/dA = exp(S) dS/dA
    g = dy / ey
    d2, d3 = ey * g**2, ey * g**3
    denom = 2 * d2 + a.sum(axis=(2, 3, 4), keepdims=True) * d3
    alpha = np.divide(d2, denom, out=np.zeros_like(d2), where=denom != 0)
    weights = (alpha * np.maximum(dy, 0)).sum(axis=(2, 3, 4), keepdims=True)
    cam = torch.from_numpy(np.maximum((weights * a).sum(1, keepdims=True), 0)).float()
    cam = torch.nn.functional.interpolate(cam, size=x.shape[2:], mode="trilinear", align_corners=False)[:, 0]
    return (cam / cam.flatten(1).amax(1).view(-1, 1, 1, 1)).numpy()


def test_grad_cam_plus_plus_matches_the_paper_at_large_logits():
    """v1 differentiated exp(S) and then used it as if it were S: right only at S = 0. A trained model's
    logits are far from 0, so the check runs at |S| ~ 10-30."""
    torch.manual_seed(3)
    model = build_model("resnet10_3d", width=0.125, small_input=True).eval()
    with torch.no_grad():
        model.fc.weight.mul_(200.0)
        model.fc.bias.zero_()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        logits = model(x)[:, 1]
    assert logits.abs().min() > 5, logits  # the regime where the two formulas differ
    reference = _paper_grad_cam_plus_plus(model, x.clone(), "layer3")
    cams, _ = grad_cam(model, x, "layer3", method="gradcam++")
    assert np.allclose(cams, reference, atol=1e-3), np.abs(cams - reference).max()


def test_grad_cam_plus_plus_is_a_normalised_map():
    torch.manual_seed(2)
    model = build_model("resnet10_3d", width=0.125, small_input=True).eval()
    cams, _ = grad_cam(model, torch.randn(1, 1, 32, 32, 32), "layer2", method="gradcam++")
    assert cams.shape == (1, 32, 32, 32)
    assert cams.min() >= 0 and np.isclose(cams.max(), 1)
    with pytest.raises(ValueError, match="no layer"):
        grad_cam(model, torch.randn(1, 1, 32, 32, 32), "layer9")


def test_cam_maps_onto_the_ct_grid(lidc_ct):
    from noduleai.preprocess import SCAN_PREPROCESS, preprocess_ct

    pre = preprocess_ct(lidc_ct, SCAN_PREPROCESS)
    cam = np.zeros(pre.array.shape, np.float32)
    cam[60:68, 60:68, 60:68] = 1
    heat = cam_to_ct(cam, pre.image, lidc_ct)
    assert same_geometry(heat, lidc_ct)
    # The hot cube sits at the same physical place in both grids.
    centre = pre.image.TransformContinuousIndexToPhysicalPoint((63.5, 63.5, 63.5))
    idx = heat.TransformPhysicalPointToIndex(centre)
    assert sitk.GetArrayViewFromImage(heat)[idx[2], idx[1], idx[0]] > 0.9
