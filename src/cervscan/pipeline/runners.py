"""Network runners: the one interface through which the pipeline calls a network.

A runner takes a list of HxWx3 uint8 RGB images of any size, resizes each to the network's input size,
normalises it with the checkpoint's mean and std, runs the network and returns probabilities as a NumPy
array: ``"softmax"`` over the classes (N x C, the logits divided by ``temperature`` first) or ``"sigmoid"``
per pixel (N x 1 x H x W). The steps in :mod:`cervscan.pipeline.steps` never touch a network otherwise, so
another inference backend is one more class with the same method.

:class:`TorchRunner` runs a :class:`~cervscan.models.loading.LoadedModel` with torch (CPU or CUDA).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from cervscan.models.loading import LoadedModel
from cervscan.pipeline.transforms import resize_square, to_tensor_batch


class Runner(Protocol):
    """What the pipeline needs of a network."""

    model: LoadedModel

    def probabilities(self, images: list[np.ndarray], *, activation: str, temperature: float = 1.0) -> np.ndarray:
        ...


def torch_device(device):
    """``device`` (a name, a torch.device or None for the CPU) as a torch.device."""
    import torch  # lazy: torch

    return torch.device(device) if device is not None else torch.device("cpu")


class TorchRunner:
    """A loaded torch network on a device. Segmenters run channels-last on a CPU (faster there)."""

    def __init__(self, model: LoadedModel, device):
        self.model = model
        self.device = torch_device(device)

    def probabilities(self, images: list[np.ndarray], *, activation: str, temperature: float = 1.0) -> np.ndarray:
        import torch  # lazy: torch

        m = self.model
        x = to_tensor_batch([resize_square(im, m.size) for im in images], m.ckpt["mean"], m.ckpt["std"]).to(self.device)
        if m.ckpt.get("kind") == "segmenter" and self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out = m.net(x)
            if activation == "sigmoid":
                return torch.sigmoid(out).float().cpu().numpy()
            if activation == "softmax":
                return torch.softmax(out.float() / temperature, dim=1).cpu().numpy()
        raise ValueError(f"unknown activation {activation!r}")
