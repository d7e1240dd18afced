"""Throughput, peak memory and per-step cost of ``cervscan screen``: the pipeline vs a naive path.

Three measurements, each in its own process (so that peak RSS is its own):

- **optimised**: ``api.screen([visits], out, device="cpu")``, i.e. :class:`cervscan.pipeline.steps.Pipeline`
  with everything it does in a screening: decode (background thread), quality, exam stage, cervix
  finder, crop, lesion segmenter, the six variants, one batched classifier pass per batch of
  images, score; masks, cervix masks and overlays written, then the CSVs and run.json. Images/s
  come from run.json (``timings.screen_s``: from the models loaded to the last image written).
- **naive**: the same models and steps, image by image, no batching: decoding in the main thread,
  every network in its training form (``model_from_checkpoint(ck, deploy=False)``) and the default
  memory format, the six variants one classifier forward pass each, masks and overlays written. It
  uses the pipeline's own geometry helpers (``largest_component``, ``cervix_box``, ``crop_to_box``,
  ``paste_box``, ``segment_region``, ``make_variants``, ...) so that it computes the same thing:
  the per-image scores of both paths are compared.
- **steps**: the pipeline's step methods (``pipe.decode``, ``pipe.quality``, ``pipe.stage``,
  ``pipe.cervix`` split into network / largest component / box, crop, ``pipe.lesion``, variants,
  ``pipe.classify``, ``pipe.score``, ``OutputWriter.image``) timed one by one on batches of
  ``batch_images`` images, mirroring ``Pipeline.prepare`` / ``Pipeline.process``, after one
  untimed warm-up batch.

``--onnx`` adds a fourth process that exports the four networks (``torch.onnx.export``,
``dynamo=False``, opset 17) and times onnxruntime against torch on the same inputs, network by
network (not a full screening path), with the largest difference of their outputs.

Models: by default those ``screen`` would use (``cervscan.models.registry.resolve(role)``: option, env,
installed, shipped ``weights/``); ``--stage-model/--cervix-model/--seg-model/--cls-model`` point
at other checkpoints (a file or a run folder with model.pt). A classifier without a ``crop`` key
(an old one) is run with ``crop="cervix"`` so that the cervix finder is measured anyway. A role that
no model fills gets a stand-in with random weights of the architecture ``train-stage`` /
``train-seg --target cervix`` produce (speed does not depend on the weights); the results say so.

Images: real ones from ../shared/data/visits, half IARC 800x600, half AnnoCerv 384x384.

    python benchmarks/screen_speed.py [--images 48] [--threads 2] [--onnx]
        [--stage-model P] [--cervix-model P] [--seg-model P] [--cls-model P]

Prints JSON and rewrites the ``screen_speed`` block of benchmarks/RESULTS.md (``--no-write``: don't).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "visits"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
ROLES = ("stage", "cervix", "segmenter", "classifier")
OPTION = {"stage": "stage_model", "cervix": "cervix_model", "segmenter": "seg_model", "classifier": "cls_model"}

#: Targets of the issue (2-core CPU). RSS in MB = 2**20 bytes (ru_maxrss / 1024).
TARGET_IPS = 5.0
TARGET_SPEEDUP = 3.0
TARGET_RSS_MB = 1150.0  # peak RSS of the old path, measured before the pipeline rewrite
GOAL_RSS_MB = 1000.0

#: Per-step names, in pipeline order, with what each one covers.
STEPS = [
    ("decode", "Pipeline.decode: read_image (PIL decode, EXIF, size and memory guards); in the run, decoding ahead"),
    ("stage", "Pipeline.stage: exam-stage net (resize, normalise, forward, softmax)"),
    ("cervix", "Pipeline.cervix: cervix finder net, largest component, crop box (or the centre crop)"),
    ("lesion", "Pipeline.lesion: lesion segmenter on the crops"),
    ("quality", "Pipeline.quality: measures inside the cervix"),
    ("gate", "Pipeline.gate: eligibility and reason"),
    ("variants", "Pipeline.variants: the classifier's variants of each eligible image"),
    ("classify", "Pipeline.classify: classifier passes, temperature, softmax"),
    ("score", "Pipeline.score: the weighted vote"),
    ("write", "OutputWriter.image: lesion mask PNG, cervix mask PNG, overlay JPEG"),
]


# --------------------------------------------------------------------------- set-up (main process)

def pick_images(n: int, dest: Path) -> dict:
    """Copy n real images (half IARC 800x600, half AnnoCerv 384x384) into visit folders."""
    import csv

    with open(DATA / "images.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    iarc = [r for r in rows if r["patient_id"].startswith("iarc")]
    anno = [r for r in rows if r["patient_id"].startswith("annocerv")]
    chosen = iarc[: n - n // 2] + anno[: n // 2]
    for r in chosen:
        d = dest / r["patient_id"]
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / r["patient_id"] / r["image"], d / r["image"])
    return {"n": len(chosen), "iarc": len(iarc[: n - n // 2]), "annocerv": len(anno[: n // 2]),
            "patients": len({r["patient_id"] for r in chosen})}


def make_stand_in(role: str, folder: Path) -> Path:
    """A checkpoint with random weights of the architecture the training commands produce for ``role``."""
    import torch

    from cervscan.models.networks import build_classifier, build_segmenter, make_checkpoint, save_checkpoint

    torch.manual_seed(0)
    half = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    if role == "stage":  # cervscan train-stage: EfficientNet-Lite0 at 224 px, 5 classes, deploy form
        classes = ["acetic", "lugol", "green", "saline", "other"]
        net = build_classifier("tf_efficientnet_lite0", num_classes=len(classes)).eval()
        ck = make_checkpoint(net, kind="stage", arch="tf_efficientnet_lite0", arch_kwargs={}, form="deploy",
                             input_size=(224, 224), name="stand-in-stage", version="random", **half,
                             extra={"classes": classes, "target": "stage"})
    elif role == "cervix":  # cervscan train-seg --target cervix --input-size 192: U-Net++ Lite0
        net = build_segmenter("tu-tf_efficientnet_lite0").eval()
        ck = make_checkpoint(net, kind="segmenter", arch="tu-tf_efficientnet_lite0", arch_kwargs={}, form="train",
                             input_size=(192, 192), name="stand-in-cervix", version="random", **half,
                             extra={"target": "cervix", "classes": ["background", "cervix"], "mask_threshold": 0.5})
    else:
        raise ValueError(role)
    path = folder / f"stand-in-{role}.pt"
    save_checkpoint(ck, path)
    return path


def resolve_models(args, folder: Path) -> tuple[dict, dict, str]:
    """role -> {path, source, ...}; the screen overrides; the crop mode and where it came from."""
    from cervscan.errors import CervscanError
    from cervscan.models.networks import read_checkpoint
    from cervscan.models.registry import resolve

    def find(role):
        given = getattr(args, OPTION[role])
        try:
            ref = resolve(role, given)
        except CervscanError as e:
            if given or role in ("segmenter", "classifier"):
                raise SystemExit(f"{role}: {e}") from None
            why = str(e).split(". ")[0]  # "no stage model found"
            return {"path": str(make_stand_in(role, folder)), "source": "stand-in (random weights)", "why": why}
        return {"path": str(ref.path), "source": ref.source}

    models = {"classifier": find("classifier"), "segmenter": find("segmenter")}
    cls_ck = read_checkpoint(models["classifier"]["path"])
    overrides: dict = {}
    if cls_ck.get("crop"):
        crop_note = f"{cls_ck['crop']} (classifier checkpoint)"
    else:
        overrides["crop"] = "cervix"
        crop_note = "cervix (forced: the classifier checkpoint has no 'crop' key)"
    if (cls_ck.get("crop") or "cervix") == "cervix":
        models["cervix"] = find("cervix")
    models["stage"] = find("stage")
    return {r: models[r] for r in ROLES if r in models}, overrides, crop_note


# --------------------------------------------------------------------------- children

def _load_kwargs(spec: dict) -> dict:
    kw = {OPTION[r]: m["path"] for r, m in spec["models"].items()}
    return {**kw, "overrides": dict(spec["overrides"]), "device": "cpu", "batch_images": spec.get("batch_images"),
            "num_workers": spec.get("workers", 0), "config_file": spec.get("config_file")}


def _rss() -> dict:
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _count(folder: Path, pattern: str) -> int:
    return sum(1 for _ in folder.glob(pattern)) if folder.is_dir() else 0


def run_optimised(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from cervscan import api

    out = Path(spec["out"])
    t = time.perf_counter()
    res = api.screen([spec["visits"]], out, threads=spec["threads"], **_load_kwargs(spec))
    wall = time.perf_counter() - t
    r = _rss()  # before anything else can raise the high-water mark
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    return {**r, "images": run["counts"]["images"], "images_failed": run["counts"]["images_failed"],
            "screen_s": run["timings"]["screen_s"], "load_models_s": run["timings"]["load_models_s"],
            "wall_s": wall, "threads": run["threads"], "batch_images": run["config"]["batch_images"],
            "num_workers": run["config"]["num_workers"], "crop": run["config"]["crop"],
            "variants": list(run["config"]["voting"]["variants"]),
            "written": {"masks": _count(out, "masks/*/*.png"), "cervix_masks": _count(out, "cervix/*/*.png"),
                        "overlays": _count(out, "overlays/*/*.jpg")},
            "scores": {f"{rec['patient_id']}/{rec['image']}": rec.get("score") for rec in res.images}}


def run_naive(spec: dict) -> dict:
    """The same steps image by image: no batching, training-form nets, default memory format, main-thread decode."""
    import cv2
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    from cervscan.config import GateConfig, ScreenConfig, VotingConfig
    from cervscan.files import atomic_write_csv, atomic_write_image, discover_visits, read_image
    from cervscan.models.networks import model_from_checkpoint, read_checkpoint
    from cervscan.pipeline.steps import (centre_box, cervix_box, crop_to_box, format_box, largest_component, paste_box)
    from cervscan.pipeline.quality import measure, problems
    from cervscan.pipeline.transforms import overlay, resize_square, to_tensor_batch
    from cervscan.pipeline.vote import decide, make_variants, segment_region, weighted_score

    c = dict(spec["config"])
    v = dict(c.pop("voting"))
    voting = VotingConfig(**{k: tuple(x) if isinstance(x, list) else x for k, x in v.items()})
    gate = GateConfig(**{k: tuple(x) if isinstance(x, list) else x for k, x in dict(c.pop("gate")).items()})
    cfg = ScreenConfig(**{k: x for k, x in c.items() if k in ScreenConfig.__dataclass_fields__}, voting=voting,
                       gate=gate)
    t_load = time.perf_counter()
    nets, cks = {}, {}
    for role, m in spec["models"].items():
        if role == "cervix" and cfg.crop != "cervix":
            continue
        cks[role] = read_checkpoint(m["path"])
        nets[role] = model_from_checkpoint(cks[role], deploy=False)  # training form, contiguous (NCHW) memory
    load_s = time.perf_counter() - t_load
    T = float(cks["classifier"].get("temperature") or 1.0)
    S = int(cks["classifier"]["input_size"][0])

    def net_input(role, im):
        ck = cks[role]
        return to_tensor_batch([resize_square(im, tuple(ck["input_size"]))], ck["mean"], ck["std"])

    def segment(role, im, thr):
        prob = torch.sigmoid(nets[role](net_input(role, im)))[0, 0].float().numpy()
        return (cv2.resize(prob, (im.shape[1], im.shape[0]), interpolation=cv2.INTER_LINEAR) > thr).astype(np.uint8)

    out = Path(spec["out"])
    items = [(vi.patient_id, p) for vi in discover_visits([spec["visits"]]) for p in vi.images]
    records, scores = [], {}
    t = time.perf_counter()
    with torch.inference_mode():
        for pid, p in items:
            rgb = read_image(p, max_side=cfg.max_side, max_pixels=cfg.max_pixels, min_side=cfg.min_side).rgb
            h, w = rgb.shape[:2]
            stage = ""
            if "stage" in nets:
                pr = torch.softmax(nets["stage"](net_input("stage", rgb)).float(), dim=1)[0].numpy()
                stage = list(cks["stage"]["classes"])[int(pr.argmax())]
            cmask, found = None, None
            if cfg.crop == "cervix":
                cmask = largest_component(segment("cervix", rgb, float(cks["cervix"].get("mask_threshold") or 0.5)))
                box, found, _ = cervix_box(cmask, cfg)
            elif cfg.crop == "centre":
                box = centre_box(w, h, cfg.centre_crop)
            else:
                box = (0, 0, w, h)
            q = measure(rgb, cmask)  # the gate's measures, inside the cervix (as Pipeline.quality)
            crop = crop_to_box(rgb, box)
            lm = segment("segmenter", crop, voting.mask_threshold)
            reg = segment_region(crop, lm, voting)
            probs = {}
            view = rgb if cfg.classify_view == "frame" else crop
            for name, im in make_variants(resize_square(view, S), resize_square(reg.image, S), voting).items():
                logits = nets["classifier"](net_input("classifier", im)).float() / T
                probs[name] = float(torch.softmax(logits, dim=1)[0, 1])
            s = weighted_score(probs, voting)
            lesion_mask = paste_box(lm, box, h, w)
            atomic_write_image(out / "masks" / pid / f"{p.stem}.png", lesion_mask * np.uint8(255))
            if cmask is not None:
                atomic_write_image(out / "cervix" / pid / f"{p.stem}.png", cmask * np.uint8(255))
            atomic_write_image(out / "overlays" / pid / f"{p.stem}.jpg",
                               overlay(rgb, lesion_mask, cervix=cmask, box=box))
            scores[f"{pid}/{p.name}"] = s
            records.append({"patient_id": pid, "image": p.name, "stage": stage, "cervix_found": found,
                            "crop_box": format_box(box), "score": s, "decision": decide(s, cfg.threshold),
                            "quality_flags": ";".join(problems(q, cfg.gate))})
    screen_s = time.perf_counter() - t
    r = _rss()
    atomic_write_csv(out / "images.csv", records, list(records[0]) if records else ["patient_id"])
    return {**r, "images": len(items), "screen_s": screen_s, "load_models_s": load_s, "scores": scores,
            "written": {"masks": _count(out, "masks/*/*.png"), "cervix_masks": _count(out, "cervix/*/*.png"),
                        "overlays": _count(out, "overlays/*/*.jpg")}}


def run_steps(spec: dict) -> dict:
    """Each step of the screening path timed where it runs: the Pipeline's own methods (and the writer's)
    are wrapped with a timer, then ``Pipeline.run`` screens the images as ``screen`` does (after one
    warm-up batch), so the breakdown can never drift from the path it measures."""
    import torch

    torch.set_num_threads(spec["threads"])
    from cervscan.files import discover_visits
    from cervscan.pipeline.outputs import OutputWriter
    from cervscan.pipeline.steps import Pipeline

    pipe = Pipeline.from_config(**_load_kwargs(spec))
    cfg = pipe.cfg
    visits = discover_visits([spec["visits"]])
    items = [(v.patient_id, p) for v in visits for p in v.images]
    writer = OutputWriter(Path(spec["out"]), masks=cfg.write_masks, overlays=cfg.write_overlays)
    for v in visits:
        writer.add_visit(v.patient_id, [p.name for p in v.images])
    acc = {k: 0.0 for k, _ in STEPS}
    clock = time.perf_counter
    n_vars = [0]

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = clock()
            try:
                return fn(*a, **k)
            finally:
                acc[name] += clock() - t0
        return wrapper

    inner = {"decode": "decode", "stage": "stage", "cervix": "cervix", "lesion": "lesion", "quality": "quality",
             "gate": "gate", "variants": "variants", "classify": "classify", "score": "score"}
    for name, method in inner.items():
        setattr(pipe, method, timed(name, getattr(pipe, method)))
    classify = pipe.classify
    pipe.classify = lambda images: (n_vars.__setitem__(0, n_vars[0] + len(images)), classify(images))[1]
    write = timed("write", writer.image)
    B = cfg.batch_images
    t0 = clock()
    for res in pipe.run(items[:B]):  # warm-up batch: not counted
        write(res)
    warm_s = clock() - t0
    warm = dict(acc)
    acc.update({k: 0.0 for k in acc})
    n_vars[0] = 0
    t0 = clock()
    for res in pipe.run(items):
        write(res)
    total_s = clock() - t0
    n = len(items)
    # a method that calls another (prepare -> stage, cervix, lesion) is timed by its parts only
    steps = {k: {"ms_per_image": 1000 * acc[k] / n, "share": acc[k] / max(1e-12, sum(acc.values()))}
             for k, _ in STEPS if acc.get(k, 0.0) > 0}
    return {"images": n, "batches": -(-n // B), "batch_images": B, "classifier_inputs": n_vars[0],
            "steps": steps, "sum_ms_per_image": 1000 * sum(acc.values()) / n, "loop_ms_per_image": 1000 * total_s / n,
            "warmup_batch_ms_per_image": 1000 * warm_s / max(1, min(B, n)),
            "warmup_steps_ms": {k: 1000 * x for k, x in warm.items() if x > 0}, "crop": cfg.crop, **_rss()}


def run_onnx(spec: dict) -> dict:
    """Each network exported to ONNX and timed with onnxruntime against torch on the pipeline's own inputs."""
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    import onnxruntime as ort

    from cervscan.pipeline.steps import Pipeline
    from cervscan.files import discover_visits
    from cervscan.pipeline.steps import crop_to_box
    from cervscan.pipeline.transforms import resize_square, to_tensor_batch

    note = ""
    try:
        import onnx  # noqa: F401
    except ImportError:
        # The TorchScript exporter imports onnx only to insert custom onnx-script functions into the
        # model; these networks have none, so that step is skipped. onnxruntime checks the result.
        from torch.onnx._internal.torchscript_exporter import onnx_proto_utils, utils as ts_utils

        def _no_functions(model_bytes, custom_opsets):
            return model_bytes

        onnx_proto_utils._add_onnxscript_fn = _no_functions
        if hasattr(ts_utils, "onnx_proto_utils"):
            ts_utils.onnx_proto_utils._add_onnxscript_fn = _no_functions
        note = "The onnx package is not installed: exported without the exporter's onnx-script function step"

    pipe = Pipeline.from_config(**_load_kwargs(spec))
    cfg = pipe.cfg
    B = cfg.batch_images
    items = [p for v in discover_visits([spec["visits"]]) for p in v.images][:B]
    rgbs = [pipe.decode(p).rgb for p in items]
    cervices = pipe.cervix(rgbs)
    crops = [crop_to_box(im, box) for im, (_, box, _, _) in zip(rgbs, cervices)]
    prepared = pipe.prepare(rgbs)
    variants = [im for p in prepared for im in pipe.variants(p).values()]

    def inp(role, images):
        m = pipe.models[role]
        return to_tensor_batch([resize_square(im, m.size) for im in images], m.ckpt["mean"], m.ckpt["std"])

    nets = [("stage", rgbs), ("cervix", rgbs), ("segmenter", crops), ("classifier", variants)]
    so = ort.SessionOptions()
    so.intra_op_num_threads = spec["threads"]
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    out_dir = Path(spec["out"])
    out_dir.mkdir(parents=True, exist_ok=True)
    reps = int(spec.get("onnx_reps", 5))
    res = {}
    for role, images in nets:
        if role not in pipe.models:
            continue
        m = pipe.models[role]
        x = inp(role, images)
        xt = x.contiguous(memory_format=torch.channels_last) if m.ckpt["kind"] == "segmenter" else x
        path = out_dir / f"{role}.onnx"
        torch.onnx.export(m.net, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        xn = x.numpy()

        def t_torch():
            with torch.inference_mode():
                return m.net(xt).float().numpy()

        def t_ort():
            return sess.run(None, {"x": xn})[0]

        yt, yo = t_torch(), t_ort()  # warm-up, and the outputs compared
        tt, to = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            t_torch()
            tt.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            t_ort()
            to.append(time.perf_counter() - t0)
        if m.ckpt["kind"] == "segmenter":
            pt, po = 1 / (1 + np.exp(-yt)), 1 / (1 + np.exp(-yo))
            thr = (float(m.ckpt.get("mask_threshold") or 0.5) if role == "cervix" else cfg.voting.mask_threshold)
            mask_diff = float(((pt > thr) != (po > thr)).mean())
        else:
            T = pipe.temperature if role == "classifier" else 1.0

            def sm(z):
                z = z / T - (z / T).max(1, keepdims=True)
                return np.exp(z) / np.exp(z).sum(1, keepdims=True)

            pt, po = sm(yt), sm(yo)
            mask_diff = None
        per = len(rgbs)  # screened images this batch stands for
        res[role] = {"batch": int(x.shape[0]), "input": int(x.shape[-1]), "images": per,
                     "torch_ms_per_image": 1000 * statistics.median(tt) / per,
                     "onnx_ms_per_image": 1000 * statistics.median(to) / per,
                     "max_abs_diff_output": float(np.abs(yt - yo).max()),
                     "max_abs_diff_prob": float(np.abs(pt - po).max()),
                     "mask_pixels_differing": mask_diff, "onnx_mb": path.stat().st_size / 2**20}
    return {"networks": res, "reps": reps, "onnxruntime": ort.__version__, "note": note, **_rss()}


def child(mode: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    fn = {"optimised": run_optimised, "naive": run_naive, "steps": run_steps, "onnx": run_onnx}[mode]
    print("RESULT " + json.dumps(fn(spec)), flush=True)


def spawn(mode: str, spec: dict, folder: Path, required: bool = True) -> dict:
    sp = folder / f"spec-{mode}.json"
    sp.write_text(json.dumps(spec), encoding="utf-8")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--child", mode, str(sp)], capture_output=True, text=True)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        msg = f"{mode} failed (exit {p.returncode}):\n{p.stderr[-3000:]}"
        if required:
            sys.exit(msg)
        print(msg, file=sys.stderr)
        return {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:300]}
    r = json.loads(line[0][7:])
    r["process_wall_s"] = time.perf_counter() - t
    return r


# --------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every measured process")
    ap.add_argument("--batch-images", type=int, default=None, help="images per batch (default: screen's)")
    ap.add_argument("--workers", type=int, default=0,
                    help="also measure the optimised path with a DataLoader of this many worker processes")
    ap.add_argument("--stage-model", help="exam-stage checkpoint (file or run folder)")
    ap.add_argument("--cervix-model", help="cervix finder checkpoint (file or run folder)")
    ap.add_argument("--seg-model", help="lesion segmenter checkpoint (file or run folder)")
    ap.add_argument("--cls-model", help="classifier checkpoint (file or run folder)")
    ap.add_argument("--onnx", action="store_true", help="also time onnxruntime against torch, network by network")
    ap.add_argument("--onnx-reps", type=int, default=5)
    ap.add_argument("--classify-batch", type=int, default=None,
                    help="classifier inputs per forward pass on a CPU (config key classify_batch; default: screen's, "
                         "0 = as many as hold 6 x 160 x 160 pixels)")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite benchmarks/RESULTS.md")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (outputs of every path)")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "SPEC"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="cervscan-bench-"))
    try:
        res = measure(a, tmp, load_before)
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=2))
    if not a.no_write:
        write_results(res, a)
        print(f"wrote {RESULTS.relative_to(ROOT)}", file=sys.stderr)


