"""Throughput and peak memory of ``cervscan screen``: optimised path vs a naive path.

Optimised: the library's ``api.screen`` (re-parameterised RepVGG, all variants of
several images in one batched forward pass, channels_last U-Net++, decoding in a
background thread). Naive: the same steps image by image, training-form RepVGG,
the six variants one forward pass each, decoding in the main process.

Both use the reference sizes (U-Net++ tu-tf_efficientnet_lite0 at 256 px,
RepVGG-A0 at 224 px) with random weights (speed does not depend on the
weights) on real images from ../shared/data/visits. Each path runs in its own
process so peak RSS is its own.

    python benchmarks/screen_speed.py [--images 48] [--threads 2]

Writes benchmarks/RESULTS.md (section "screen speed") and prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "visits"


def make_models(folder: Path, cls_arch: str = "repvgg_a0") -> tuple[Path, Path, Path]:
    import torch

    from cervscan.models import (build_classifier, build_segmenter, default_norm, make_checkpoint,
                                 save_checkpoint, to_deploy)

    torch.manual_seed(0)
    seg = build_segmenter("tu-tf_efficientnet_lite0").eval()
    m, s = default_norm("lite0")
    save_checkpoint(make_checkpoint(seg, kind="segmenter", arch="tu-tf_efficientnet_lite0", arch_kwargs={}, form="train",
                                    input_size=(256, 256), mean=m, std=s, name="bench-seg", version="bench"),
                    folder / "seg.pt")
    cls = build_classifier(cls_arch).eval()
    m, s = default_norm(cls_arch)
    extra = {"threshold": 0.5, "temperature": 1.0}
    save_checkpoint(make_checkpoint(cls, kind="classifier", arch=cls_arch, arch_kwargs={}, form="train",
                                    input_size=(224, 224), mean=m, std=s, name="bench-cls", version="bench", extra=extra),
                    folder / "cls_train.pt")
    save_checkpoint(make_checkpoint(to_deploy(cls), kind="classifier", arch=cls_arch, arch_kwargs={}, form="deploy",
                                    input_size=(224, 224), mean=m, std=s, name="bench-cls", version="bench", extra=extra),
                    folder / "cls_deploy.pt")
    return folder / "seg.pt", folder / "cls_train.pt", folder / "cls_deploy.pt"


def pick_images(n: int, dest: Path) -> Path:
    """Copy n real images (half IARC 800x600, half AnnoCerv 384x384) into visit folders."""
    import csv

    rows = list(csv.DictReader(open(DATA / "images.csv")))
    iarc = [r for r in rows if r["patient_id"].startswith("iarc")]
    anno = [r for r in rows if r["patient_id"].startswith("annocerv")]
    chosen = iarc[: n - n // 2] + anno[: n // 2]
    for r in chosen:
        d = dest / r["patient_id"]
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / r["patient_id"] / r["image"], d / r["image"])
    return dest


def run_optimised(visits: Path, seg: Path, cls: Path, out: Path, threads: int, workers: int = 0) -> dict:
    import torch

    torch.set_num_threads(threads)
    from cervscan import api

    t = time.time()
    res = api.screen([visits], out, seg_model=str(seg), cls_model=str(cls), device="cpu", num_workers=workers)
    wall = time.time() - t
    return {"images": res.run["counts"]["images"], "screen_s": res.run["timings"]["screen_s"], "wall_s": wall}


def run_naive(visits: Path, seg: Path, cls: Path, out: Path, threads: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from cervscan.config import VotingConfig
    from cervscan.inference import load_models, segment
    from cervscan.io import atomic_write_image, discover_visits, read_image
    from cervscan.transforms import overlay, resize_square, to_tensor_batch
    from cervscan.variants import make_variants, segment_region, weighted_score
    from cervscan.weights import resolve

    lm = load_models(resolve("segmenter", seg), resolve("classifier", cls), torch.device("cpu"), deploy=False)
    lm.seg = lm.seg.to(memory_format=torch.contiguous_format)
    vcfg = VotingConfig()
    items = [(v.patient_id, p) for v in discover_visits([visits]) for p in v.images]
    ck = lm.cls_ckpt
    t = time.time()
    with torch.inference_mode():
        for pid, p in items:
            rgb = read_image(p).rgb
            ck_s = lm.seg_ckpt
            x = to_tensor_batch([resize_square(rgb, 256)], ck_s["mean"], ck_s["std"])
            import cv2

            prob = torch.sigmoid(lm.seg(x))[0, 0].numpy()
            m = (cv2.resize(prob, (rgb.shape[1], rgb.shape[0])) > 0.5).astype(np.uint8)
            reg = segment_region(rgb, m, vcfg)
            probs = {}
            for name, im in make_variants(rgb, reg.image, vcfg).items():
                xi = to_tensor_batch([resize_square(im, 224)], ck["mean"], ck["std"])
                probs[name] = float(torch.softmax(lm.cls(xi), 1)[0, 1])
            weighted_score(probs, vcfg)
            atomic_write_image(out / "masks" / pid / f"{p.stem}.png", m * 255)
            atomic_write_image(out / "overlays" / pid / f"{p.stem}.jpg", overlay(rgb, m))
    return {"images": len(items), "screen_s": time.time() - t}


def child(mode: str, visits: str, seg: str, cls: str, out: str, threads: int, workers: int = 0) -> None:
    if mode == "optimised":
        r = run_optimised(Path(visits), Path(seg), Path(cls), Path(out), threads, workers)
    else:
        r = run_naive(Path(visits), Path(seg), Path(cls), Path(out), threads)
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r["peak_rss_children_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps(r))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=5)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--workers", type=int, default=0,
                    help="also measure the optimised path with a DataLoader of this many worker processes")
    a = ap.parse_args()
    if a.child:
        child(a.child[0], *a.child[1:], threads=a.threads, workers=a.workers)
        return
    tmp = Path(tempfile.mkdtemp(prefix="cervscan-bench-"))
    seg, cls_train, cls_deploy = make_models(tmp)
    visits = pick_images(a.images, tmp / "visits")
    res = {}
    runs = [("naive", cls_train, 0), ("optimised", cls_deploy, 0)]
    if a.workers:
        runs.append((f"optimised_workers{a.workers}", cls_deploy, a.workers))
    for name, cls, workers in runs:
        mode = "naive" if name == "naive" else "optimised"
        p = subprocess.run([sys.executable, __file__, "--threads", str(a.threads), "--workers", str(workers),
                            "--child", mode, str(visits), str(seg), str(cls), str(tmp / f"out-{name}")],
                           capture_output=True, text=True)
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            sys.exit(f"{mode} failed:\n{p.stderr[-3000:]}")
        r = json.loads(line[0][7:])
        r["images_per_s"] = r["images"] / r["screen_s"]
        res[name] = r
    res["speedup"] = res["optimised"]["images_per_s"] / res["naive"]["images_per_s"]
    import torch

    res["machine"] = {"cpu_count": os.cpu_count(), "threads": a.threads, "torch": torch.__version__,
                      "python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                      "load_avg_before": os.getloadavg()}
    res["date"] = time.strftime("%Y-%m-%d %H:%M")
    print(json.dumps(res, indent=2))
    if not a.no_write:
        write_results(res, a.images)
    shutil.rmtree(tmp, ignore_errors=True)


def write_results(res: dict, n: int) -> None:
    path = ROOT / "benchmarks" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = "<!-- screen_speed:start -->", "<!-- screen_speed:end -->"
    o, nv = res["optimised"], res["naive"]
    extra = "".join(f"| optimised with `--workers {k.rsplit('workers', 1)[1]}` (DataLoader worker processes) | "
                    f"{v['images_per_s']:.2f} | {v['peak_rss_mb']:.0f} | {v['peak_rss_children_mb']:.0f} |\n"
                    for k, v in res.items() if k.startswith("optimised_workers"))
    cmd_extra = "".join(f" --workers {k.rsplit('workers', 1)[1]}" for k in res if k.startswith("optimised_workers"))
    block = f"""{start}
