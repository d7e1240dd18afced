"""The settings ``cervscan adapt`` chooses among, how it chooses, and what the choice itself is worth.

A *candidate* is one way of making the decision the site's own: a stage policy (the installed decision's
deciding stages, or every stage), the quality gate's thresholds (the installed ones, or re-derived from the
site's images by the shipped rule) and the fit (the local patients only, or pooled with the shipped training
patients). Every candidate is measured on the same repeated local folds (features are cached, so each one is
a refit of logistic regressions), and one is chosen by :func:`rule`, written before any result was looked at.
Choosing the best of k candidates on the same folds flatters the winner; :func:`nested` repeats the whole
choice inside every outer training fold and scores the outer test patients with what it chose: the nested
estimate is the run's AUC.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

from cervscan.config import STAGES
from cervscan.errors import CervscanError, DataError
from cervscan.metrics import rank_auc
from cervscan.pipeline import quality
from cervscan.training import classifier as frozen
from cervscan.training.splits import repeated_folds, strata

GATES = ("auto", "site", "installed")

def rule(cap: float, margin: float) -> str:
    """The selection rule in words (recorded in metrics.json and on the card)."""
    return ("every candidate (stage policy: the installed decision's stages or every stage; gate thresholds: the "
            "installed ones or re-derived from the site's images; fit: local only or pooled with the shipped training "
            "patients; only those --stages, --gate and --pool leave open may be chosen) is measured on the same "
            "repeated local folds: mean over the repeats of the out-of-fold AUC on the patients it decides, and the "
            f"share of the local patients it leaves inadequate. (1) A candidate leaving more than {cap:.0%} of the "
            f"local patients inadequate is not chosen, unless every candidate does. (2) Among the rest, every "
            f"candidate whose AUC is within {margin:.2f} of the best counts as tied with it. (3) Of the tied, the one "
            "that departs least from the installed settings (one departure each: another stage policy, re-derived "
            "gate thresholds, a local-only fit where pooling was possible) is chosen, then the higher AUC: the "
            f"installed settings are kept unless a change gains more than {margin:.2f} AUC. The choice is repeated "
            "inside every outer training fold (nested cross-validation: the same outer folds, the same inner fold "
            "plan over the outer training patients, the site gate re-derived from their images only); the nested "
            "out-of-fold AUC is the estimate.")


@dataclass(frozen=True)
class Candidate:
    stages: tuple[str, ...]
    gate: str  # "installed" | "site"
    pool: str  # "local" | "pooled"
    departures: int  # from the installed settings
    allowed: bool  # may be chosen (--stages, --gate, --pool)

    @property
    def key(self) -> str:
        stages = "every-stage" if set(self.stages) == set(STAGES) else "+".join(self.stages)
        return f"{stages}/{self.gate}-gate/{self.pool}"


@dataclass
class Site:
    """What every candidate is computed from: the run's settings, the pipeline (its gate is set per setting),
    the cached image records, the labels and the shipped training patients' rows (None: no pooling)."""
    cfg: object
    pipe: object
    recs: list
    items: list
    lab: dict
    src: dict
    installed_gate: object
    vote: dict
    shipped: tuple | None
    pids: list[str] = field(init=False)

    def __post_init__(self):
        self.pids = list(dict.fromkeys(p for p, _ in self.items))


@dataclass
class Setting:
    """One stage policy with one gate: the gate, how its thresholds were derived, and the patients' features
    (None, with ``error``, when too few patients are decided under it)."""
    stages: tuple[str, ...]
    gate_kind: str
    gate: object
    pats: object | None
    error: str = ""
    derived: dict | None = None


def candidates(cfg, installed_stages, pooled: bool) -> list[Candidate]:
    """Every candidate, in order; those the run's options fix (``decision_stages``, ``gate``, ``pool``) are the
    only ``allowed`` ones."""
    if cfg.gate not in GATES:
        raise CervscanError(f"--gate must be one of {', '.join(GATES)}, not {cfg.gate!r}")
    if cfg.pool == "pooled" and not pooled:
        raise CervscanError("--pool pooled: not available (no shipped training features for this recipe)")
    inst = tuple(installed_stages)
    given = tuple(cfg.decision_stages) if cfg.decision_stages else None
    out = []
    for stages in dict.fromkeys([inst, tuple(STAGES)] + ([given] if given else [])):
        for gate in ("installed", "site"):
            for pool in ("pooled", "local") if pooled else ("local",):
                dep = (set(stages) != set(inst)) + (gate == "site") + (pool == "local" and pooled)
                ok = ((given is None or stages == given) and cfg.gate in ("auto", gate)
                      and cfg.pool in ("auto", pool))
                out.append(Candidate(stages, gate, pool, int(dep), ok))
    return out