def measure(a, tmp: Path, load_before) -> dict:
    import torch

    from cervscan.pipeline.steps import Pipeline

    mix = pick_images(a.images, tmp / "visits")
    models, overrides, crop_note = resolve_models(a, tmp)
    config_file = None
    if a.classify_batch is not None:
        config_file = tmp / "speed.toml"
        config_file.write_text(f"classify_batch = {int(a.classify_batch)}\n", encoding="utf-8")
    # the configuration screen resolves (checkpoint < config file < options), shared by every path
    pipe = Pipeline.from_config(**{OPTION[r]: m["path"] for r, m in models.items()}, overrides=overrides,
                             device="cpu", batch_images=a.batch_images,
                             config_file=str(config_file) if config_file else None)
    for role, m in models.items():
        lm = pipe.models.get(role)
        if lm is not None:
            ck = lm.ckpt
            m.update(label=lm.label, name=ck.get("name"), version=ck.get("version"), arch=ck["arch"],
                     form=ck["form"], input_size=list(ck["input_size"]))
    config = pipe.cfg.to_dict()
    del pipe
    spec = {"visits": str(tmp / "visits"), "models": models, "overrides": overrides, "threads": a.threads,
            "config_file": str(config_file) if config_file else None,
            "batch_images": a.batch_images, "workers": 0, "config": config, "onnx_reps": a.onnx_reps}
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "images": mix, "models": models, "crop": crop_note,
                 "batch_images": config["batch_images"], "variants": list(config["voting"]["variants"]),
                 "classify_view": config.get("classify_view", "crop"), "classify_batch": config.get("classify_batch")}
    res["naive"] = spawn("naive", {**spec, "out": str(tmp / "out-naive")}, tmp)
    res["optimised"] = spawn("optimised", {**spec, "out": str(tmp / "out-optimised")}, tmp)
    if a.workers:
        res[f"optimised_workers{a.workers}"] = spawn(
            "optimised", {**spec, "workers": a.workers, "out": str(tmp / f"out-workers{a.workers}")}, tmp)
    res["steps"] = spawn("steps", {**spec, "out": str(tmp / "out-steps")}, tmp)
    if a.onnx:
        res["onnx"] = spawn("onnx", {**spec, "out": str(tmp / "onnx")}, tmp, required=False)
    for k, r in res.items():
        if k in ("naive",) or k.startswith("optimised"):
            r["images_per_s"] = r["images"] / r["screen_s"]
    # same thing computed? per-image scores of both paths
    so, sn = res["optimised"].pop("scores"), res["naive"].pop("scores")
    for k in res:
        if k.startswith("optimised_workers"):
            res[k].pop("scores", None)
    common = [k for k in so if k in sn and so[k] is not None]
    thr = config["threshold"]
    res["agreement"] = {"images": len(common),
                        "max_abs_score_diff": max((abs(so[k] - sn[k]) for k in common), default=None),
                        "same_decision": sum((so[k] > thr) == (sn[k] > thr) for k in common)}
    res["speedup"] = res["optimised"]["images_per_s"] / res["naive"]["images_per_s"]
    o = res["optimised"]
    res["targets"] = {
        "images_per_s": {"target": f">= {TARGET_IPS:g}", "value": o["images_per_s"], "met": o["images_per_s"] >= TARGET_IPS},
        "speedup": {"target": f">= {TARGET_SPEEDUP:g}x naive", "value": res["speedup"], "met": res["speedup"] >= TARGET_SPEEDUP},
        "peak_rss_mb": {"target": f"<= {TARGET_RSS_MB:g} MB", "value": o["peak_rss_mb"], "met": o["peak_rss_mb"] <= TARGET_RSS_MB},
        "peak_rss_goal_mb": {"target": f"<= {GOAL_RSS_MB:g} MB (goal)", "value": o["peak_rss_mb"],
                             "met": o["peak_rss_mb"] <= GOAL_RSS_MB},
    }
    res["machine"] = {"cpu_count": os.cpu_count(), "threads": a.threads, "torch": torch.__version__,
                      "python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                      "load_avg_before": list(load_before), "load_avg_after": list(os.getloadavg()),
                      "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "")}
    return res


# --------------------------------------------------------------------------- RESULTS.md

def _met(t: dict) -> str:
    return "met" if t["met"] else "**not met**"


def write_results(res: dict, a) -> None:
    start, end = "<!-- screen_speed:start -->", "<!-- screen_speed:end -->"
    mach, o, nv, st = res["machine"], res["optimised"], res["naive"], res["steps"]
    opts = "".join(f" --{flag} {getattr(a, attr)}" for flag, attr in (
        ("stage-model", "stage_model"), ("cervix-model", "cervix_model"), ("seg-model", "seg_model"),
        ("cls-model", "cls_model"), ("batch-images", "batch_images"), ("workers", "workers")) if getattr(a, attr))
    cmd = f"python benchmarks/screen_speed.py --images {a.images} --threads {a.threads}{opts}{' --onnx' if a.onnx else ''}"
    model_rows = "".join(
        f"| {role} | `{m.get('label', '?')}` | {m.get('arch', '?')} ({m.get('form', '?')}) | "
        f"{'x'.join(str(s) for s in m.get('input_size', []))} | {m['source']} |\n"
        for role, m in res["models"].items())
    stand_ins = [r for r, m in res["models"].items() if m["source"].startswith("stand-in")]
    stand_note = (f"\nNo {' and no '.join(stand_ins)} model was found (`weights.resolve`), "
                  f"so {'they were' if len(stand_ins) > 1 else 'it was'} measured with a stand-in of the architecture the "
                  f"training command produces, with random weights: speed does not depend on the weights, but "
                  f"the crop found (and so the cervix masks) does not mean anything.\n" if stand_ins else "")
    w = o["written"]
    extra = "".join(f"| optimised, `--workers {k.rsplit('workers', 1)[1]}` (DataLoader worker processes) | "
                    f"{v['images_per_s']:.2f} | {v['peak_rss_mb']:.0f} | {v['peak_rss_children_mb']:.0f} |\n"
                    for k, v in res.items() if k.startswith("optimised_workers"))
    step_rows = "".join(f"| {name} | {what} | {st['steps'][name]['ms_per_image']:.1f} | "
                        f"{100 * st['steps'][name]['share']:.1f} % |\n"
                        for name, what in STEPS if name in st["steps"])
    ag = res["agreement"]
    agree = (f"Same result: over {ag['images']} images the per-image scores of the two paths differ by at most "
             f"{ag['max_abs_score_diff']:.2g} and {ag['same_decision']}/{ag['images']} image decisions are the same."
             if ag["images"] else "No per-image scores to compare.")
    onnx_part = ""
    if "onnx" in res:
        ox = res["onnx"]
        if "error" in ox:
            onnx_part = f"\n### onnxruntime against torch\n\nNot measured: {ox['error']}\n"
        else:
            rows = "".join(_onnx_row(role, n) for role, n in ox["networks"].items())
            onnx_part = f"""
### onnxruntime against torch (`--onnx`; networks only, not a screening path)

Each network exported with `torch.onnx.export(dynamo=False, opset_version=17)` and run with onnxruntime
{ox['onnxruntime']} (CPU, {mach['threads']} intra-op threads) on the inputs the pipeline builds for the
first batch of {res['batch_images']} images; median of {ox['reps']} runs, ms per screened image (the classifier
runs the six variants of each image). Torch runs the networks as the pipeline loads them (channels_last
segmenters).{(' ' + ox['note'] + '.') if ox.get('note') else ''}

| network | batch x input | torch ms/image | onnxruntime ms/image | torch / onnxruntime | max abs diff, output | max abs diff, probability | mask pixels differing |
|---|---|---|---|---|---|---|---|
{rows}"""
    t = res["targets"]
    busy = ""
    if mach["load_avg_before"][0] > 0.5 * (mach["cpu_count"] or 1):
        busy = (f"\n**The machine was busy** (1-minute load {mach['load_avg_before'][0]:.1f} on {mach['cpu_count']} cores "
                f"before the run): these numbers are not representative; rerun on a quiet machine.")
    if res["images"]["n"] < 48:
        busy += (f"\nOnly {res['images']['n']} images: the first batch's cold start (oneDNN primitives built for "
                 f"each new input shape) weighs heavily on a run this short.")
    block = f"""{start}
## screen speed (`{cmd}`)

Measured {res['date']} on {mach['cpu_count']} CPU cores ({mach['processor']}), torch threads: {mach['threads']},
torch {mach['torch']}, Python {mach['python']}, no GPU{', OMP_NUM_THREADS=' + mach['omp_num_threads'] if mach['omp_num_threads'] else ''}.
Load average before the run: {', '.join(f'{x:.1f}' for x in mach['load_avg_before'])}
(after: {', '.join(f'{x:.1f}' for x in mach['load_avg_after'])}).{busy}
{res['images']['n']} real images from ../shared/data/visits: {res['images']['iarc']} IARC 800x600 and
{res['images']['annocerv']} AnnoCerv 384x384, {res['images']['patients']} patients. Crop mode: {res['crop']};
batches of {res['batch_images']} images; variants: {len(res['variants'])} ({', '.join(res['variants'])});
original view: {res.get('classify_view', 'crop')}; classifier inputs per forward pass on a CPU: {res.get('classify_batch') or 'auto (' + str(max(1, 6 * 160 * 160 // (res['models']['classifier']['input_size'][0] * res['models']['classifier']['input_size'][1]))) + ' at this input size)'}.

| role | model | architecture (form) | input | source |
|---|---|---|---|---|
{model_rows}{stand_note}
| path | images/s | peak RSS main process (MB) | peak RSS of its child processes (MB) |
|---|---|---|---|
| naive (image by image, training-form nets, NCHW, one classifier pass per variant, decode in the main thread) | {nv['images_per_s']:.2f} | {nv['peak_rss_mb']:.0f} | {nv['peak_rss_children_mb']:.0f} |
| optimised (`api.screen`, the pipeline) | {o['images_per_s']:.2f} | {o['peak_rss_mb']:.0f} | {o['peak_rss_children_mb']:.0f} |
{extra}
Speed-up (ratio, comparable across machines): **{res['speedup']:.2f}x**. Images/s from the time after the
models are loaded to the last image's files written (run.json `timings.screen_s` for the optimised
path); model loading: {o['load_models_s']:.1f} s optimised, {nv['load_models_s']:.1f} s naive. Files written by the
optimised path: {w['masks']} lesion masks, {w['cervix_masks']} cervix masks, {w['overlays']} overlays. {agree}

| target (2-core CPU) | value | status |
|---|---|---|
| >= {TARGET_IPS:g} images/s | {t['images_per_s']['value']:.2f} | {_met(t['images_per_s'])} |
| >= {TARGET_SPEEDUP:g}x the naive path | {t['speedup']['value']:.2f}x | {_met(t['speedup'])} |
| peak RSS (main process) <= {TARGET_RSS_MB:g} MB, today's | {t['peak_rss_mb']['value']:.0f} MB | {_met(t['peak_rss_mb'])} |
| goal: peak RSS <= {GOAL_RSS_MB:g} MB | {t['peak_rss_goal_mb']['value']:.0f} MB | {_met(t['peak_rss_goal_mb'])} |

### What each step costs

`Pipeline`'s step methods timed one by one (`time.perf_counter`) on {st['batches']} batches of
{st['batch_images']} images, after one untimed warm-up batch ({st['warmup_batch_ms_per_image']:.0f} ms per image
cold), in its own process; decoding here runs in the calling thread, where `screen` overlaps it with
the models in a background thread.

| step | what | ms per image | share |
|---|---|---|---|
{step_rows}| **sum** | | **{st['sum_ms_per_image']:.1f}** | 100 % |

For comparison, the optimised screening took {1000 / o['images_per_s']:.1f} ms per image (warm-up and
decoding overlap included).
{onnx_part}{end}"""
    from results_md import replace_block

    replace_block(start, end, block, RESULTS)


def _onnx_row(role: str, n: dict) -> str:
    mask = "" if n["mask_pixels_differing"] is None else f"{100 * n['mask_pixels_differing']:.3f} %"
    return (f"| {role} | {n['batch']} x {n['input']} px | {n['torch_ms_per_image']:.1f} | {n['onnx_ms_per_image']:.1f} | "
            f"{n['torch_ms_per_image'] / max(1e-9, n['onnx_ms_per_image']):.2f}x | {n['max_abs_diff_output']:.2g} | "
            f"{n['max_abs_diff_prob']:.2g} | {mask} |\n")


if __name__ == "__main__":
    main()
