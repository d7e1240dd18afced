"""Grad-CAM heatmaps of the classifier (Selvaraju et al., 2017).

Where did the classifier look when it scored an image "severe"? Grad-CAM
weights the channels of the last convolutional feature map by the mean
gradient of the class logit and keeps the positive part.

Why hand-written hooks rather than a library such as ``pytorch-grad-cam``:

* it is a few lines (one forward hook that makes the feature map the root of
  the autograd graph, then ``torch.autograd.grad`` of the class logit w.r.t. it);
* it adds no dependency to a medical tool whose dependencies we pin and audit;
* it works on exactly the network that screened the images, including the
  deploy (re-parameterised) RepVGG form that timm builds with
  ``reparameterize_model``, whose module tree differs from the training form
  (fused ``reparam_conv`` instead of the 3x3/1x1/identity branches), so
  nothing may depend on module names.

The target layer is found by running the model once with forward hooks on its
top-level children and taking the *last executed child whose output is a 4-D
feature map* (N, C, H, W) -- for timm models that is the module producing the
output of ``forward_features`` (RepVGG: ``final_conv``; EfficientNet: ``bn2``;
ResNet: ``layer4``), just before global pooling.
"""

from __future__ import annotations

import weakref

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_TARGET_CACHE: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def find_target_layer(model: nn.Module, input_size: tuple[int, int] = (64, 64)) -> nn.Module:
    """The module whose output is the model's final convolutional feature map.

    Runs one small dummy forward pass with hooks on the top-level children and
    returns the last one (in execution order) that produced a 4-D tensor with a
    spatial extent. Falls back to the last ``nn.Conv2d`` of the model.
    """
    if model in _TARGET_CACHE:
        return _TARGET_CACHE[model]
    order: list[nn.Module] = []
    handles = []

    def hook(mod, _inp, out):
        if isinstance(out, torch.Tensor) and out.dim() == 4:
            order.append(mod)

    children = [m for _, m in model.named_children()]
    for m in children:
        handles.append(m.register_forward_hook(hook))
    try:
        p = next(model.parameters(), None)
        dev = p.device if p is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_size, device=dev))
    finally:
        for h in handles:
            h.remove()
    if order:
        target = order[-1]
    else:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ValueError("grad_cam: the model has no convolutional layer")
        target = convs[-1]
    _TARGET_CACHE[model] = target
    return target


def grad_cam(model: nn.Module, x: torch.Tensor, class_idx: int = 1, layer: nn.Module | None = None) -> np.ndarray:
    """Grad-CAM of ``class_idx`` for one image.

    ``x`` is a normalised 1x3xHxW (or 3xHxW) tensor as fed to the classifier;
    returns an HxW float32 array in [0, 1] at the input resolution (all zeros
    when no location supports the class). The model is used as is (eval mode,
    its parameters and their ``.grad`` are left untouched; gradients are taken
    w.r.t. the feature map only, so the backward pass runs through the head only).
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"grad_cam: expected one image (1x3xHxW), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if layer is None:
        layer = find_target_layer(model, (int(h), int(w)))
    store: dict[str, torch.Tensor] = {}

    def fwd_hook(_mod, _inp, out):
        if isinstance(out, (tuple, list)):
            raise ValueError("grad_cam: the target layer must return a single tensor")
        # The feature map becomes the start of the graph: gradients flow back only
        # through the head (cheap), never into the backbone or the weights.
        # ``leaf.clone()`` keeps later in-place ops (ReLU(inplace=True)) legal.
        leaf = out.detach().requires_grad_(True)
        store["act"] = leaf
        return leaf.clone()

    flags = [p.requires_grad for p in model.parameters()]
    handle = layer.register_forward_hook(fwd_hook)
    try:
        model.requires_grad_(False)
        # The report may run inside torch.inference_mode(); Grad-CAM needs autograd.
        with torch.inference_mode(False), torch.enable_grad():
            logits = model(x.detach().clone())
            if logits.dim() != 2 or not 0 <= class_idx < logits.shape[1]:
                raise ValueError(f"grad_cam: class {class_idx} not in model output of shape {tuple(logits.shape)}")
            if "act" not in store or not logits.requires_grad:
                raise RuntimeError("grad_cam: the target layer did not take part in the forward pass")
            (grad,) = torch.autograd.grad(logits[0, class_idx], store["act"])
    finally:
        handle.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    act, grad = store["act"].detach()[0].float(), grad.detach()[0].float()  # C x h x w
    weights = grad.mean(dim=(1, 2))  # C
    cam = torch.relu((weights[:, None, None] * act).sum(0))
    cam = F.interpolate(cam[None, None], size=(int(h), int(w)), mode="bilinear", align_corners=False)[0, 0]
    cam = cam.cpu().numpy().astype(np.float32)
    cam = np.clip(cam, 0, None)
    top = float(cam.max())
    if not np.isfinite(top) or top <= 1e-12:
        return np.zeros((int(h), int(w)), np.float32)
    return np.clip(cam / top, 0.0, 1.0).astype(np.float32)


def heatmap_overlay(rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a colour-mapped (jet) ``cam`` (any size, values in [0, 1]) onto an RGB uint8 image."""
    h, w = rgb.shape[:2]
    c = cv2.resize(np.asarray(cam, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    c8 = np.clip(c * 255.0 + 0.5, 0, 255).astype(np.uint8)
    colour = cv2.cvtColor(cv2.applyColorMap(c8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(colour, alpha, rgb, 1 - alpha, 0)
