"""Choose and check the thresholds of the image quality and eligibility gate on real images.

    python benchmarks/quality_gate.py [--visits ../shared/data/visits] [--cervix-model runs/cervix-192/model.pt]
                                      [--threads 1] [--no-write] [--cv-effect runs/cls-crop [--stage-model M]]

"Good" images: every image of the development data whose recorded exam stage is acetic acid
(``visits/images.csv``, mapped by ``cervscan.training.stage.stage_class``). From each, six degraded
copies are made, deterministically (NumPy generator seeded with ``SEED`` and the image's index):

| kind | what | parameters |
|---|---|---|
| gaussian_blur | out of focus | Gaussian blur, sigma = 1 % of the image's shorter side (6 px at 800x600) |
| motion_blur | camera shake | line kernel of length 4 % of the shorter side, angle uniform in [0, 180) |
| overexposed | +2 EV | linear light x 4 (sRGB as gamma 2.2), clipped |
| underexposed | -3 EV | linear light / 8 |
| glare | strong specular glare | 3-6 saturated white (255) elliptical patches (axis ratio 1-3, centred on cervix pixels, a soft rim outside) covering about 10 % of the cervix |
| out_of_frame | cervix cropped out of frame | the largest window (60 % down to 20 % of each side, 5 % steps; same pixel scale; 9x9 positions) that holds at most 10 % of the cervix (the smallest one's best position when none does) |

"The cervix" for glare and out_of_frame is the cervix finder's mask on the original (the centre crop
when it finds none). Every image, original or copy, is decoded as ``screen`` decodes it, and measured
through the pipeline's own steps: ``Pipeline.cervix`` (the cervix finder, crop mode ``cervix``) and
``Pipeline.quality``; the eligibility is ``Pipeline.gate`` (no stage model: the stage rule is not
measured here).

Threshold rule (printed): the false rejects allowed on new original images are 5 %. The cervix
finder's own verdict ("no cervix", ``cervix_min_fraction``, not tuned here) uses what it uses on the
originals; the rest is shared equally by the five thresholds (sharpness, brightness, overexposed, glare,
cervix size). Each threshold is the k-th most extreme value of the n originals, k = floor(share x (n + 1))
(at least 1), rounded to two significant digits towards rejecting less. A new image exchangeable with
the n originals falls beyond the k-th most extreme of them with probability k / (n + 1) <= share (the
rank argument of split-conformal prediction), so each threshold is expected to reject at most its share
of new images and the five together at most the budget (union bound). The first rule took the strictest
value rejecting at most the share *of the n originals themselves* (k = floor(share x n) + 1), which is
expected to reject (floor(share x n) + 1) / (n + 1) of new images, more than the share; its patient-wise
cross-check came out at 5.4 % and the rule was changed to this one (RESULTS.md keeps the history). Images
of one patient are correlated, so the guarantee is approximate: the cross-check checks it. The degraded
copies are not looked at when choosing. A 5-fold patient-wise cross-check (thresholds chosen by the same
rule on 4/5 of the patients, false rejects counted on the rest) estimates the false-reject rate on new
images. Catch rate = share of the degraded copies the gate
rejects (for any reason), over the copies of originals that the gate accepts.

Stage confidence: from the stage model's cross-validated predictions (``runs/stage/predictions.csv``,
else ``docs/training-runs/stage/predictions.csv``): for the stage policies acetic only and acetic +
Lugol's iodine, the smallest confidence at which at most 2 % of the images of a deciding stage are
rejected on stage.

``--cv-effect RUN``: the effect of the gate on cross-validated patient AUC, from ``RUN/image_predictions.csv``
(out-of-fold image scores: patient_id,image,label,score): each real image's eligibility is computed through
the pipeline (stage model, cervix finder, default thresholds and stage policy), then patient score = mean of
the eligible images' scores vs the mean of all.

Prints JSON and rewrites the ``quality_gate`` block of benchmarks/RESULTS.md (``--no-write``: don't).
Measures are cached in ``runs/quality-gate/`` (keyed by the image file, the model sha256 and the
degradation parameters).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

# The threshold rule (module docstring) lives in the package: ``cervscan adapt`` applies it to a site's images.
from cervscan.pipeline.quality import FALSE_REJECT_BUDGET as BUDGET  # false rejects allowed on the originals
from cervscan.pipeline.quality import THRESHOLD_RULES as RULES  # measure, GateConfig field, direction, reason
from cervscan.pipeline.quality import choose_threshold as choose  # noqa: F401 - the benchmark's name
from cervscan.pipeline.quality import choose_thresholds  # noqa: F401 - used by main and crosscheck
from cervscan.pipeline.quality import round_towards_less as _round  # noqa: F401 - the benchmark's name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
START, END = "<!-- quality_gate:start -->", "<!-- quality_gate:end -->"
SEED = 20261128
TARGET_CATCH = 0.95
STAGE_FALSE_REJECT = 0.02
KINDS = ("gaussian_blur", "motion_blur", "overexposed", "underexposed", "glare", "out_of_frame")
PARAMS = {"gaussian_blur": {"sigma_of_shorter_side": 0.01}, "motion_blur": {"length_of_shorter_side": 0.04},
          "overexposed": {"ev": 2.0, "gamma": 2.2}, "underexposed": {"ev": -3.0, "gamma": 2.2},
          "glare": {"coverage_of_cervix": 0.10, "patches": [3, 6]},
          "out_of_frame": {"window_sides": [0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2],
                           "max_cervix_share": 0.10, "grid": 9}}

# --------------------------------------------------------------------------- degradations

def _exposure(rgb: np.ndarray, ev: float, gamma: float = 2.2) -> np.ndarray:
    lin = (rgb.astype(np.float32) / 255.0) ** gamma * (2.0 ** ev)
    return np.clip(np.rint(np.clip(lin, 0, 1) ** (1 / gamma) * 255), 0, 255).astype(np.uint8)


def _motion_kernel(length: int, angle: float) -> np.ndarray:
    import cv2

    k = np.zeros((length, length), np.float32)
    c = (length - 1) / 2
    dx, dy = math.cos(math.radians(angle)) * c, math.sin(math.radians(angle)) * c
    cv2.line(k, (int(round(c - dx)), int(round(c - dy))), (int(round(c + dx)), int(round(c + dy))), 1.0, 1,
             lineType=cv2.LINE_AA)
    return k / k.sum()


def _glare(rgb: np.ndarray, cervix: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    import cv2

    h, w = rgb.shape[:2]
    area = float(cervix.sum())
    n = int(rng.integers(3, 7))
    ys, xs = np.nonzero(cervix)
    m = np.zeros((h, w), np.float32)
    for _ in range(n):
        i = int(rng.integers(0, ys.size))
        ratio = float(rng.uniform(1.0, 3.0))
        b = math.sqrt(area * PARAMS["glare"]["coverage_of_cervix"] / n / (math.pi * ratio))
        a = b * ratio
        cv2.ellipse(m, (int(xs[i]), int(ys[i])), (max(1, int(round(a))), max(1, int(round(b)))),
                    float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    # a soft rim outside each patch; inside it the patch is saturated white
    m = np.clip(2.0 * cv2.GaussianBlur(m, (0, 0), max(0.5, 0.01 * math.sqrt(area))), 0, 1)[..., None]
    return np.clip(np.rint(rgb.astype(np.float32) * (1 - m) + 255.0 * m), 0, 255).astype(np.uint8)


def _out_of_frame(rgb: np.ndarray, cervix: np.ndarray) -> np.ndarray:
    """The largest window (same pixel scale) that holds at most ``max_cervix_share`` of the cervix."""
    h, w = rgb.shape[:2]
    prm = PARAMS["out_of_frame"]
    ii = np.cumsum(np.cumsum(np.pad(cervix.astype(np.int64), ((1, 0), (1, 0))), 0), 1)
    total = max(1, int(cervix.sum()))
    cy, cx = np.argwhere(cervix).mean(0) if cervix.any() else (h / 2, w / 2)
    best = None
    for f in prm["window_sides"]:
        ww, wh = min(w, max(32, int(round(w * f)))), min(h, max(32, int(round(h * f))))
        best = None
        for y0 in np.linspace(0, h - wh, prm["grid"]).round().astype(int):
            for x0 in np.linspace(0, w - ww, prm["grid"]).round().astype(int):
                inside = ii[y0 + wh, x0 + ww] - ii[y0, x0 + ww] - ii[y0 + wh, x0] + ii[y0, x0]
                far = -((y0 + wh / 2 - cy) ** 2 + (x0 + ww / 2 - cx) ** 2)
                key = (int(inside), far)
                if best is None or key < best[0]:
                    best = (key, x0, y0, ww, wh)
        if best[0][0] <= prm["max_cervix_share"] * total:
            break
    _, x0, y0, ww, wh = best
    return np.ascontiguousarray(rgb[y0:y0 + wh, x0:x0 + ww])


def degrade(rgb: np.ndarray, kind: str, cervix: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One degraded copy; ``cervix``: the cervix (H x W, 0/1) the glare and out_of_frame copies refer to."""
    import cv2

    short = min(rgb.shape[:2])
    if kind == "gaussian_blur":
        return cv2.GaussianBlur(rgb, (0, 0), PARAMS[kind]["sigma_of_shorter_side"] * short)
    if kind == "motion_blur":
        length = max(3, int(round(PARAMS[kind]["length_of_shorter_side"] * short)) | 1)
        return cv2.filter2D(rgb, -1, _motion_kernel(length, float(rng.uniform(0, 180))),
                            borderType=cv2.BORDER_REFLECT)
    if kind in ("overexposed", "underexposed"):
        return _exposure(rgb, PARAMS[kind]["ev"], PARAMS[kind]["gamma"])
    if kind == "glare":
        return _glare(rgb, cervix, rng)
    if kind == "out_of_frame":
        return _out_of_frame(rgb, cervix)
    raise ValueError(kind)