def select(rows: list[dict], *, margin: float, max_inadequate: float) -> tuple[str, str]:
    """The chosen row's ``key`` by :func:`rule`, and why. ``rows``: ``key``, ``auc`` (None: not measured),
    ``inadequate_rate``, ``departures``, ``allowed``, in candidate order (the last tie-break)."""
    pool = [r for r in rows if r.get("allowed", True) and r.get("auc") is not None and np.isfinite(r["auc"])]
    if not pool:
        raise DataError("no candidate setting could be measured (too few patients decided under every one)")
    ok = [r for r in pool if r["inadequate_rate"] <= max_inadequate]
    capped = "" if ok else (f"every candidate leaves more than {max_inadequate:.0%} of the patients inadequate, "
                            f"so all were considered; ")
    ok = ok or pool
    best = max(r["auc"] for r in ok)
    tied = [r for r in ok if r["auc"] >= best - margin - 1e-12]
    pick = min(tied, key=lambda r: (r["departures"], -r["auc"], rows.index(r)))
    why = (f"{capped}{len(ok)} of {len(pool)} candidates leave at most {max_inadequate:.0%} inadequate; best AUC "
           f"{best:.3f}; {len(tied)} within {margin:.2f} of it; {pick['key']} departs least from the installed "
           f"settings ({pick['departures']} departure(s)), AUC {pick['auc']:.3f}")
    return pick["key"], why


# --------------------------------------------------------------------------- gates and patients

def apply_gate(pipe, recs: list, gate) -> None:
    """Each cached record's ``eligible`` / ``reason`` under ``gate`` (the pipeline's gate with these settings)."""
    pipe.cfg = replace(pipe.cfg, gate=gate)
    for r in recs:
        if r is not None:
            why = frozen._eligibility(pipe, r)
            r["eligible"], r["reason"] = not why, ";".join(why)


def site_gate(site: Site, stages, among: set | None = None) -> tuple[object, dict]:
    """The installed gate with ``stages`` and the thresholds the shipped rule chooses on the site's originals:
    the images of the deciding stages (by the stage model) of the patients ``among`` (None: every patient)."""
    g = replace(site.installed_gate, decision_stages=tuple(stages))
    apply_gate(site.pipe, site.recs, g)
    kept = [r for (p, _), r in zip(site.items, site.recs) if r is not None and (among is None or p in among)
            and not r["reason"].startswith("stage:")]
    if not kept:
        raise DataError(f"{site.cfg.visits}: no local image is of a deciding stage ({', '.join(stages)})")
    th, how = quality.choose_thresholds([{**r["quality"], "cervix_found": r["cervix_found"]} for r in kept],
                                        site.cfg.false_reject_budget)
    return replace(g, **th), how


def setting(site: Site, stages, gate_kind: str, among: set | None = None) -> Setting:
    """The patients' features under ``stages`` and the installed or the site gate (derived from ``among``)."""
    try:
        if gate_kind == "installed":
            gate, how = replace(site.installed_gate, decision_stages=tuple(stages)), None
        else:
            gate, how = site_gate(site, stages, among)
        apply_gate(site.pipe, site.recs, gate)
        pats = frozen._patient_features(site.cfg.recipe(stages), site.pids, site.items, site.recs, site.lab, site.src)
    except DataError as e:
        return Setting(tuple(stages), gate_kind, None, None, str(e))
    return Setting(tuple(stages), gate_kind, gate, pats, "", how)


def settings(site: Site, cands: list[Candidate], among: set | None = None, fixed: dict | None = None) -> dict:
    """Every (stages, gate) the candidates need; ``fixed``: settings already computed that do not depend on
    ``among`` (the installed gate's)."""
    out = dict(fixed or {})
    for c in cands:
        if (c.stages, c.gate) not in out:
            out[(c.stages, c.gate)] = setting(site, c.stages, c.gate, among)
    return out


# --------------------------------------------------------------------------- fitting and measuring

def fit(rc, pats, tr: np.ndarray, extra: tuple | None):
    """The regression on the local patients ``tr`` (one row per training view), with ``extra`` rows (pooled)."""
    X = [pats.V[v][tr] for v in rc.train_variants]
    y = [pats.y[tr]] * len(rc.train_variants)
    if extra is not None:
        X, y = X + [extra[0]], y + [extra[1]]
    return frozen.fit_lr(np.concatenate(X), np.concatenate(y), rc.C)


def cross_validate(rc, pats, vote: dict, plan: list, allp: list[str], extra: tuple | None):
    """Out-of-fold scores (repeats x ``pats``; NaN where a patient is not in ``allp`` or not decided) on
    ``plan``, folds over the patients ``allp``; ``extra`` rows are added to every fold's training patients and
    never scored."""
    pos = {p: i for i, p in enumerate(pats.ids)}
    folds = frozen._Folds(oof=np.full((len(plan), len(pats.ids)), np.nan), fold_of=np.zeros(len(pats.ids), int),
                          fold_all={}, models=[], auc=[])
    for r, repeat in enumerate(plan):
        for k, (tr_all, te_all) in enumerate(repeat):
            tr, te = (np.array([pos[allp[i]] for i in ix if allp[i] in pos], int) for ix in (tr_all, te_all))
            m = fit(rc, pats, tr, extra)
            folds.oof[r, te] = frozen._score(m, pats, vote, te)
            if len(set(pats.y[te])) == 2:
                folds.auc.append(float(rank_auc(pats.y[te][None], folds.oof[r, te][None])[0]))
            if r == 0:
                folds.fold_of[te] = k + 1
                folds.models.append(m)
    return folds


