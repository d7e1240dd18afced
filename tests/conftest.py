"""Shared fixtures: tiny models in the real checkpoint format, synthetic visits, real-data path.

Everything runs on one CPU thread (a training job may be using the other cores)
and every test gets its own empty ``CERVSCAN_HOME`` so that no test can see or
change the user's installed models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import calibrated_repvgg, make_tiny_models

torch.set_num_threads(1)
# the training commands re-execute the interpreter once to set GLIBC_TUNABLES; under CliRunner that
# would replace the pytest process itself
os.environ["CERVSCAN_NO_REEXEC"] = "1"
try:
    torch.set_num_interop_threads(1)
except RuntimeError:  # already set (e.g. torch used before conftest import)
    pass

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_ENV = ("CERVSCAN_SEG_MODEL", "CERVSCAN_CLS_MODEL", "CERVSCAN_CERVIX_MODEL", "CERVSCAN_STAGE_MODEL",
             "CERVSCAN_WEIGHTS_DIR", "CERVSCAN_DEVICE", "CERVSCAN_CLINIC")


# --------------------------------------------------------------------------- isolation

@pytest.fixture(autouse=True)
def cervscan_home(monkeypatch, tmp_path_factory, request):
    """No test reads the user's data dir or inherits model-selection variables.

    Screening with tiny models would otherwise load the shipped exam-stage model (an EfficientNet);
    tests use the tiny one unless marked ``shipped_stage``."""
    for k in MODEL_ENV:
        monkeypatch.delenv(k, raising=False)
    if "shipped_stage" not in request.keywords:
        monkeypatch.setenv("CERVSCAN_STAGE_MODEL", str(request.getfixturevalue("tiny_models")["stage"]))
    home = tmp_path_factory.mktemp("cervscan-home")
    monkeypatch.setenv("CERVSCAN_HOME", str(home))
    return home


# --------------------------------------------------------------------------- models

@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """Random U-Net++ (resnet18, depth 3) + RepVGG-A0 checkpoints with a manifest (64x64 inputs)."""
    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"))


def _calibration_batch(seed: int, size: int, n: int = 8) -> torch.Tensor:
    """Normalised synthetic images like the ones screened: plain, brightened and masked-and-cropped."""
    from cervscan.models.networks import IMAGENET_MEAN, IMAGENET_STD
    from cervscan.pipeline.transforms import resize_square, to_tensor_batch
    from cervscan.pipeline.vote import adjust_brightness

    rng = np.random.default_rng(seed)
    ims = []
    for i in range(n):
        im = synthetic_image(rng)
        if i % 3 == 1:
            im = adjust_brightness(im, 1.2)
        elif i % 3 == 2:
            im = im.copy()
            im[: im.shape[0] // 4] = 0
            im[:, im.shape[1] // 2:] = 0
        ims.append(resize_square(im, size))
    return to_tensor_batch(ims, IMAGENET_MEAN, IMAGENET_STD)


def make_varied_classifier(path: Path, *, seed: int = 1, input_size: int = 64) -> Path:
    """A RepVGG-A0 whose P(severe) actually depends on the image.

    A freshly initialised RepVGG gives nearly the same probability for every
    input, which would make voting checks vacuous. Here the BatchNorm statistics
    are calibrated on random images and the head is re-drawn.
    """
    from cervscan.models.networks import IMAGENET_MEAN, IMAGENET_STD, make_checkpoint, save_checkpoint, to_deploy

    m = calibrated_repvgg(seed, [_calibration_batch(100 + k, input_size) for k in range(3)])
    ck = make_checkpoint(to_deploy(m), kind="classifier", arch="repvgg_a0", arch_kwargs={}, form="deploy",
                         input_size=(input_size, input_size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         name="varied-cls", version="test",
                         extra={"threshold": 0.5, "temperature": 1.0,
                                "voting": {"weights": [0.2, 0.25, 0.15, 0.2, 0.11, 0.09], "brightness": 1.2,
                                           "brightness_from_flipped": False}})
    return save_checkpoint(ck, path)


@pytest.fixture(scope="session")
def varied_models(tiny_models, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("varied-models")
    return {"seg": tiny_models["seg"], "cls": make_varied_classifier(d / "cls.pt"), "dir": d}


# --------------------------------------------------------------------------- synthetic images

def synthetic_image(rng: np.random.Generator, h: int | None = None, w: int | None = None) -> np.ndarray:
    """RGB uint8 'cervix': reddish textured background with 1-2 whitish elliptical 'lesions'."""
    import cv2

    h = int(h or rng.integers(64, 129))
    w = int(w or rng.integers(64, 129))
    base = np.array([170, 80, 90], np.float32) + rng.normal(0, 12, (h, w, 3)).astype(np.float32)
    img = np.clip(base, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        c = (int(rng.integers(w // 4, 3 * w // 4)), int(rng.integers(h // 4, 3 * h // 4)))
        ax = (int(rng.integers(6, max(7, w // 4))), int(rng.integers(6, max(7, h // 4))))
        cv2.ellipse(img, c, ax, float(rng.integers(0, 180)), 0, 360, (235, 225, 225), -1)
    return img


def write_image(path: Path, rgb: np.ndarray, **save_kw) -> Path:
    """Write with Pillow (format from the suffix); returns the path."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, **save_kw)
    return path


@pytest.fixture
def make_visit():
    """``make_visit(folder, n=2, seed=0, ext='.jpg')`` -> list of written image paths (fixed seeds)."""

    def _make(folder: Path, n: int = 2, seed: int = 0, ext: str = ".jpg", prefix: str = "img") -> list[Path]:
        rng = np.random.default_rng(seed)
        folder.mkdir(parents=True, exist_ok=True)
        return [write_image(folder / f"{prefix}{i + 1}{ext}", synthetic_image(rng)) for i in range(n)]

    return _make


@pytest.fixture
def synthetic_batch(tmp_path, make_visit) -> Path:
    """A folder of three visit folders (2, 3 and 1 images, JPEG and PNG)."""
    root = tmp_path / "visits"
    make_visit(root / "P001", 2, seed=1)
    make_visit(root / "P002", 3, seed=2, ext=".png")
    make_visit(root / "P003", 1, seed=3)
    return root


# --------------------------------------------------------------------------- real data

@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` relative to the repository root; skips the test when it is absent."""
    p = (REPO_ROOT.parent / "shared" / "data").resolve()
    if not (p / "visits").is_dir():
        pytest.skip(f"real data not available at {p}")
    return p


# --------------------------------------------------------------------------- output checks

def assert_no_tmp_files(folder: Path) -> None:
    left = [str(p) for p in Path(folder).rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".cervscan-")]
    assert not left, f"temporary files left behind: {left}"


def read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@pytest.fixture
def no_tmp_files():
    return assert_no_tmp_files


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0
