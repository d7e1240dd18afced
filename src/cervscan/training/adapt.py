"""``cervscan adapt VISITS --labels CSV -o RUN``: the patient decision made a site's own, from its labelled visits.

Built on the frozen classifier recipe (:mod:`cervscan.training.classifier`), whose functions it calls:

1. Every image of every labelled visit, of every exam stage, goes through the recipe's extraction with the
   installed (or given) stage model, cervix finder and lesion segmenter: quality measures, stage, cervix and
   the frozen backbone's features, cached by the models' hashes (a second run, or a run cut short and started
   again, reads what is cached).
2. The installed decision's settings: its classifier checkpoint, its gate (defaults < its ``decision_stages``)
   and threshold.
3. Candidates (:mod:`cervscan.training.adapt_candidates`): stage policy {the installed decision's deciding
   stages, every stage} x quality gate thresholds {installed, re-derived from the site's images of the deciding
   stages by the shipped rule, :func:`cervscan.pipeline.quality.choose_thresholds`} x fit {a class-balanced
   logistic regression on the local patients only, on them pooled with the shipped training patients'
   features (``classifier-training-features.npz`` of the weights)}, each measured on the same repeated local
   folds (the fold plan of ``train-cls``: local patients only in the test folds, shipped patients only ever
   trained on): mean over the repeats of the out-of-fold AUC on the patients it decides, and the share of the
   local patients it leaves inadequate. ``decision_stages`` (``--stages``), ``gate`` and ``pool`` fix a
   setting; every candidate is measured and recorded all the same.
4. The selection rule, written before any result was looked at: (1) a candidate leaving more than
   ``max_inadequate`` (10 %) of the local patients inadequate is not chosen, unless every candidate does;
   (2) among the rest, every candidate whose AUC is within ``choice_margin`` (0.01) of the best is tied with
   it; (3) of the tied, the one that departs least from the installed settings (one departure each: another
   stage policy, re-derived gate thresholds, a local-only fit where pooling was possible), then the higher
   AUC. The installed settings are kept unless a change gains more than 0.01 AUC.
5. Optimism: choosing among k candidates on the same folds flatters the chosen one's cross-validated AUC.
   The whole choice is therefore repeated inside every outer training fold (nested cross-validation, the
   same outer folds, the site gate re-derived from the outer training patients' images only), and the
   nested out-of-fold AUC, with its bootstrap CI, is the run's estimate (``nested``); the chosen candidate's
   own cross-validated AUC is reported beside it as optimistic. A nested CI reaching 0.5 makes the run not
   installable.
6. Calibration and the operating point for ``target_sensitivity`` on the local out-of-fold scores, bootstrap
   CIs, the validation against chance (:mod:`cervscan.training.validation`).
7. The installed decision on the same patients (a frozen-recipe classifier of the same backbone and input:
   its folded linear head on the cached features; any other: screened), against the adapted one: paired
   bootstrap of the AUC difference, sensitivity and specificity at each one's own threshold, inadequate rate
   of each under its own settings. Worse with a CI below 0 -> ``installable: false`` with the numbers.
8. A learning curve of the site's own data (local training patients drawn repeatedly, scored on the rest).
9. RUN/: ``model.pt`` (the adapted classifier, with ``site``), ``site.toml`` (gate thresholds, decision stages,
   threshold: ``cervscan screen --site RUN``), ``metrics.json``,
   ``comparison.json``, ``oof.csv`` and ``adapt.md`` (the site model card, :mod:`cervscan.training.sitecard`).

Refusals: fewer than ``min_per_class`` patients in a class (before anything is screened) unless ``force``; a
decision whose cross-validated AUC's CI reaches 0.5 writes no model.pt and raises
:class:`cervscan.training.validation.ValidationFailed` unless ``force``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from cervscan import __version__
from cervscan.config import STAGES, gate_from, load_config_file, voting_from
from cervscan.errors import CervscanError, DataError
from cervscan.files import atomic_write_json, atomic_write_text, check_overlap
from cervscan.metrics import paired_auc_delta, rank_auc
from cervscan.models import registry
from cervscan.models.networks import read_checkpoint
from cervscan.pipeline import quality
from cervscan.pipeline.screening import probe_writable
from cervscan.pipeline.steps import Pipeline
from cervscan.training import adapt_candidates as ac
from cervscan.training import classifier as frozen
from cervscan.training import sitecard
from cervscan.training.configs import AdaptConfig
from cervscan.training.splits import repeated_folds, strata
from cervscan.training.validation import enforce, label_check_lines

log = logging.getLogger(__name__)

POOLS = ("auto", "local", "pooled")


@dataclass
class _Installed:
    """The decision screening uses now: where it came from, its gate and threshold, and its per-patient scores
    on the local visits (probabilities; None: inadequate under its own settings)."""
    label: str
    sha256: str
    gate: object
    threshold: float
    how: str  # how its scores were computed
    scores: dict


def _check(cfg: AdaptConfig) -> None:
    if cfg.pool not in POOLS:
        raise CervscanError(f"--pool must be one of {', '.join(POOLS)}, not {cfg.pool!r}")
    if cfg.gate not in ac.GATES:
        raise CervscanError(f"--gate must be one of {', '.join(ac.GATES)}, not {cfg.gate!r}")
    for name, lo, hi in (("max_inadequate", 0.0, 1.0), ("choice_margin", 0.0, 0.5), ("false_reject_budget", 0.0, 0.5),
                         ("target_sensitivity", 0.5, 1.0)):
        v = getattr(cfg, name)
        if not lo <= v <= hi:
            raise CervscanError(f"{name} must lie in [{lo}, {hi}], not {v}")
    bad = [s for s in (cfg.decision_stages or ()) if s not in STAGES]
    if bad:
        raise CervscanError(f"decision stages: unknown {bad}; one or more of {', '.join(STAGES)}")
    if not (isinstance(cfg.folds, int) and 2 <= cfg.folds <= 20):
        raise CervscanError(f"--folds must be a whole number from 2 to 20, not {cfg.folds!r}")
    if not (isinstance(cfg.repeats, int) and 1 <= cfg.repeats <= 20):
        raise CervscanError(f"--repeats must be a whole number from 1 to 20, not {cfg.repeats!r}")


#: What ``adapt`` writes in RUN; a RUN holding anything else is not an adapt run and is refused.
RUN_FILES = frozenset({"oof.csv", "model.pt", "site.toml", "metrics.json", "comparison.json", "adapt.md"})


def _check_run_folder(out: Path) -> None:
    """RUN is a new or empty folder, or an earlier adapt run (only adapt's files, its metrics.json saying so),
    and writable; checked before anything is screened. Never a file, never a folder of someone else's files
    (a clinic's notes, an installed model's folder): adapt replaces only what adapt wrote."""
    if out.exists() and not out.is_dir():
        raise CervscanError(f"{out}: exists and is not a folder; give a new or empty folder for the run")
    if out.is_dir():
        names = {p.name for p in out.iterdir() if not p.name.startswith(".")}
        foreign = sorted(names - RUN_FILES)
        earlier = out / "metrics.json"
        try:
            is_adapt = not names or (earlier.is_file() and
                                     json.loads(earlier.read_text(encoding="utf-8")).get("command") == "adapt")
        except (OSError, ValueError):
            is_adapt = False
        if foreign or not is_adapt:
            what = f"holds {', '.join(foreign[:3])}" if foreign else "is not an earlier 'cervscan adapt' run"
            raise CervscanError(f"{out}: {what}; adapt writes only into a new or empty folder or its own earlier "
                                "run, and never replaces files it did not write")
    if out.is_dir():
        probe_writable(out)
        return
    parent = out.parent
    while not parent.exists():  # RUN is created at the end; here only: could it be?
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CervscanError(f"{out}: cannot be created ({parent} is not a writable folder)")


def _class_counts(cfg: AdaptConfig, visits, lab: dict, src: dict) -> tuple[dict, list[str]]:
    """Labelled patients with images per class and per source; too few in a class is refused unless ``force``
    (then, and under ``warn_per_class``, a warning)."""
    ids = [v.patient_id for v in visits]
    n = {c: sum(lab[p] == c for p in ids) for c in (0, 1)}
    by_src = {s or "unknown": {k: sum(lab[p] == c and src[p] == s for p in ids)
                               for c, k in ((0, "mildly_normal"), (1, "severe"))}
              for s in sorted({src[p] for p in ids})}
    counts = {"mildly_normal": n[0], "severe": n[1], "by_source": by_src}
    said = f"{n[1]} severe (label 1) and {n[0]} mildly normal (label 0) labelled patient(s) with images"
    warnings = []
    if cfg.folds > min(n.values()):
        raise DataError(f"{cfg.labels}: {said}; --folds {cfg.folds} needs at least {cfg.folds} of each class "
                        f"(every fold holds both): lower --folds or label more patients")
    if min(n.values()) < cfg.min_per_class:
        if not cfg.force:
            raise DataError(f"{cfg.labels}: {said} under {cfg.visits}; adapt needs at least {cfg.min_per_class} of "
                            f"each class ({cfg.warn_per_class} or more recommended). Label more patients; --force "
                            f"adapts anyway, and the site card says so")
        warnings.append(f"FORCED: {said}, fewer than {cfg.min_per_class} in a class; its numbers are very uncertain")
    elif min(n.values()) < cfg.warn_per_class:
        warnings.append(f"{said}: fewer than {cfg.warn_per_class} in a class, so the numbers below are uncertain "
                        f"(see the CIs and the learning curve)")
    return counts, warnings


def _stage_drop(site: ac.Site) -> dict:
    """How many of the local images the stage model drops on stage under the installed policy (the records
    carry the installed gate's reasons), and the stages it sees."""
    ok = [r for r in site.recs if r is not None]
    dropped = sum(any(x.startswith("stage:") for x in r["reason"].split(";")) for r in ok)
    return {"installed": list(site.installed_gate.decision_stages), "dropped_on_stage": dropped, "images": len(ok),
            "share": dropped / max(1, len(ok)), "predicted": {s: sum(r["stage"] == s for r in ok) for s in STAGES}}


def _stage_policy(drop: dict, key: str, stages) -> dict:
    """The stages that decide at this site, chosen with the candidate ``key``, with the stage model's drops."""
    why = (f"chosen by measurement with the candidate {key} (the selection rule); the stage model drops "
           f"{drop['dropped_on_stage']} of {drop['images']} local images ({drop['share']:.0%}) on stage under the "
           f"installed policy ({', '.join(drop['installed'])})")
    return {**drop, "stages": list(stages), "changed": set(stages) != set(drop["installed"]), "why": why}


def _gate_record(site: ac.Site, sets: dict, cand) -> dict:
    """The gate thresholds: installed, re-derived from the site's images (for the chosen stages) and in use."""
    fields = [f for _, f, _, _ in quality.THRESHOLD_RULES]
    derived = sets.get((cand.stages, "site"))
    used = sets[(cand.stages, cand.gate)].gate
    return {"chosen": cand.gate, "installed": {f: getattr(site.installed_gate, f) for f in fields},
            "derived": {f: getattr(derived.gate, f) for f in fields} if derived and derived.gate else None,
            "site": {f: getattr(used, f) for f in fields},
            "how": ({**derived.derived, "originals": "the local images of the deciding stages (stage model), every "
                                                     "one"} if derived and derived.derived else None),
            "rule": "each threshold the k-th most extreme value of the n local originals, k = floor(share x (n + 1)), "
                    "share = (budget - the cervix finder's own no-cervix rate) / 5, rounded to two significant "
                    "digits towards rejecting less (benchmarks/quality_gate.py, the shipped gate's rule)"}


def _installed(cfg: AdaptConfig, pipe, net, items: list, recs: list, lab: dict, src: dict) -> _Installed:
    """The installed (or ``cls_model``) decision on the local patients, under its own gate."""
    ref = registry.resolve("classifier", cfg.cls_model)
    ck = read_checkpoint(ref.path)
    gate = gate_from({}, {}, {}, ck)
    voting, thr, _ = voting_from(ck, {}, {})
    pids = list(dict.fromkeys(p for p, _ in items))
    why = _not_linear(cfg, ck, voting, net)
    if why:
        log.info("installed classifier %s: %s; screening the local visits with it", ref.label, why)
        scores = _screened_scores(cfg, items)
        return _Installed(ref.label, ref.sha256, gate, thr, f"screened ({why})", scores)
    ac.apply_gate(pipe, recs, gate)
    sd = ck["state_dict"]
    T = float(ck.get("temperature") or 1.0)
    W, B = sd["classifier.weight"].double().numpy(), sd["classifier.bias"].double().numpy()
    w, b = (W[1] - W[0]) / T, float(B[1] - B[0]) / T
    rc = cfg.recipe(gate.decision_stages)
    try:
        pats = frozen._patient_features(rc, pids, items, recs, lab, src)
    except DataError as e:
        log.warning("the installed decision leaves too few patients to compare: %s", e)
        return _Installed(ref.label, ref.sha256, gate, thr, "its folded linear head", dict.fromkeys(pids))
    z = sum(wt * (pats.V[v] @ w + b) for v, wt in voting.active_weights().items())
    scores = {**dict.fromkeys(pids), **dict(zip(pats.ids, (1.0 / (1.0 + np.exp(-z))).tolist()))}
    return _Installed(ref.label, ref.sha256, gate, thr, "its folded linear head on the cached features", scores)


def _not_linear(cfg: AdaptConfig, ck: dict, voting, net) -> str:
    """Why the installed classifier's score cannot be computed from the cached features ('' when it can)."""
    if ck.get("recipe") != "frozen-linear":
        return f"recipe {ck.get('recipe') or 'fine-tuned'}, not the frozen one"
    if ck.get("arch") != f"tf_efficientnet_{cfg.backbone}" or list(ck.get("input_size")) != [cfg.input_size] * 2:
        return f"{ck.get('arch')} at {ck.get('input_size')} px, not {cfg.backbone} at {cfg.input_size} px"
    if ck.get("classify_view") != cfg.classify_view or voting.pooling != "logit" \
            or not set(voting.variants) <= set(cfg.variants):
        return "other views, variants or pooling"
    sd = ck["state_dict"]
    for k, v in list(net.state_dict().items())[:8]:
        if k not in sd or not torch.allclose(sd[k].float(), v.float(), rtol=1e-3, atol=1e-3):
            return "its backbone is not the frozen ImageNet one"
    return ""


def _screened_scores(cfg: AdaptConfig, items: list) -> dict:
    """Patient scores of the installed decision through the screening pipeline (its own settings)."""
    pipe = Pipeline.from_config(seg_model=cfg.seg_model, cls_model=cfg.cls_model, cervix_model=cfg.cervix_model,
                                stage_model=cfg.stage_model, write_masks=False, write_overlays=False)
    by_pid: dict[str, list[dict]] = {}
    for res in pipe.run(items):
        by_pid.setdefault(res.record["patient_id"], []).append(res.record)
    return {pid: pipe.aggregate(pid, rs)["score"] for pid, rs in by_pid.items()}


# --------------------------------------------------------------------------- fitting

def _shipped_patients(cfg: AdaptConfig, rc, refs: dict) -> tuple[tuple | None, dict]:
    """The shipped training patients' rows (X: one row per patient and training view, y) for pooled fits, and
    what they are; None (with the reason) when there are none or they do not fit this recipe."""
    try:
        path = Path(cfg.training_features) if cfg.training_features else None
        if path is None:
            ref = registry.shipped_file(registry.TRAINING_FEATURES)
            path = ref.path if ref else None
        if path is None:
            return None, {"available": False, "why": "the weights ship no classifier-training-features.npz"}
        z = np.load(path, allow_pickle=False)
        meta = sitecard.json_of(z["meta"])
    except (OSError, ValueError, KeyError, CervscanError) as e:
        return None, {"available": False, "why": f"cannot read the shipped training features ({e})"}
    r = meta.get("recipe", {})
    want = {"backbone": rc.backbone, "input_size": rc.input_size, "classify_view": rc.classify_view}
    if any(r.get(k) != v for k, v in want.items()) or any(v not in z.files for v in rc.train_variants):
        return None, {"available": False, "why": f"{path}: features of {r}, not of this recipe {want}"}
    info = {"available": True, "file": str(path), "patients": int(z["label"].size), "severe": int(z["label"].sum()),
            "sources": sorted(set(z["source"].tolist())), "recipe": r}
    other = sorted(k for k, v in meta.get("models", {}).items() if refs.get(k) and refs[k].sha256 != v)
    if other:
        info["note"] = (f"the shipped features were made with other {', '.join(other)} models than the ones that "
                        f"screened the local visits")
    X = np.concatenate([z[v].astype(np.float64) for v in rc.train_variants])
    return (X, np.tile(z["label"].astype(int), len(rc.train_variants))), info


def _choose(site: ac.Site, allp: list[str]) -> SimpleNamespace:
    """Every candidate measured on the run's folds, the one the rule chooses, and the nested estimate of the
    choice (when there is a choice: more than one candidate allowed)."""
    cfg = site.cfg
    plan = repeated_folds(strata([site.lab[p] for p in allp], [site.src[p] for p in allp]), cfg.folds, cfg.repeats,
                          cfg.seed)
    cands = ac.candidates(cfg, site.installed_gate.decision_stages, site.shipped is not None)
    sets = ac.settings(site, cands)
    rows, folds = ac.measure(site, sets, cands, plan, allp)
    key, why = ac.select(rows, margin=cfg.choice_margin, max_inadequate=cfg.max_inadequate)
    for r in rows:
        r["chosen"] = r["key"] == key
    allowed = [c for c in cands if c.allowed]
    if len(allowed) < 2:
        nested = {"skipped": "one candidate allowed: nothing is chosen, the cross-validated AUC is the estimate"}
    elif not cfg.nested:
        nested = {"skipped": "nested cross-validation turned off (nested = False)"}
    else:
        log.info("nested cross-validation of the choice among %d candidates", len(allowed))
        fixed = {k: s for k, s in sets.items() if k[1] == "installed"}
        try:
            nested = ac.nested(site, allowed, plan, allp, fixed)
        except (DataError, ValueError) as e:
            nested = {"error": str(e)}
    cand = next(c for c in cands if c.key == key)
    return SimpleNamespace(key=key, why=why, cand=cand, rows=rows, folds=folds[key], sets=sets, nested=nested,
                           setting=sets[(cand.stages, cand.gate)], k=len(allowed))


def _learning_curve(cfg: AdaptConfig, rc, pats, vote: dict, extra: tuple | None, cv_auc: float | None) -> list[dict]:
    """AUC against the number of local training patients: ``curve_draws`` draws of n patients (classes in
    their local proportion, at least 2 each), each fitted and scored on the local patients not drawn."""
    rng = np.random.default_rng(cfg.seed)
    idx = [np.flatnonzero(pats.y == c) for c in (0, 1)]
    N = len(pats.y)
    rows = []
    for n in cfg.curve_sizes:
        n1 = int(round(n * len(idx[1]) / N))
        take = (n - n1, n1)
        if min(take) < 2 or any(len(ix) - t < 2 for ix, t in zip(idx, take)):
            continue
        aucs = []
        for _ in range(cfg.curve_draws):
            tr = np.concatenate([rng.choice(ix, t, replace=False) for ix, t in zip(idx, take)])
            te = np.setdiff1d(np.arange(N), tr)
            s = frozen._score(ac.fit(rc, pats, tr, extra), pats, vote, te)
            aucs.append(float(rank_auc(pats.y[te][None], s[None])[0]))
        rows.append({"train_patients": n, "test_patients": N - n, "draws": len(aucs), "auc_mean": float(np.mean(aucs)),
                     "auc_p10": float(np.percentile(aucs, 10)), "auc_p90": float(np.percentile(aucs, 90))})
    rows.append({"train_patients": f"all {N}", "test_patients": N, "draws": cfg.repeats, "auc_mean": cv_auc,
                 "how": f"{cfg.folds}-fold cross-validation x {cfg.repeats}: each model trained on about "
                        f"{(cfg.folds - 1) / cfg.folds:.0%} of the {N} patients"})
    return rows


# --------------------------------------------------------------------------- comparing

def _rates(y: np.ndarray, s: np.ndarray, thr: float) -> tuple[float, float]:
    """Sensitivity and specificity of the scores ``s`` (patients, or repeats x patients: the mean) at ``thr``."""
    S = np.atleast_2d(s)
    return float(np.mean((S[:, y == 1] > thr).mean(1))), float(np.mean((S[:, y == 0] <= thr).mean(1)))


def _compare(cfg: AdaptConfig, pats, calib, inst: _Installed, validation: dict, nested: dict) -> dict:
    """The installed and the adapted decision on the same local patients (those both decide), and whether the
    adapted one may be installed (not when its own or the nested estimate's CI reaches 0.5, or when the paired
    comparison says it is worse)."""
    n = len(inst.scores)
    inadequate = {"installed": sum(s is None for s in inst.scores.values()), "adapted": len(pats.inadequate)}
    common = [i for i, p in enumerate(pats.ids) if inst.scores.get(p) is not None]
    y = pats.y[common]
    out = {"patients": n, "inadequate": inadequate,
           "inadequate_rate": {k: v / max(1, n) for k, v in inadequate.items()},
           "installed": {"model": inst.label, "sha256": inst.sha256, "threshold": inst.threshold, "how": inst.how,
                         "gate": {f: getattr(inst.gate, f) for _, f, _, _ in quality.THRESHOLD_RULES},
                         "decision_stages": list(inst.gate.decision_stages)},
           "adapted": {"threshold": calib.thr, "how": "out-of-fold scores of the local cross-validation, "
                                                      "calibrated; the mean over its repeats"}}
    reasons = []
    if not validation["passed"]:
        reasons.append("its own cross-validated AUC's 95 % CI includes 0.5 (or lies below it): "
                       f"AUC {validation['auc']:.3f} (CI {validation['ci_low']:.3f}-{validation['ci_high']:.3f})")
    if "auc" in nested and not nested["ci_low"] > 0.5:
        reasons.append("the nested cross-validated AUC (the estimate that counts the choice among the candidates) "
                       f"has a 95 % CI reaching 0.5: AUC {nested['auc']:.3f} (CI {nested['ci_low']:.3f}-"
                       f"{nested['ci_high']:.3f})")
    if len(set(y.tolist())) < 2:
        out["paired"] = None
        out["note"] = "the installed decision decides too few of these patients (of both classes) to compare"
    else:
        a = np.array([inst.scores[pats.ids[i]] for i in common])
        b = calib.cal[:, common]
        d = paired_auc_delta(y, a, b, n=cfg.n_bootstrap, seed=cfg.seed)
        sa, sb = _rates(y, a, inst.threshold), _rates(y, b, calib.thr)
        out["installed"].update(auc=ac.mean_auc(y, a[None]), sensitivity=sa[0], specificity=sa[1])
        out["adapted"].update(auc=ac.mean_auc(y, b), sensitivity=sb[0], specificity=sb[1])
        out["paired"] = {"patients": len(common), "severe": int(y.sum()), "auc_delta": d["delta"], "ci95": d["ci95"],
                         "n_bootstrap": d["n"], "what": "AUC(adapted) - AUC(installed), paired bootstrap over the "
                                                        "patients both decide"}
        if d["delta"] < 0 and d["ci95"][1] < 0:
            reasons.append(f"the paired comparison says it is worse than the installed decision on the same "
                           f"{len(common)} patients: AUC {out['adapted']['auc']:.3f} against "
                           f"{out['installed']['auc']:.3f}, difference {d['delta']:+.3f} (95 % CI "
                           f"{d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})")
    out["installable"] = not reasons
    out["not_installable_because"] = reasons
    return out


# --------------------------------------------------------------------------- the command

def adapt(cfg: AdaptConfig, progress=None) -> dict:
    """``cervscan adapt`` (the module's docstring). Returns the run's metrics (as in RUN/metrics.json).

    Long: the steps of the module docstring in order, each one call."""
    _check(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    out = Path(cfg.out)
    check_overlap([cfg.visits], out)
    _check_run_folder(out)
    rc = cfg.recipe(STAGES)
    lab, src, labels_check, visits = frozen._labelled_visits(rc)
    counts, warnings = _class_counts(cfg, visits, lab, src)
    warnings += label_check_lines(labels_check)
    items = [(v.patient_id, p) for v in visits for p in v.images]
    pipe, refs = frozen._pipeline(rc)
    net = frozen.backbone(rc.backbone)
    recs = frozen.extract(rc, pipe, refs, items, net, progress)
    t_features = time.time() - t0
    inst = _installed(cfg, pipe, net, items, recs, lab, src)
    ac.apply_gate(pipe, recs, inst.gate)
    shipped, shipped_info = _shipped_patients(cfg, rc, refs)
    site = ac.Site(cfg, pipe, recs, items, lab, src, inst.gate, pipe.cfg.voting.active_weights(), shipped)
    drop = _stage_drop(site)
    ch = _choose(site, sorted(site.pids))
    c, pats, folds = ch.cand, ch.setting.pats, ch.folds
    policy = _stage_policy(drop, ch.key, c.stages)
    ac.apply_gate(pipe, recs, ch.setting.gate)
    site_rc = cfg.recipe(c.stages)
    calib = frozen._calibrate(site_rc, pats.y, folds.oof)
    metrics = frozen._cv_metrics(site_rc, pats, calib, folds, images=len(items), labels_check=labels_check,
                                 eligible_images=int(sum(1 for r in recs if r is not None and r["eligible"])))
    comparison = _compare(cfg, pats, calib, inst, metrics["validation"], ch.nested)
    same = {r["pool"]: r["auc"] for r in ch.rows if r["stages"] == list(c.stages) and r["gate"] == c.gate}
    curve = {k: _learning_curve(cfg, site_rc, pats, site.vote, shipped if k == "pooled" else None, a)
             for k, a in same.items() if a is not None}
    choice = {"rule": ac.rule(cfg.max_inadequate, cfg.choice_margin), "why": ch.why,
              "candidate": ch.key, "candidates": ch.rows, "allowed": ch.k, "auc_mean_of_repeats": same}
    metrics.update(command="adapt", chosen=c.pool, candidate=ch.key, choice=choice, nested=ch.nested, counts=counts,
                   stage_policy=policy, gate=_gate_record(site, ch.sets, c), training_features=shipped_info,
                   learning_curve=curve, installable=comparison["installable"],
                   not_installable_because=comparison["not_installable_because"], warnings=warnings,
                   forced=bool(cfg.force), config=asdict(cfg), cervscan_version=__version__,
                   models={r: {"label": refs[r].label, "sha256": refs[r].sha256} for r in refs if r != "classifier"})
    metrics["seconds"] = {"features": t_features, "total": None}
    _write_run(cfg, out, pipe, net, pats, calib, metrics, comparison, ch.setting.gate, folds,
               shipped if c.pool == "pooled" else None, t0)
    enforce(metrics["validation"], metrics, no_model=f"No {out / 'model.pt'} or site.toml was written (metrics.json, "
                                                    f"comparison.json and adapt.md are, for inspection).")
    return metrics


def _site(cfg: AdaptConfig, metrics: dict, comparison: dict, gate) -> dict:
    """What the checkpoint records of the site it was adapted to."""
    return {"visits": str(cfg.visits), "labels": str(cfg.labels), "counts": metrics["counts"],
            "fitted_on": metrics["chosen"], "candidate": metrics["candidate"],
            "nested_auc": metrics["nested"].get("auc"), "decision_stages": list(gate.decision_stages),
            "gate": metrics["gate"]["site"], "stage_policy": metrics["stage_policy"]["why"],
            "comparison": comparison.get("paired"), "installed_before": comparison["installed"]["model"],
            "installable": comparison["installable"], "not_installable_because": comparison["not_installable_because"],
            "forced": bool(cfg.force), "adapted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cervscan_version": __version__}


def _write_run(cfg: AdaptConfig, out: Path, pipe, net, pats, calib, metrics: dict, comparison: dict, gate, folds,
               extra: tuple | None, t0: float) -> None:
    """RUN/: oof.csv, model.pt and site.toml (unless the validation failed and nothing forces them),
    metrics.json, comparison.json and adapt.md, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    rc = cfg.recipe(gate.decision_stages)
    frozen._write_oof(rc, out / "oof.csv", pats, calib, folds)
    summary = {**frozen._base_summary(rc, metrics), "data": str(cfg.visits), "fitted_on": metrics["chosen"]}
    full = ac.fit(rc, pats, np.arange(len(pats.ids)), extra) if extra is not None else None
    frozen._write_model(rc, pipe, net, pats, calib, metrics, out / "model.pt", summary, full=full,
                        extra={"site": _site(cfg, metrics, comparison, gate)})
    toml = out / "site.toml"
    if metrics["checkpoint"]:
        atomic_write_text(toml, sitecard.site_toml(cfg, gate, calib.thr, metrics))
        load_config_file(toml)  # what screen --config reads; a file it refuses must not be left here
        metrics["site_config"] = str(toml)
    else:
        toml.unlink(missing_ok=True)
        metrics["site_config"] = None
    metrics["seconds"]["total"] = time.time() - t0
    atomic_write_json(out / "comparison.json", comparison)
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "adapt.md", sitecard.card(cfg, metrics, comparison))