## screen speed (`python benchmarks/screen_speed.py --images {n}{cmd_extra}`)

Measured {res['date']} on {res['machine']['cpu_count']} CPU cores, {res['machine']['threads']} torch threads,
torch {res['machine']['torch']}, no GPU; U-Net++ tu-tf_efficientnet_lite0 at 256 px, RepVGG-A0 at 224 px,
all six variants, masks and overlays written; {n} real images (half IARC 800x600, half AnnoCerv 384x384).
Load average before the run: {', '.join(f'{x:.1f}' for x in res['machine']['load_avg_before'])}.

| path | images/s | peak RSS main process (MB) | peak RSS of its child processes (MB) |
|---|---|---|---|
| naive (training-form RepVGG, variants one at a time, no worker) | {nv['images_per_s']:.2f} | {nv['peak_rss_mb']:.0f} | {nv['peak_rss_children_mb']:.0f} |
| optimised (`cervscan screen`) | {o['images_per_s']:.2f} | {o['peak_rss_mb']:.0f} | {o['peak_rss_children_mb']:.0f} |
{extra}
Speed-up (ratio, comparable across machines): **{res['speedup']:.2f}x**. Targets on a 2-core CPU:
>= 5 images/s, >= 3x the naive path, peak RSS <= 1 GB.
{end}"""
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
