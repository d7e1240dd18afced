"""What a quiet night costs: ``cervscan batch`` over 200 visit folders, then again over the unchanged ROOT.

Builds ROOT with 200 visit folders of 2-4 images each (copies of the real example
images in examples/visits), runs the batch once (everything is new), then reruns it
over the unchanged ROOT (nothing to screen). Both runs go through ``api.batch`` in
this process after the heavy imports (torch, timm, smp) are done, so the ratio
compares the batch work itself; the wall time of a no-op rerun through the command
line (a fresh Python process, as cron runs it) is measured as well.

    python benchmarks/batch_rerun.py [--visits 200] [--threads 1] [--shipped] [--no-write]

Default models: the tiny random test models (benchmarks/tiny_models.py ``make_tiny_models``; screening
is then mostly decoding and writing files); ``--shipped`` uses the shipped weights.
Target: the rerun takes < 5 % of the first run's time. Prints JSON and rewrites the
``batch_rerun`` block of benchmarks/RESULTS.md (``--no-write``: don't).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_md import replace_block

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "visits"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
START, END = "<!-- batch_rerun:start -->", "<!-- batch_rerun:end -->"


def build_root(dest: Path, n_visits: int) -> int:
    """``n_visits`` folders of 2-4 copies of the example images; returns the number of images."""
    pool = sorted(EXAMPLES.glob("*/*.jpg"))
    if not pool:
        raise SystemExit(f"no example images in {EXAMPLES}")
    n = 0
    for k in range(n_visits):
        folder = dest / f"V{k:04d}"
        folder.mkdir(parents=True)
        for i in range(2 + k % 3):
            src = pool[(k * 3 + i) % len(pool)]
            shutil.copyfile(src, folder / f"img{i + 1}{src.suffix}")
            n += 1
    return n


def model_args(work: Path, shipped: bool) -> dict:
    if shipped:
        return {}
    from tiny_models import make_tiny_models  # lazy: torch, after main() has set OMP_NUM_THREADS

    m = make_tiny_models(work / "models")
    return {"seg_model": str(m["seg"]), "cls_model": str(m["cls"])}


def timed_batch(root: Path, out: Path, models: dict) -> tuple[float, dict]:
    from cervscan import api

    t0 = time.perf_counter()
    res = api.batch(root, out, device="cpu", num_workers=0, use_stage=False, **models)
    dt = time.perf_counter() - t0
    if res.exit_code != 0:
        raise SystemExit(f"batch exited {res.exit_code}: {res.summary}")
    run = json.loads((out / "run.json").read_text())
    return dt, {**res.summary, "load_models_s": run["timings"]["load_models_s"]}


def cli_rerun(root: Path, out: Path, models: dict, threads: int) -> float:
    cmd = [sys.executable, "-m", "cervscan", "batch", str(root), "-o", str(out), "--device", "cpu", "--no-stage",
           "--workers", "0", "--json", "-q"]
    if models:
        cmd += ["--seg-model", models["seg_model"], "--cls-model", models["cls_model"]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CERVSCAN_NO_REEXEC": "1"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"cli rerun exited {r.returncode}: {r.stderr[-2000:]}")
    s = json.loads(r.stdout.strip().splitlines()[-1])
    if s["new"] or s["changed"]:
        raise SystemExit(f"the rerun screened something: {s}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--visits", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--shipped", action="store_true", help="use the shipped weights instead of the tiny test models")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite benchmarks/RESULTS.md")
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    load_before = os.getloadavg()
    import segmentation_models_pytorch  # noqa: F401 - heavy imports before timing
    import timm  # noqa: F401
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="cervscan-batch-bench-") as tmp:
        work = Path(tmp)
        n_images = build_root(work / "root", args.visits)
        models = model_args(work, args.shipped)
        first_s, first = timed_batch(work / "root", work / "out", models)
        rerun_s, rerun = timed_batch(work / "root", work / "out", models)
        cli_s = cli_rerun(work / "root", work / "out", models, args.threads)
        build_root(work / "one-more", 1)  # a night with one new visit (2 images)
        (work / "one-more" / "V0000").rename(work / "root" / "V9999")
        one_s, one = timed_batch(work / "root", work / "out", models)
    res = {
        "visits": args.visits, "images": n_images, "models": "shipped" if args.shipped else "tiny test models",
        "first_run_s": round(first_s, 3), "rerun_s": round(rerun_s, 3), "ratio": round(rerun_s / first_s, 4),
        "first_run_images_per_s": first["images_per_s"], "rerun_load_models_s": rerun["load_models_s"],
        "cli_rerun_wall_s": round(cli_s, 3), "cli_rerun_ratio": round(cli_s / first_s, 4),
        "first": {k: first[k] for k in ("new", "changed", "unchanged", "images")},
        "rerun": {k: rerun[k] for k in ("new", "changed", "unchanged", "images")},
        "one_new_visit_s": round(one_s, 3), "one_new_visit_load_models_s": one["load_models_s"],
        "one_new": {k: one[k] for k in ("new", "changed", "unchanged", "images")},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()],
                    "torch": torch.__version__, "python": platform.python_version(),
                    "cuda": torch.cuda.is_available()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(res, indent=2))
    if not args.no_write:
        write_results(res, args)
        print(f"wrote {RESULTS.relative_to(ROOT)}", file=sys.stderr)


def write_results(r: dict, args) -> None:
    """Replace (or append) only the batch_rerun block of RESULTS.md."""
    m = r["machine"]
    cmd = "python benchmarks/batch_rerun.py" + (f" --visits {args.visits}" if args.visits != 200 else "") + \
        (" --shipped" if args.shipped else "") + (f" --threads {args.threads}" if args.threads != 1 else "")
    block = f"""{START}