# --------------------------------------------------------------------------- measuring

def acetic_images(visits: Path) -> list[tuple[str, str]]:
    from cervscan.training.stage import stage_class

    with open(visits / "images.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return sorted((r["patient_id"], r["image"]) for r in rows if stage_class(r["stage"]) == "acetic"
                  and (visits / r["patient_id"] / r["image"]).is_file())


def all_images(visits: Path) -> list[tuple[str, str]]:
    with open(visits / "images.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return sorted((r["patient_id"], r["image"]) for r in rows if (visits / r["patient_id"] / r["image"]).is_file())


def _sha(path: Path) -> str:
    from cervscan.models.registry import sha256_file

    return sha256_file(path)


def _pipeline(cervix_model: Path, stage_model: Path | None = None):
    from cervscan.config import ScreenConfig
    from cervscan.models.loading import load_model
    from cervscan.pipeline.steps import Pipeline

    models = {"cervix": load_model("cervix", cervix_model, "cpu")}
    if stage_model is not None:
        models["stage"] = load_model("stage", stage_model, "cpu")
    return Pipeline(models, ScreenConfig(crop="cervix"), "cpu")


def _located(pipe, rgbs: list[np.ndarray]):
    """Stage and cervix through the pipeline's own steps, as ``Pipeline.prepare`` runs them (without the
    lesion segmenter, which the gate does not use)."""
    from cervscan.pipeline.steps import Prepared

    stages = pipe.stage(rgbs)
    out = []
    for (st, conf), (mask, box, found, frac) in zip(stages, pipe.cervix(rgbs)):
        out.append(Prepared(original=None, segmented=None, empty_mask=False, lesion_fraction=0.0, stage=st,
                            stage_confidence=conf, cervix_found=found, cervix_fraction=frac, crop_box=box,
                            cervix_mask=mask))
    return out


def _record(q: dict, p) -> dict:
    return {**q, "cervix_found": p.cervix_found, "stage": p.stage, "stage_confidence": p.stage_confidence}


class Partial(Exception):
    """``--max-seconds`` ran out: what was measured is in the cache; run again to go on."""


def measure_set(pipe, visits: Path, items: list[tuple[str, str]], cache: dict, model_key: str,
                kinds: tuple[str, ...], log_every: int = 25, max_seconds: float = 0) -> dict:
    """(pid, image) -> {'original': measures, kind: measures, ...}; cached in ``cache``."""
    from cervscan.pipeline import quality as Q

    # the degradation parameters and the measuring code
    pkey = hashlib.sha1(json.dumps(PARAMS, sort_keys=True).encode() + Path(Q.__file__).read_bytes()).hexdigest()[:10]
    out: dict = {}
    t0 = time.time()
    for k, (pid, name) in enumerate(items):
        path = visits / pid / name
        st = path.stat()
        key = f"{pid}/{name}|{st.st_size}|{st.st_mtime_ns}|{model_key}|{pkey}|{'+'.join(kinds)}"
        if key in cache:
            out[(pid, name)] = cache[key]
            continue
        if max_seconds and time.time() - t0 > max_seconds:
            raise Partial(f"{sum(1 for it in items if it in out)}+ of {len(items)} images measured")
        rgb = pipe.decode(path).rgb
        p0 = _located(pipe, [rgb])[0]
        rec = {"original": _record(pipe.quality(rgb, p0), p0), "size": list(rgb.shape[:2])}
        if kinds:
            cerv = p0.cervix_mask if p0.cervix_found else None
            if cerv is None:
                from cervscan.pipeline.steps import centre_box

                x0, y0, x1, y1 = centre_box(rgb.shape[1], rgb.shape[0], pipe.cfg.centre_crop)
                cerv = np.zeros(rgb.shape[:2], np.uint8)
                cerv[y0:y1, x0:x1] = 1
            rng = np.random.default_rng([SEED, k])
            copies = [degrade(rgb, kind, cerv, rng) for kind in kinds]
            for kind, im, p in zip(kinds, copies, _located(pipe, copies)):
                rec[kind] = _record(pipe.quality(im, p), p)
        cache[key] = rec
        out[(pid, name)] = rec
        if log_every and (k + 1) % log_every == 0:
            print(f"  {k + 1}/{len(items)} images measured ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------- thresholds

def gate_cfg(**thresholds):
    from cervscan.config import GateConfig

    return GateConfig(**thresholds)


def reasons_of(m: dict, cfg) -> list[str]:
    from cervscan.pipeline import quality as Q

    return Q.gate(m, cfg, cervix_found=m["cervix_found"])


def evaluate_thresholds(data: dict, th: dict) -> dict:
    cfg = gate_cfg(**th)
    recs = list(data.values())
    orig_reasons = [reasons_of(r["original"], cfg) for r in recs]
    accepted = [not rs for rs in orig_reasons]
    res = {"false_reject": sum(bool(rs) for rs in orig_reasons) / len(recs), "n_originals": len(recs),
           "n_accepted": sum(accepted), "originals_by_reason": _count(orig_reasons), "kinds": {}}
    for kind in KINDS:
        if not recs or kind not in recs[0]:
            continue
        rs = [reasons_of(r[kind], cfg) for r in recs]
        acc_rs = [x for x, a in zip(rs, accepted) if a]
        res["kinds"][kind] = {
            "n": len(acc_rs), "caught": sum(bool(x) for x in acc_rs) / max(1, len(acc_rs)),
            "caught_all": sum(bool(x) for x in rs) / len(rs), "by_reason": _count(acc_rs)}
    per_rule = {}
    for measure, fld, direction, reason in RULES:
        per_rule[reason] = sum(reason in rs for rs in orig_reasons) / len(recs)
    per_rule["no_cervix"] = sum("no_cervix" in rs for rs in orig_reasons) / len(recs)
    res["originals_per_rule"] = per_rule
    return res


def _count(reason_lists: list[list[str]]) -> dict:
    """Primary reason counts (the first listed)."""
    c: dict[str, int] = {}
    for rs in reason_lists:
        if rs:
            c[rs[0]] = c.get(rs[0], 0) + 1
    return dict(sorted(c.items(), key=lambda kv: -kv[1]))


def crosscheck(data: dict, folds: int = 5) -> float:
    """Patient-wise k-fold: thresholds chosen on the other folds, false rejects on the held-out fold."""
    pids = sorted({pid for pid, _ in data})
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(pids))
    fold_of = {pids[i]: k % folds for k, i in enumerate(order)}
    rejected = total = 0
    for f in range(folds):
        train = [r["original"] for (pid, _), r in data.items() if fold_of[pid] != f]
        test = [r["original"] for (pid, _), r in data.items() if fold_of[pid] == f]
        th, _ = choose_thresholds(train)
        cfg = gate_cfg(**th)
        rejected += sum(bool(reasons_of(m, cfg)) for m in test)
        total += len(test)
    return rejected / max(1, total)


def stage_confidence_choice(pred_csv: Path) -> dict:
    """For each stage policy, the smallest confidence (on a 0.05 grid) at which at most 2 % of the images of a
    deciding stage would be rejected on stage; and what share of the other stages' images it rejects."""
    with open(pred_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = {"file": str(pred_csv.relative_to(ROOT) if pred_csv.is_relative_to(ROOT) else pred_csv), "policies": {}}
    grid = [round(x, 2) for x in np.arange(0.0, 1.0001, 0.05)]
    for name, stages in (("acetic", ("acetic",)), ("acetic+lugol", ("acetic", "lugol"))):
        dec = [r for r in rows if r["stage"] in stages]
        other = [r for r in rows if r["stage"] not in stages]
        curve = []
        for t in grid:
            fr = sum(r["predicted"] not in stages and float(r["confidence"]) >= t for r in dec) / len(dec)
            caught = sum(r["predicted"] not in stages and float(r["confidence"]) >= t for r in other) / len(other)
            curve.append({"confidence": t, "deciding_rejected": fr, "others_rejected": caught})
        chosen = next(c for c in curve if c["deciding_rejected"] <= STAGE_FALSE_REJECT)
        out["policies"][name] = {"n_deciding": len(dec), "n_other": len(other), "chosen": chosen,
                                 "curve": [c for c in curve if c["confidence"] in (0.0, 0.5, 0.6, 0.7, 0.8, 0.9)]}
    return out


# --------------------------------------------------------------------------- patient AUC with and without

def cv_effect(run: Path, visits: Path, pipe, cache: dict, model_key: str, max_seconds: float = 0) -> dict:
    from sklearn.metrics import roc_auc_score

    from cervscan.config import GateConfig
    from cervscan.pipeline import quality as Q

    with open(run / "image_predictions.csv", newline="", encoding="utf-8") as f:
        preds = list(csv.DictReader(f))
    with open(visits / "labels.csv", newline="", encoding="utf-8") as f:
        labels = {r["patient_id"]: int(r["label"]) for r in csv.DictReader(f) if r["label"].strip()}
    items = sorted({(r["patient_id"], r["image"]) for r in preds})
    data = measure_set(pipe, visits, items, cache, model_key, (), max_seconds=max_seconds)
    res = {"run": str(run), "patients": None, "images": len(preds), "policies": {}}
    for policy, stages in (("all", None), ("acetic", ("acetic",)), ("acetic+lugol", ("acetic", "lugol"))):
        cfg = GateConfig() if stages is None else GateConfig(decision_stages=stages)
        reasons = {}
        for key, rec in data.items():
            m = rec["original"]
            reasons[key] = Q.gate(m, cfg, stage=m["stage"] or "", stage_confidence=m["stage_confidence"],
                                  cervix_found=m["cervix_found"])
        elig = {k: not v for k, v in reasons.items()}
        by_pid: dict[str, list[tuple[float, bool]]] = {}
        for r in preds:
            by_pid.setdefault(r["patient_id"], []).append((float(r["score"]), elig[(r["patient_id"], r["image"])]))
        pids = sorted(p for p in by_pid if p in labels)
        y = np.array([labels[p] for p in pids])
        s_all = np.array([np.mean([s for s, _ in by_pid[p]]) for p in pids])
        s_gate = np.array([np.mean([s for s, e in by_pid[p] if e]) if any(e for _, e in by_pid[p]) else np.nan
                           for p in pids])
        none = np.isnan(s_gate)
        keep = ~none
        first: dict[str, int] = {}
        for rs in reasons.values():
            if rs:
                k = "stage" if rs[0].startswith("stage:") else rs[0]
                first[k] = first.get(k, 0) + 1
        res["patients"] = len(pids)
        res["auc_all_images"] = float(roc_auc_score(y, s_all))
        res["policies"][policy] = {
            "images_ineligible": int(sum(not e for e in elig.values())),
            "ineligible_by_reason": dict(sorted(first.items(), key=lambda kv: -kv[1])),
            "patients_without_eligible": int(none.sum()),
            "patients_without_eligible_severe": int(y[none].sum()),
            "auc_all_images_same_patients": float(roc_auc_score(y[keep], s_all[keep])),
            "auc_gate_decided": float(roc_auc_score(y[keep], s_gate[keep])),
            "auc_gate_inadequate_referred": float(roc_auc_score(y, np.where(none, 1.0, s_gate))),
            "bootstrap_delta": _bootstrap_delta(y[keep], s_all[keep], s_gate[keep]),
        }
    return res


def _bootstrap_delta(y, a, b, n: int = 2000) -> dict:
    """Paired patient bootstrap of AUC(b) - AUC(a): 95 % interval (:func:`cervscan.metrics.paired_auc_delta`)."""
    from cervscan.metrics import paired_auc_delta

    return paired_auc_delta(y, a, b, n=n, seed=SEED)


# --------------------------------------------------------------------------- report

def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def render(res: dict) -> str:
    th, how, ev = res["thresholds"], res["how"], res["evaluation"]
    lines = [START, "## quality gate (`python benchmarks/quality_gate.py`)", "",
             f"Measured {res['when']} on {res['images']} original acetic-acid images of {res['patients']} patients "
             f"(`{res['visits']}`, recorded stage mapped by `stage_class`), cervix finder `{res['cervix_model']}` "
             f"(sha256 {res['cervix_sha'][:12]}), through `Pipeline.cervix`, `Pipeline.quality` and `Pipeline.gate`. "
             f"Degraded copies: seed {SEED}; parameters in the script's docstring and below.", "",
             "**Rule** (never looked at the degraded copies; changed once, after the first results, see the history "
             f"below): at most {_pct(BUDGET)} of new original images may be rejected. The cervix finder's own "
             f"'no cervix' verdict rejects {_pct(how['no_cervix_rate'])} of the originals; the rest of the budget is "
             f"shared by the five thresholds, {_pct(how['share_per_threshold'])} each: each threshold is the k-th most "
             f"extreme value of the n = {how['n']} originals, k = floor(share x (n + 1)) (at least 1), rounded to two "
             "significant digits towards rejecting less. A new image exchangeable with the originals falls beyond it "
             "with probability k / (n + 1) <= share (the rank argument of split-conformal prediction), so each "
             "threshold is expected to reject at most its share of new images (it rejects k - 1 of the originals "
             "themselves), and the five together at most the budget.", "",
             "| threshold (config key) | chosen (new default) | originals it rejects |", "|---|---|---|"]
    per = ev["originals_per_rule"]
    for measure, fld, direction, reason in RULES:
        lines.append(f"| `{fld}` ({measure} {'<' if direction == 'min' else '>'} t: `{reason}`) | {th[fld]:g} | "
                     f"{_pct(per[reason])} |")
    lines.append(f"| (cervix finder: no cervix, `cervix_min_fraction` 0.03, unchanged) | – | {_pct(per['no_cervix'])} |")
    lines += ["", f"**False rejects on the originals: {_pct(ev['false_reject'])}** "
                  f"({ev['n_originals'] - ev['n_accepted']} of {ev['n_originals']}; target <= {_pct(BUDGET)}; "
                  f"first reason: {', '.join(f'{k} {v}' for k, v in ev['originals_by_reason'].items()) or 'none'}). "
                  f"Patient-wise 5-fold cross-check (thresholds chosen without the held-out patients): "
                  f"{_pct(res['crosscheck_false_reject'])}.", "",
              f"Catch rate per kind, over the degraded copies of the {ev['n_accepted']} originals the gate accepts "
              f"(target >= {_pct(TARGET_CATCH)}):", "",
              "| kind | parameters | caught | met | first reason (counts) | caught, copies of all originals |",
              "|---|---|---|---|---|---|"]
    for kind, k in ev["kinds"].items():
        met = "yes" if k["caught"] >= TARGET_CATCH else "**no**"
        params = ", ".join(f"{key} {val}" for key, val in PARAMS[kind].items())
        lines.append(f"| {kind} | {params} | **{_pct(k['caught'])}** | {met} "
                     f"| {', '.join(f'{r} {n}' for r, n in k['by_reason'].items())} | {_pct(k['caught_all'])} |")
    missed = [k for k, v in ev["kinds"].items() if v["caught"] < TARGET_CATCH]
    lines.append("")
    if missed:
        lines.append(f"Not met: {', '.join(missed)}: at this false-reject budget the gate does not catch "
                     f"{TARGET_CATCH:.0%} of these copies; the thresholds were not tuned on the copies to hide it.")
    else:
        lines.append(f"Every kind is caught at least {TARGET_CATCH:.0%} of the time at {_pct(ev['false_reject'])} "
                     "false rejects.")
    lines += ["", "How these measures came about (said so that the catch rates are read as what they are): a first "
              "version measured sharpness as the variance of the Laplacian and glare as bright, colourless pixels, "
              "inside the finder's mask (not its convex hull). With the same threshold rule it caught Gaussian blur "
              "100 %, motion blur 67 %, over-exposure 98 %, under-exposure 100 %, glare about 10 % and out-of-frame "
              "83 %. Two of those were faults of the copies: the glare patches were feathered so widely that only "
              "about 2 % of the cervix ended up saturated (not the intended 10 %), and a fixed half-size window "
              "could not leave a cervix that fills the frame (AnnoCerv) out of it; both copies were fixed as "
              "documented above. The measures were then changed, to the re-blur sharpness (any direction, "
              "contrast-free), glare as saturated white, and the mask's convex hull. That version caught motion "
              "blur 94.0 % (short of the target) and rejected 3.6 % of the originals in-sample but 5.4 % in the "
              "patient-wise cross-check (above the target). After those results two more things were changed, and "
              "the numbers above are the fourth measurement: (1) the sharpness's diagonal directions re-blurred along "
              "the diagonal of an 11 x 11 box (15.6 px long, not 11) and differentiated over a 2.8 px step, so a "
              "diagonal motion blur lost less there and the minimum over the directions came, in effect, from 0 and "
              "90 degrees (most missed copies were blurred at 30-65 or 110-135 degrees); now every direction "
              "re-blurs with a line of the same 11 px length and uses the directional derivative. With those four "
              "directions (third measurement, in the history) motion blur was caught 98.4 %, but a new test that "
              "blurs real images at fixed angles found a sharp image whose copy blurred 22.5 degrees off every "
              "direction measured 0.48, above the threshold; the measure now takes eight directions (every 22.5 "
              "degrees). (2) The rule "
              "allowed each threshold 1 % of the originals *in-sample* (the strictest value rejecting at most "
              "floor(1 % x n) of them), which is expected to reject more than 1 % of new images; it now takes the "
              "k = floor(1 % x (n + 1))-th most extreme value, as stated above. The rule was changed because the "
              "cross-check was above the target, so the cross-check below is not a fresh, untouched estimate. The "
              "thresholds are still chosen on the originals only, the degradation parameters were not changed, and "
              "nothing was changed after this table.", "",
              "History (false rejects in-sample / patient-wise cross-check; caught per kind: Gaussian blur, motion "
              "blur, over-exposure, under-exposure, glare, out of frame):", "",
              "- first version (Laplacian variance, bright colourless glare, finder's mask; copies before their "
              "fixes): thresholds at 1 % of the originals in-sample; caught 100 / 67 / 98 / 100 / about 10 / 83 %.",
              "- 2026-11-28 17:56 (re-blur sharpness with the longer diagonals, saturated glare, convex hull; rule "
              "in-sample 1 % each): `min_sharpness` 0.46, `min_brightness` 82, `max_overexposed` 0.45, `max_glare` "
              "0.016, `min_cervix_px` 250; false rejects 3.6 % / 5.4 %; caught 100 / 94.0 / 98.6 / 100 / 100 / 97.0 %.",
              "- 2026-11-28 19:07 (equal-length directional re-blur in 4 directions; rule k = floor(share x (n + 1))): "
              "`min_sharpness` 0.46, `min_brightness` 74, `max_overexposed` 0.52, `max_glare` 0.016, `min_cervix_px` "
              "250; false rejects 2.5 % / 3.6 %; caught 100 / 98.4 / 97.7 / 100 / 100 / 97.0 %.",
              f"- {res['when']} (this table: the same in 8 directions): "
              + ", ".join(f"`{fld}` {th[fld]:g}" for _, fld, _, _ in RULES)
              + f"; false rejects {_pct(ev['false_reject'])} / {_pct(res['crosscheck_false_reject'])}; caught "
              + " / ".join(f"{100 * k['caught']:.1f}" for k in ev["kinds"].values()) + " %.", "",
              f"The patient-wise cross-check puts the false-reject rate on new images at "
              f"{_pct(res['crosscheck_false_reject'])}, "
              + ("within" if res["crosscheck_false_reject"] <= BUDGET else "above")
              + f" the {_pct(BUDGET)} target; the thresholds sit at the 1 % tails of {ev['n_originals']} images, "
              "which move from sample to sample, and images of one patient are correlated."]
    sc = res["stage"]
    lines += ["", f"**Stage confidence** (`stage_min_confidence`), from the stage model's cross-validated predictions "
                  f"(`{sc['file']}`): the smallest confidence (0.05 steps) at which at most {_pct(STAGE_FALSE_REJECT)} "
                  "of the images of a deciding stage are rejected on stage.", "",
              "| policy (`decision_stages`) | images of deciding / other stages | confidence | deciding stage rejected | other stages rejected |",
              "|---|---|---|---|---|"]
    for name, p in sc["policies"].items():
        c = p["chosen"]
        lines.append(f"| {name} | {p['n_deciding']} / {p['n_other']} | {c['confidence']:.2f} | "
                     f"{_pct(c['deciding_rejected'])} | {_pct(c['others_rejected'])} |")
    lines += ["", f"Default `stage_min_confidence`: {res['stage_min_confidence']:.2f} (the stricter of the two); "
                  "`decision_stages`: the classifier checkpoint's (acetic for weights 2.0.0, chosen by the "
                  "patient-decision measurement, block `decision`); all five for a checkpoint that names none."]
    cv = res.get("cv_effect")
    if cv:
        lines += ["", f"### Effect on cross-validated patient AUC (`--cv-effect {cv['run']}`)", "",
                  f"Out-of-fold image scores of `{cv['run']}/image_predictions.csv` ({cv['images']} images, "
                  f"{cv['patients']} patients); each image's eligibility through the pipeline (stage model "
                  f"`{cv.get('stage_model', '')}`, cervix finder `{res['cervix_model']}`, the default thresholds above). "
                  f"Patient score = mean of the eligible images' scores, against the mean of all its images' scores "
                  f"(no gate: AUC **{cv['auc_all_images']:.3f}**, {cv['patients']} patients). The rows show what each "
                  f"stage policy would do, with `stage_min_confidence` {res['stage_min_confidence']:.2f}, for this "
                  "classifier (fine-tuned on every stage, weights 1.2.0). For the shipped 2.0.0 decision the gate's "
                  "effect is measured by refitting it with and without the gate on the same folds (block `decision`, "
                  "`cervscan train-decision --no-quality-gate`).", "",
                  "| stage policy | images not eligible (first reason) | patients without an eligible image (severe) "
                  "| AUC no gate, same patients | **AUC gate** | gate - no gate (95 % CI, paired bootstrap) "
                  "| AUC gate, inadequate counted as referred (all patients) |",
                  "|---|---|---|---|---|---|---|"]
        for name, c in cv["policies"].items():
            why = ", ".join(f"{k} {v}" for k, v in c["ineligible_by_reason"].items()) or "–"
            d = c["bootstrap_delta"]
            lines.append(f"| {name} | {c['images_ineligible']} ({why}) | "
                         f"{c['patients_without_eligible']} ({c['patients_without_eligible_severe']}) | "
                         f"{c['auc_all_images_same_patients']:.3f} | **{c['auc_gate_decided']:.3f}** | "
                         f"{d['delta']:+.3f} ({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}) | "
                         f"{c['auc_gate_inadequate_referred']:.3f} |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_block(text: str) -> None:
    from results_md import replace_block

    replace_block(START, END, text, RESULTS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--visits", type=Path, default=ROOT.parent / "shared" / "data" / "visits")
    ap.add_argument("--cervix-model", type=Path, default=ROOT / "runs" / "cervix-192" / "model.pt")
    ap.add_argument("--stage-model", type=Path, default=None,
                    help="for --cv-effect (default runs/stage/model.pt, else weights/stage.pt)")
    ap.add_argument("--cv-effect", type=Path, default=None, help="a train-cls --folds run with image_predictions.csv")
    ap.add_argument("--limit", type=int, default=0, help="only the first N acetic images (a quick look)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "quality-gate" / "measures.json")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=0,
                    help="stop measuring after this long (the cache keeps what was measured; run again to go on)")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    cache = json.loads(a.cache.read_text()) if a.cache.is_file() else {}

    def save_cache():
        a.cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(a.cache)

    sha = _sha(a.cervix_model)
    pipe = _pipeline(a.cervix_model)
    items = acetic_images(a.visits)
    if a.limit:
        items = items[:a.limit]
    print(f"measuring {len(items)} acetic-acid images and {len(KINDS)} degraded copies of each", file=sys.stderr)
    try:
        data = measure_set(pipe, a.visits, items, cache, sha[:16], KINDS, max_seconds=a.max_seconds)
    except Partial as e:
        save_cache()
        print(f"partial: {e}; run again", file=sys.stderr)
        return 3
    finally:
        save_cache()
    th, how = choose_thresholds([r["original"] for r in data.values()])
    print(f"rule: false rejects on originals <= {BUDGET:.0%}; no-cervix uses {how['no_cervix_rate']:.1%}; "
          f"each of {len(RULES)} thresholds gets {how['share_per_threshold']:.2%} -> {th}", file=sys.stderr)
    ev = evaluate_thresholds(data, th)
    pred = ROOT / "runs" / "stage" / "predictions.csv"
    if not pred.is_file():
        pred = ROOT / "docs" / "training-runs" / "stage" / "predictions.csv"
    stage = stage_confidence_choice(pred)
    res = {"when": time.strftime("%Y-%m-%d %H:%M"), "visits": os.path.relpath(a.visits, ROOT),
           "cervix_model": os.path.relpath(a.cervix_model, ROOT), "cervix_sha": sha,
           "images": len(data), "patients": len({p for p, _ in data}), "params": PARAMS, "thresholds": th,
           "how": how, "evaluation": ev, "crosscheck_false_reject": crosscheck(data), "stage": stage,
           "stage_min_confidence": max(p["chosen"]["confidence"] for p in stage["policies"].values()),
           "python": platform.python_version()}
    if a.cv_effect:
        sm = a.stage_model or next((p for p in (ROOT / "runs" / "stage" / "model.pt", ROOT / "weights" / "stage.pt")
                                    if p.is_file()), None)
        if sm is None:
            raise SystemExit("--cv-effect needs a stage model (runs/stage/model.pt or weights/stage.pt)")
        spipe = _pipeline(a.cervix_model, sm)
        try:
            res["cv_effect"] = cv_effect(a.cv_effect, a.visits, spipe, cache,
                                         f"{sha[:16]}+{_sha(sm)[:16]}", a.max_seconds)
        except Partial as e:
            print(f"partial: {e}; run again", file=sys.stderr)
            return 3
        finally:
            save_cache()
        res["cv_effect"]["stage_model"] = os.path.relpath(sm, ROOT)
        res["cv_effect"]["run"] = os.path.relpath(a.cv_effect, ROOT)
    print(json.dumps(res, indent=1, default=str))
    if not a.no_write:
        write_block(render(res))
        print(f"wrote the quality_gate block of {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