def mean_auc(y: np.ndarray, S: np.ndarray) -> float:
    """Mean over the rows of ``S`` (repeats x patients) of the AUC over the patients scored (finite) in the row;
    NaN when no row holds both classes."""
    aucs = []
    for row in np.atleast_2d(S):
        ok = np.isfinite(row)
        aucs.append(rank_auc(y[ok][None].astype(float), row[ok][None])[0] if ok.any() else np.nan)
    aucs = [a for a in aucs if np.isfinite(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def measure(site: Site, sets: dict, cands: list[Candidate], plan: list, allp: list[str]) -> tuple[list[dict], dict]:
    """Each candidate on ``plan`` (folds over ``allp``): rows for the record and :func:`select`, and the folds
    (out-of-fold scores) of each measured candidate by key."""
    rows, folds = [], {}
    among = set(allp)
    for c in cands:
        st = sets[(c.stages, c.gate)]
        row = {"key": c.key, "stages": list(c.stages), "gate": c.gate, "pool": c.pool, "departures": c.departures,
               "allowed": c.allowed, "auc": None, "patients": len(allp)}
        if st.pats is None:
            rows.append({**row, "error": st.error})
            continue
        f = cross_validate(site.cfg.recipe(c.stages), st.pats, site.vote, plan, allp,
                           site.shipped if c.pool == "pooled" else None)
        inad = len(among & set(st.pats.inadequate))
        rows.append({**row, "auc": mean_auc(st.pats.y, f.oof),
                     "auc_repeats": [mean_auc(st.pats.y, o) for o in f.oof], "inadequate": inad,
                     "inadequate_rate": inad / max(1, len(allp))})
        folds[c.key] = f
    return rows, folds


# --------------------------------------------------------------------------- nested cross-validation

def nested(site: Site, cands: list[Candidate], plan: list, allp: list[str], fixed: dict) -> dict:
    """The whole choice (:func:`measure` on an inner fold plan, :func:`select`) repeated inside every outer
    training fold of ``plan``; the chosen candidate, fitted on the outer training patients, scores the outer
    test patients it decides. Returns the nested AUC (mean of the repeats) with a bootstrap 95 % CI, the
    inadequate share and what each outer fold chose. ``fixed``: the settings that do not depend on the fold."""
    cfg = site.cfg
    S = np.full((len(plan), len(allp)), np.nan)
    y = np.array([site.lab[p] for p in allp])
    at = {p: i for i, p in enumerate(allp)}
    picks = []
    for r, repeat in enumerate(plan):
        for tr_all, te_all in repeat:
            train = [allp[i] for i in tr_all]
            inner = repeated_folds(strata([site.lab[p] for p in train], [site.src[p] for p in train]), cfg.folds,
                                   cfg.repeats, cfg.seed)
            sets = settings(site, cands, among=set(train), fixed=fixed)
            rows, _ = measure(site, sets, cands, inner, train)
            key, _ = select(rows, margin=cfg.choice_margin, max_inadequate=cfg.max_inadequate)
            picks.append(key)
            c = next(c for c in cands if c.key == key)
            pats = sets[(c.stages, c.gate)].pats
            pos = {p: i for i, p in enumerate(pats.ids)}
            tr = np.array([pos[p] for p in train if p in pos], int)
            te = [allp[i] for i in te_all if allp[i] in pos]
            m = fit(cfg.recipe(c.stages), pats, tr, site.shipped if c.pool == "pooled" else None)
            S[r, [at[p] for p in te]] = frozen._score(m, pats, site.vote, np.array([pos[p] for p in te], int))
    lo, hi = _nan_bootstrap(y, S, cfg.n_bootstrap, cfg.seed)
    return {"auc": mean_auc(y, S), "ci_low": lo, "ci_high": hi, "auc_repeats": [mean_auc(y, s) for s in S],
            "inadequate_rate": float(np.mean(~np.isfinite(S))), "patients": len(allp),
            "chosen_in_outer_folds": dict(Counter(picks).most_common()),
            "method": f"nested cross-validation: outer {cfg.folds} folds x {cfg.repeats} repeats (the run's folds); "
                      f"inside each outer training fold the candidates are measured on {cfg.folds} folds x "
                      f"{cfg.repeats} repeats and chosen by the rule; mean AUC of the repeats over the patients "
                      f"decided, bootstrap 95 % CI over patients"}


def _nan_bootstrap(y: np.ndarray, S: np.ndarray, n: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap 95 % CI over patients of :func:`mean_auc` (the same patients drawn in every row)."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        idx = rng.integers(0, y.size, y.size)
        a = mean_auc(y[idx], S[:, idx])
        if np.isfinite(a):
            vals.append(a)
    if not vals:
        return float("nan"), float("nan")
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))