## batch rerun (`{cmd}`)

Measured {r['date']} on {m['cpus']} CPU cores, {m['torch_threads']} torch thread(s), torch {m['torch']},
{'a GPU present but not used' if m['cuda'] else 'no GPU'}, with the **{r['models']}**
({'screening is then mostly decoding images and writing masks and overlays' if r['models'] != 'shipped' else 'the shipped weights'});
{r['visits']} visit folders, {r['images']} images (copies of the example images, 384x384 JPEG).
Load average before / after: {', '.join(map(str, m['load_average_before']))} / {', '.join(map(str, m['load_average_after']))}
(the machine was shared with two training jobs).

| run | what it screened | time (s) |
|---|---|---|
| first run (`api.batch`, all new) | {r['first']['new']} visits, {r['first']['images']} images ({r['first_run_images_per_s']} images/s) | {r['first_run_s']} |
| rerun over the unchanged ROOT (`api.batch`) | {r['rerun']['new'] + r['rerun']['changed']} visits ({r['rerun']['unchanged']} unchanged) | {r['rerun_s']} (loading the models: {r['rerun_load_models_s']}) |
| the same rerun through the command line (a new Python process, as cron runs it) | nothing | {r['cli_rerun_wall_s']} |
| a night with one new visit (`api.batch`) | {r['one_new']['new']} visit, {r['one_new']['images']} images ({r['one_new']['unchanged']} unchanged) | {r['one_new_visit_s']} (loading the models: {r['one_new_visit_load_models_s']}) |

Rerun / first run: **{r['ratio'] * 100:.1f} %** (target < 5 %); through the command line, including the
Python start-up: {r['cli_rerun_ratio'] * 100:.1f} %. A night with nothing new loads no model (and, from the
command line, imports no torch) when the models' sha256, the config file and the options are those of the last
finished run; it lists ROOT, stats every image and compares the CSVs it would write with the ones on disk.
{END}"""
    replace_block(START, END, block, RESULTS)


if __name__ == "__main__":
    main()
