"""Patient-decision harness: many candidates on the same repeated patient-wise folds.

Every candidate is scored on ``../shared/data/visits`` (203 patients, 798 images) with 5-fold
cross-validation repeated 3 times (patients stratified by label x source, seeds 0, 1, 2). A candidate
is a choice of

- the **input** (frozen ImageNet EfficientNet-Lite0/1/2 features of the whole frame, the centre 60 %,
  the pipeline's cervix crop, 2 x 2 tiles of the crop; 224, 384 or 512 px),
- the **images** (all; acetic acid only; acetic + Lugol's iodine; weighted by the stage model's
  confidence), selected by the recorded stage (baselines) or the stage model's out-of-fold prediction
  with the quality gate's rule (what screening sees),
- the **image model** (a class-balanced, standardised logistic regression over the features; the
  study's six variants, original and segmented images trained together and combined by the weighted
  vote in log-odds),
- the **patient rule** (mean of the image features, i.e. the mean of the image log-odds, which is what
  the pipeline computes; mean and max; attention pooling (multiple-instance learning); a stacked
  model over the out-of-fold image score and measured features of the cervix).

Nothing from ``labels.csv`` but the label and the source is used (not hpv, swede_score, tz_type).

Per candidate: pooled out-of-fold patient AUC (mean of the 3 repeats) with a bootstrap 95 % CI, AUC
per source, specificity at 90 % sensitivity, the 15 fold AUCs (for the paired noise of the selection
rule in ``docs/model-selection.md``), cost per screened image and fitting time. Results are cached per
candidate in ``runs/decision/results.json`` (a rerun skips candidates whose definition is unchanged),
and the table is written to the ``decision`` block of ``benchmarks/RESULTS.md``.

    python benchmarks/decision.py features   # prep + every feature the candidates need (resumable)
    python benchmarks/decision.py run        # the candidates' table and the choice
    python benchmarks/decision.py all        # both
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import decision_features as F  # noqa: E402

from cervscan.config import STUDY_WEIGHTS, VARIANT_NAMES  # noqa: E402
from cervscan.training.selection import STRUCTURE, choose, noise, structure  # noqa: E402,F401 - the rule of docs/model-selection.md
from cervscan.training.splits import fold_index, strata  # noqa: E402

ROOT = F.ROOT
OUT = ROOT / "runs" / "decision"
RESULTS = HERE / "RESULTS.md"
START, END = "<!-- decision:start -->", "<!-- decision:end -->"
SEEDS = (0, 1, 2)
K = 5
C_DEFAULT = 0.01
STUDY = dict(zip(VARIANT_NAMES, STUDY_WEIGHTS))  # the study's six vote weights, from the package
OTHER_STEPS_MS = 145.0  # 1.2.0: screening time per image less its classifier step (docs/model-selection.md)
STAGE_SPEC = "lite0:frame:224:original"  # the stage model's input (whole frame, 224 px)


# --------------------------------------------------------------------------- candidates

def cand(name, group, feats, *, select="all", stage="oof", pool="mean", variants=None, C=C_DEFAULT, note="",
         conf=0.8, vinput=None, tune_votes=False):
    c = {"name": name, "group": group, "feats": list(feats), "select": select, "stage": stage, "pool": pool,
         "variants": variants, "C": C, "note": note}
    if conf != 0.8:  # the gate's stage_min_confidence; 0: an image counts only when its predicted stage decides
        c["conf"] = conf
    if tune_votes:  # the vote weights chosen by an inner cross-validation on each training fold
        c["tune_votes"] = True
    if vinput:  # variant -> input that replaces the first feature's input for it (e.g. original views of the frame)
        c["vinput"] = vinput
    return c


def L0(inp, size=384, var="original"):
    return f"lite0:{inp}:{size}:{var}"


def candidates() -> list[dict]:
    six = dict(STUDY)
    return [
        # baselines (recorded stage), as measured before this harness
        cand("B1 all, frame 224", "baseline", [L0("frame", 224)], select="all", stage="recorded"),
        cand("B2 acetic, frame 224", "baseline", [L0("frame", 224)], select="acetic", stage="recorded"),
        cand("B3 acetic, centre 60 % 224", "baseline", [L0("centre60", 224)], select="acetic", stage="recorded"),
        cand("B4 all, frame 384", "baseline", [L0("frame", 384)], select="all", stage="recorded"),
        cand("B5 acetic, frame 384", "baseline", [L0("frame", 384)], select="acetic", stage="recorded"),
        cand("B6 acetic, cervix 384", "baseline", [L0("cervix", 384)], select="acetic", stage="recorded"),
        # input (predicted stage, acetic)
        cand("I0 acetic, frame 224", "input", [L0("frame", 224)], select="acetic"),
        cand("I0c acetic, centre 60 % 224", "input", [L0("centre60", 224)], select="acetic"),
        cand("I1 acetic, frame 384", "input", [L0("frame", 384)], select="acetic"),
        cand("I2 acetic, cervix 224", "input", [L0("cervix", 224)], select="acetic"),
        cand("I3 acetic, cervix 384", "input", [L0("cervix", 384)], select="acetic"),
        cand("I4 acetic, cervix 512", "input", [L0("cervix", 512)], select="acetic"),
        cand("I5 acetic, cervix 2x2 tiles of 224", "input", [L0("tiles", 224)], select="acetic"),
        cand("I6 acetic, cervix 384 + frame 384", "input", [L0("cervix", 384), L0("frame", 384)], select="acetic"),
        # images
        cand("S1 all, cervix 384", "images", [L0("cervix", 384)], select="all"),
        cand("S2 acetic + Lugol, cervix 384", "images", [L0("cervix", 384)], select="acetic+lugol"),
        cand("S3 acetic + Lugol, separate models, cervix 384", "images", [L0("cervix", 384)], select="acetic+lugol",
             pool="separate"),
        cand("S4 all, weighted by P(acetic), cervix 384", "images", [L0("cervix", 384)], select="weighted"),
        cand("S5 acetic (recorded stage), cervix 384", "images", [L0("cervix", 384)], select="acetic",
             stage="recorded"),
        cand("S6 acetic (predicted stage must be acetic), cervix 384", "images", [L0("cervix", 384)],
             select="acetic", conf=0.0),
        cand("S7 acetic (predicted stage must be acetic), frame 384", "images", [L0("frame", 384)],
             select="acetic", conf=0.0),
        cand("S8 acetic (predicted acetic), cervix 384, C = 0.003", "images", [L0("cervix", 384)],
             select="acetic", conf=0.0, C=0.003),
        cand("S9 acetic + Lugol (predicted), cervix 384", "images", [L0("cervix", 384)], select="acetic+lugol",
             conf=0.0),
        # image model
        cand("M1 Lite1, acetic, cervix 384", "image model", ["lite1:cervix:384:original"], select="acetic"),
        cand("M2 Lite2, acetic, cervix 384", "image model", ["lite2:cervix:384:original"], select="acetic"),
        cand("M3 Lite2, acetic, frame 384", "image model", ["lite2:frame:384:original"], select="acetic"),
        cand("M4 six variants, study weights, acetic, cervix 384", "image model", [L0("cervix", 384)],
             select="acetic", variants=six),
        cand("M5 original + segmented, acetic, cervix 384", "image model", [L0("cervix", 384)], select="acetic",
             variants={"original": 0.5, "segmented": 0.5}),
        cand("M6 original + flip, acetic, cervix 384", "image model", [L0("cervix", 384)], select="acetic",
             variants={"original": 0.5, "original_flip": 0.5}),
        cand("M7 segmented only, acetic, cervix 384", "image model", [L0("cervix", 384)], select="acetic",
             variants={"segmented": 1.0}),
        cand("M10 six variants, study weights, acetic, cervix 224", "image model", [L0("cervix", 224)],
             select="acetic", variants=six),
        cand("M11 original + segmented, acetic, cervix 224", "image model", [L0("cervix", 224)], select="acetic",
             variants={"original": 0.5, "segmented": 0.5}),
        cand("M12 six variants, study weights, all, cervix 384", "image model", [L0("cervix", 384)],
             select="all", variants=six),
        cand("F1 frame 384 + segmented cervix 384, acetic", "image model", [L0("cervix", 384)], select="acetic",
             variants={"original": 0.5, "segmented": 0.5}, vinput={"original": "frame"}),
        cand("F1s frame 384 + segmented cervix 384, study weights (0.20 : 0.25), acetic", "image model",
             [L0("cervix", 384)], select="acetic", variants={"original": 0.20, "segmented": 0.25},
             vinput={"original": "frame"}),
        cand("F4 frame 384 + segmented cervix 384, vote weights tuned inside each training fold, acetic",
             "image model", [L0("cervix", 384)], select="acetic", variants={"original": 0.5, "segmented": 0.5},
             vinput={"original": "frame"}, tune_votes=True),
        cand("F2 six variants, originals of the frame, segmented of the cervix, 384, acetic", "image model",
             [L0("cervix", 384)], select="acetic", variants=six,
             vinput={"original": "frame", "original_flip": "frame", "original_bright": "frame"}),
        cand("F3 frame 384 + flip, acetic", "image model", [L0("frame", 384)], select="acetic",
             variants={"original": 0.5, "original_flip": 0.5}),
        cand("M8 C = 0.003, acetic, cervix 384", "image model", [L0("cervix", 384)], select="acetic", C=0.003),
        cand("M9 C = 0.03, acetic, cervix 384", "image model", [L0("cervix", 384)], select="acetic", C=0.03),
        # patient rule
        cand("P1 mean + max, acetic, cervix 384", "patient rule", [L0("cervix", 384)], select="acetic",
             pool="meanmax"),
        cand("P2 attention pooling (MIL), all, cervix 384", "patient rule", [L0("cervix", 384)], select="all",
             pool="mil"),
        cand("P3 stacked: image score + measured features, acetic, cervix 384", "patient rule", [L0("cervix", 384)],
             select="acetic", pool="stack"),
        cand("P4 measured features only (lesion, colour)", "patient rule", [], select="all", pool="measured"),
    ]


def needed_specs(cands) -> list[str]:
    specs = [STAGE_SPEC]
    for c in cands:
        for s in c["feats"]:
            bb, inp, size, _ = s.split(":")
            for v in (c["variants"] or {"original": 1}):
                specs.append(f"{bb}:{c.get('vinput', {}).get(v, inp)}:{size}:{v}")
    return list(dict.fromkeys(specs))


def cand_key(c) -> str:
    return hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- data

class Data:
    def __init__(self, cache: Path):
        self.cache = cache
        self.rows = F.image_rows()
        self.pipe, self.refs = F.load_pipe()
        self.prep_dir = cache / f"prep-{F.prep_key(self.pipe, self.refs)}"
        self.preps = F.load_prep(self.rows, self.prep_dir)
        self.pid = np.array([r["patient_id"] for r in self.rows])
        self.patients = sorted(set(self.pid.tolist()))
        pidx = {p: i for i, p in enumerate(self.patients)}
        self.img_patient = np.array([pidx[p] for p in self.pid])
        lab = {r["patient_id"]: r["label"] for r in self.rows}
        src = {r["patient_id"]: r["source"] for r in self.rows}
        self.y = np.array([lab[p] for p in self.patients])
        self.source = np.array(["iarc" if src[p].startswith("iarc") else "annocerv" for p in self.patients])
        from cervscan.training.stage import STAGES, stage_class

        self.STAGES = STAGES
        self.stage_rec = np.array([stage_class(r["stage_raw"]) or "" for r in self.rows])
        self._feat: dict[str, np.ndarray] = {}
        self.stage_cache: dict[tuple, np.ndarray] = {}
        self.ms: dict[str, float] = {}

    def feat(self, spec: str) -> np.ndarray:
        if spec not in self._feat:
            d = F.spec_dir(self.cache, spec)
            X = F.load_features(self.rows, d)
            if X.ndim == 3:  # tiles: mean over the tiles
                X = X.mean(1)
            self._feat[spec] = X.astype(np.float64)
            t = d / "timing.json"
            self.ms[spec] = json.loads(t.read_text())["ms_per_input"] if t.exists() else float("nan")
        return self._feat[spec]

    def net_ms(self, spec: str) -> float:
        """Backbone ms per input: the median of every cached spec timing with the same backbone and input
        size (the same network on the same tensor; single timings vary with what else the machine ran)."""
        bb, inp, size, _ = spec.split(":")
        ts = []
        for t in self.cache.glob(f"feat-{bb}-*-{size}-*/timing.json"):
            if t.parent.name.split("-")[3] == "tiles":
                continue
            ts.append(json.loads(t.read_text())["ms_per_input"])
        if ":tiles:" in spec:  # tiles are timed at the tile size
            ts = ts or [self.ms.get(spec, float("nan"))]
        return float(np.median(ts)) if ts else float("nan")

    def folds(self) -> list[np.ndarray]:
        """Fold index per patient, one array per repeat: train-cls's fold plan (cervscan.training.splits)."""
        st = strata(self.y, self.source)
        return [fold_index(st, K, s) for s in SEEDS]


# --------------------------------------------------------------------------- stage out-of-fold

def stage_oof(D: Data, train_pat: np.ndarray) -> np.ndarray:
    """Stage probabilities of every image from a regression fitted on the training patients' images (fitted
    once per set of training patients: every candidate shares the 15 folds)."""
    key = tuple(sorted(int(i) for i in train_pat))
    if key not in D.stage_cache:
        D.stage_cache[key] = _fit_stage(D, train_pat)
    return D.stage_cache[key]


def _fit_stage(D: Data, train_pat: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X = D.feat(STAGE_SPEC)
    tr = np.isin(D.img_patient, train_pat) & (D.stage_rec != "")
    y = np.array([D.STAGES.index(s) for s in D.stage_rec[tr]])
    sc = StandardScaler().fit(X[tr])
    lr = LogisticRegression(C=0.01, max_iter=3000, class_weight="balanced").fit(sc.transform(X[tr]), y)
    P = np.zeros((len(X), len(D.STAGES)))
    P[:, lr.classes_] = lr.predict_proba(sc.transform(X))
    return P


def image_weights(D: Data, c: dict, P: np.ndarray | None) -> tuple[np.ndarray, int]:
    """Weight of each image in its patient's pooling (0: left out), and how many patients had no image left
    (they fall back to all of their images)."""
    deciding = {"all": set(D.STAGES), "acetic": {"acetic"}, "acetic+lugol": {"acetic", "lugol"},
                "weighted": set(D.STAGES)}[c["select"]]
    if c["stage"] == "recorded":
        keep = np.array([s in deciding for s in D.stage_rec])
    else:
        # the gate's rule: left out when the stage model is at least this sure of a stage that does not decide
        pred, conf = np.array(D.STAGES)[P.argmax(1)], P.max(1)
        keep = np.array([not (s not in deciding and q >= c.get("conf", 0.8)) for s, q in zip(pred, conf)])
    w = P[:, D.STAGES.index("acetic")] + 1e-3 if c["select"] == "weighted" else keep.astype(float)
    fallback = 0
    for p in range(len(D.patients)):
        m = D.img_patient == p
        if not keep[m].any():
            fallback += 1
            w[m] = 1.0
    return w, fallback


def pool(D: Data, X: np.ndarray, w: np.ndarray, how: str = "mean") -> np.ndarray:
    n = len(D.patients)
    out = np.zeros((n, X.shape[1] * (2 if how == "meanmax" else 1)))
    for p in range(n):
        m = (D.img_patient == p) & (w > 0)
        ww = w[m] / w[m].sum()
        mean = (X[m] * ww[:, None]).sum(0)
        out[p] = np.concatenate([mean, X[m].max(0)]) if how == "meanmax" else mean
    return out


# --------------------------------------------------------------------------- heads

def fit_lr(X, y, C):
    """Standardised, class-balanced logistic regression: the one ``train-decision`` fits."""
    from cervscan.training.classifier import fit_lr as fit

    return fit(X, y, C)


def lr_score(model, X):
    sc, lr = model
    return lr.decision_function(sc.transform(X))


def measured_patient(D: Data, w: np.ndarray, P: np.ndarray | None) -> np.ndarray:
    """Measured features per patient: lesion fraction (mean, max), colour statistics of the selected
    images (mean), acetowhite over acetic images, iodine-negative over Lugol images (0 and a flag when
    none), cervix found share."""
    col = np.stack([p["colour"] for p in D.preps]).astype(np.float64)
    lf = np.array([float(p["lesion_fraction"]) for p in D.preps])
    found = np.array([float(p["found"]) for p in D.preps])
    stage = D.stage_rec if P is None else np.array(D.STAGES)[P.argmax(1)]
    out = []
    for p in range(len(D.patients)):
        m = (D.img_patient == p) & (w > 0)
        ma = (D.img_patient == p) & (stage == "acetic")
        ml = (D.img_patient == p) & (stage == "lugol")
        aw = col[ma, 6].mean() if ma.any() else col[m, 6].mean()
        io = col[ml, 7].mean() if ml.any() else 0.0
        out.append(np.concatenate([[lf[m].mean(), lf[m].max(), aw, io, float(ml.any()), found[m].mean()],
                                   col[m].mean(0)]))
    return np.array(out)


def mil_fit_predict(Xtr_list, ytr, Xte_list, seed=0, epochs=150):
    """Attention pooling (Ilse et al. 2018, gated-free) over standardised image features: a 1280 -> 32
    projection, attention weights per image, a linear classifier; weight decay and dropout for 160
    patients."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    allx = np.concatenate(Xtr_list)
    mu, sd = allx.mean(0), allx.std(0) + 1e-6

    class MIL(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.proj = nn.Sequential(nn.Dropout(0.5), nn.Linear(d, 32), nn.Tanh())
            self.att = nn.Linear(32, 1)
            self.cls = nn.Linear(32, 1)

        def forward(self, x):
            h = self.proj(x)
            a = torch.softmax(self.att(h), 0)
            return self.cls((a * h).sum(0)).squeeze()

    net = MIL(allx.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-2)
    Xt = [torch.tensor((x - mu) / sd, dtype=torch.float32) for x in Xtr_list]
    pos = ytr.mean()
    wpos, wneg = 0.5 / pos, 0.5 / (1 - pos)
    yt = torch.tensor(ytr, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        net.train()
        opt.zero_grad()
        idx = rng.permutation(len(Xt))
        loss = 0
        for i in idx:
            z = net(Xt[i])
            wt = wpos if ytr[i] == 1 else wneg
            loss = loss + wt * nn.functional.binary_cross_entropy_with_logits(z, yt[i])
        (loss / len(Xt)).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        return np.array([float(net(torch.tensor((x - mu) / sd, dtype=torch.float32))) for x in Xte_list])


def _tuned_votes(V: dict, y: np.ndarray, tr: np.ndarray, train_vs: list[str], names: list[str], C: float) -> dict:
    """Vote weights of two variants (w, 1 - w; w in steps of 0.1) that maximise the out-of-fold AUC of an inner
    5-fold split of the training patients only (the held-out fold never sees the choice)."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    if len(names) != 2:
        raise ValueError("vote tuning is implemented for two variants")
    inner = {v: np.zeros(len(tr)) for v in names}
    for a, b in StratifiedKFold(5, shuffle=True, random_state=0).split(tr, y[tr]):
        m = fit_lr(np.concatenate([V[v][tr[a]] for v in train_vs]), np.concatenate([y[tr[a]]] * len(train_vs)), C)
        for v in names:
            inner[v][b] = lr_score(m, V[v][tr[b]])
    grid = np.round(np.linspace(0, 1, 11), 2)
    aucs = [roc_auc_score(y[tr], w * inner[names[0]] + (1 - w) * inner[names[1]]) for w in grid]
    w = float(grid[int(np.argmax(aucs))])
    return {names[0]: w, names[1]: 1 - w}


def run_candidate(D: Data, c: dict, folds: list[np.ndarray]) -> dict:
    """Out-of-fold patient scores for every repeat, and the 15 fold AUCs."""
    from sklearn.metrics import roc_auc_score

    t0 = time.time()
    oof = np.zeros((len(SEEDS), len(D.patients)))
    fold_auc, fallback = [], []
    Xs = [D.feat(s) for s in c["feats"]]
    for r, f in enumerate(folds):
        for k in range(K):
            te = np.where(f == k)[0]
            tr = np.where(f != k)[0]
            P = stage_oof(D, tr) if c["stage"] == "oof" else None
            w, n_fb = image_weights(D, c, P)
            if k == 0:
                fallback.append(n_fb)
            oof[r, te] = _score_fold(D, c, Xs, w, P, tr, te)
            if len(set(D.y[te])) == 2:
                fold_auc.append(float(roc_auc_score(D.y[te], oof[r, te])))
    return {"oof": oof.tolist(), "fold_auc": fold_auc, "fit_seconds": time.time() - t0,
            "fallback_patients": fallback}


def _score_fold(D, c, Xs, w, P, tr, te) -> np.ndarray:
    y = D.y
    how = c["pool"]
    if how == "measured":
        M = measured_patient(D, w, P)
        m = fit_lr(M[tr], y[tr], 1.0)
        return lr_score(m, M[te])
    X = np.concatenate(Xs, 1)
    if how == "mil":
        groups = [np.where((D.img_patient == p) & (w > 0))[0] for p in range(len(D.patients))]
        return mil_fit_predict([X[g] for g in (groups[i] for i in tr)], y[tr], [X[groups[i]] for i in te])
    if how == "separate":
        # acetic and Lugol each with its own model; a patient's score is the mean over the models it has images for
        stage = D.stage_rec if P is None else np.array(D.STAGES)[P.argmax(1)]
        scores, have = np.zeros((2, len(D.patients))), np.zeros((2, len(D.patients)), bool)
        for j, st in enumerate(("acetic", "lugol")):
            ws = w * (stage == st)
            has = np.array([ws[D.img_patient == p].sum() > 0 for p in range(len(D.patients))])
            Xp = pool(D, X, np.where(ws > 0, ws, 0) + 0.0, "mean") if has.any() else None
            trs = tr[has[tr]]
            if Xp is None or len(set(y[trs])) < 2:
                continue
            m = fit_lr(Xp[trs], y[trs], c["C"])
            scores[j, te] = np.where(has[te], lr_score(m, np.nan_to_num(Xp[te])), 0)
            have[j, te] = has[te]
        n = have[:, te].sum(0)
        return np.where(n > 0, scores[:, te].sum(0) / np.maximum(n, 1), 0.0)
    if c["variants"]:
        # original and segmented images train together (two rows per patient); each variant is scored and the
        # log-odds are combined by the weighted vote
        base = c["feats"][0]
        bb, inp, size, _ = base.split(":")
        V = {v: pool(D, D.feat(f"{bb}:{c.get('vinput', {}).get(v, inp)}:{size}:{v}"), w) for v in c["variants"]}
        train_vs = [v for v in ("original", "segmented") if v in c["variants"]] or list(c["variants"])
        m = fit_lr(np.concatenate([V[v][tr] for v in train_vs]), np.concatenate([y[tr]] * len(train_vs)), c["C"])
        weights = dict(c["variants"])
        if c.get("tune_votes"):
            weights = _tuned_votes(V, y, tr, train_vs, list(c["variants"]), c["C"])
        tot = sum(weights.values())
        return sum(wt / tot * lr_score(m, V[v][te]) for v, wt in weights.items())
    Xp = pool(D, X, w, "meanmax" if how == "meanmax" else "mean")
    if how == "stack":
        # inner 5-fold on the training patients gives their out-of-fold image score; a small regression then
        # combines it with the measured features
        from sklearn.model_selection import StratifiedKFold

        inner = np.zeros(len(tr))
        for a, b in StratifiedKFold(5, shuffle=True, random_state=0).split(tr, y[tr]):
            inner[b] = lr_score(fit_lr(Xp[tr[a]], y[tr[a]], c["C"]), Xp[tr[b]])
        M = measured_patient(D, w, P)
        m2 = fit_lr(np.column_stack([inner, M[tr]]), y[tr], 0.1)
        s_te = lr_score(fit_lr(Xp[tr], y[tr], c["C"]), Xp[te])
        return lr_score(m2, np.column_stack([s_te, M[te]]))
    m = fit_lr(Xp[tr], y[tr], c["C"])
    return lr_score(m, Xp[te])


# --------------------------------------------------------------------------- metrics

def spec_at_sens(y, s, target=0.9) -> float:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, s)
    ok = tpr >= target
    return float((1 - fpr[ok]).max()) if ok.any() else 0.0


def summarise(D: Data, c: dict, res: dict) -> dict:
    from sklearn.metrics import roc_auc_score

    oof = np.array(res["oof"])
    y = D.y
    aucs = [roc_auc_score(y, o) for o in oof]
    by_src = {s: float(np.mean([roc_auc_score(y[D.source == s], o[D.source == s]) for o in oof]))
              for s in ("iarc", "annocerv")}
    spec = float(np.mean([spec_at_sens(y, o) for o in oof]))
    # bootstrap over patients of the repeat-averaged out-of-fold scores (each repeat standardised first)
    z = np.mean([(o - o.mean()) / (o.std() + 1e-12) for o in oof], 0)
    rng = np.random.default_rng(0)
    bs = []
    for _ in range(2000):
        i = rng.integers(0, len(y), len(y))
        if len(set(y[i])) == 2:
            bs.append(roc_auc_score(y[i], z[i]))
    cost_ms = 0.0
    n_var = len(c["variants"] or {"original": 1})
    for s in c["feats"]:
        cost_ms += D.net_ms(s) * n_var * (4 if ":tiles:" in s else 1)
    ips = 1000.0 / (OTHER_STEPS_MS + cost_ms / 2)
    return {"name": c["name"], "group": c["group"], "auc": float(np.mean(aucs)), "auc_repeats": [float(a) for a in aucs],
            "ci": [float(np.percentile(bs, 2.5)), float(np.percentile(bs, 97.5))], "auc_iarc": by_src["iarc"],
            "auc_annocerv": by_src["annocerv"], "spec90": spec, "fold_auc": res["fold_auc"],
            "cost_ms_1thread": cost_ms, "est_img_s": ips, "fit_seconds": res["fit_seconds"],
            "fallback_patients": res["fallback_patients"], "n_inputs": n_var,
            "recorded_stage": c["stage"] == "recorded" and c["select"] != "all"}


def render(rows: list[dict], best: dict | None, why: list[str], n_img: int, n_pat: int,
           xsrc: list[dict] | None = None) -> str:
    L = [START, "## Patient decision: candidates (`benchmarks/decision.py`)", "",
         f"{n_pat} patients, {n_img} images of `../shared/data/visits`; 5-fold patient-wise cross-validation "
         f"repeated {len(SEEDS)} times (label x source strata, seeds {', '.join(map(str, SEEDS))}); frozen ImageNet "
         "EfficientNet-Lite features (offline weights), standardised, class-balanced logistic regression "
         f"(C = {C_DEFAULT} unless named). AUC: pooled out-of-fold patient AUC, mean of the repeats (95 % CI: "
         "patient bootstrap); spec@90: specificity at 90 % sensitivity; ms: backbone time per screened image, one "
         "thread; img/s: the rule's estimate on two cores; fit: seconds for all 15 folds when the candidate "
         "was first run (the 15 folds' stage regressions are now fitted once and shared, so a fresh run is faster). "
         "Images are chosen by the "
         "stage model's out-of-fold prediction unless the row says recorded stage; 'fallback' counts patients "
         "with no selected image (they use all their images).", "",
         "| candidate | AUC (95 % CI) | repeats | IARC | AnnoCerv | spec@90 | ms | img/s | fit s | fallback |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " **(chosen)**" if best is not None and r["name"] == best["name"] else ""
        if best is not None and r["name"] == structure(rows, best)[0]["name"] and r is not best:
            mark = " **(shipped)**"
        L.append(f"| {r['name']}{mark} | {r['auc']:.3f} ({r['ci'][0]:.2f}–{r['ci'][1]:.2f}) | "
                 f"{' '.join(f'{a:.3f}' for a in r['auc_repeats'])} | {r['auc_iarc']:.3f} | {r['auc_annocerv']:.3f} | "
                 f"{100 * r['spec90']:.0f} % | {r['cost_ms_1thread']:.0f} | {r['est_img_s']:.1f} | "
                 f"{r['fit_seconds']:.0f} | {max(r['fallback_patients'])} |")
    L += ["", "Selection (rule in `docs/model-selection.md`):", ""] + [f"- {w}" for w in why]
    if best is not None:
        L += ["", f"Chosen by rules 1 and 2: **{best['name']}**."]
        shipped, why3 = structure(rows, best)
        L += ["", "Rule 3 (the study's structure):", ""] + [f"- {w}" for w in why3]
        L += ["", f"Shipped as 2.0.0: **{shipped['name']}**: AUC {shipped['auc']:.3f} "
                  f"({shipped['ci'][0]:.2f}–{shipped['ci'][1]:.2f}), IARC {shipped['auc_iarc']:.3f}, "
                  f"AnnoCerv {shipped['auc_annocerv']:.3f}, specificity at 90 % sensitivity "
                  f"{100 * shipped['spec90']:.0f} %."]
    L += ["", HISTORY]
    L += shipped_lines()
    if xsrc:
        L += ["", "### From one source to the other", "",
              "Each candidate fitted on every patient of one source and scored on every patient of the other (a "
              "camera, clinic and labelling it never saw; the closest these data come to the held-back devices). "
              "Reported, not used for the choice.", "",
              "| candidate | fitted on IARC, AUC on AnnoCerv | fitted on AnnoCerv, AUC on IARC |", "|---|---|---|"]
        L += [f"| {r['name']} | {r['iarc->annocerv']:.3f} | {r['annocerv->iarc']:.3f} |" for r in xsrc]
    L.append(END)
    return "\n".join(L) + "\n"


#: Candidates whose transfer from one source to the other is reported (the chosen, the shipped, their neighbours)
CROSS_SOURCE = ("I1 ", "F1s ", "F1 ", "F2 ", "I3 ", "M5 ", "M4 ", "B4 ", "S1 ")


def cross_source(D: Data) -> list[dict]:
    """Fit on every patient of one source, score every patient of the other: how a candidate carries over to a
    camera, clinic and labelling it never saw (the closest these data come to the held-back devices). The
    stage model is the regression refitted on all images here (AnnoCerv alone has only acetic-acid images)."""
    from sklearn.metrics import roc_auc_score

    out = []
    P_all = stage_oof(D, np.arange(len(D.patients)))
    for c in candidates():
        if not any(c["name"].startswith(k) for k in CROSS_SOURCE):
            continue
        try:
            Xs = [D.feat(s) for s in c["feats"]]
            for s in needed_specs([c]):
                D.feat(s)
        except FileNotFoundError:
            continue
        P = P_all if c["stage"] == "oof" else None
        w, _ = image_weights(D, c, P)
        row = {"name": c["name"]}
        for a, b in (("iarc", "annocerv"), ("annocerv", "iarc")):
            tr, te = np.where(D.source == a)[0], np.where(D.source == b)[0]
            row[f"{a}->{b}"] = float(roc_auc_score(D.y[te], _score_fold(D, c, Xs, w, P, tr, te)))
        out.append(row)
    return out


HISTORY = """How the table grew (so that its numbers are read as what they are): the rows B1-B6, I1-I6, S1-S5,
M1-M9 and P1-P4 were defined before any candidate had run. After the first table, the cheaper
predicted-stage rows I0, I0c and S6-S9 and the 224 px variant rows M10-M12 were added; then, because the whole
frame beat the cervix crop for frozen features (I1 against I3, S7 against S6), the rows F1-F3 and F1s (the
whole frame as the original view, the segmented view from the cervix crop; the pipeline's `classify_view`
option was added for them). F4 (the two views' vote weights tuned by an inner cross-validation of each
training fold) was added after 2.0.0 had been chosen and shipped. The recorded-stage clause of rule 1 was added after the first table, before the
choice. Fine-tuned networks were not run as candidates on these folds: on two CPU cores one fine-tuning run
of 12 epochs at 160 px over 5 folds took hours; the fine-tuned Lite0 of weights 1.2.0 (cervix crop, 160 px)
scored 0.666 on its own 5 folds (seed 0), below every frozen 384 px candidate here."""


def shipped_lines() -> list[str]:
    """The shipped recipe through ``cervscan train-decision`` (runs/decision-2.0.0, runs/decision-nogate) and
    through ``cervscan evaluate --cv-run`` (runs/eval-cv-2.0.0), when those runs exist."""
    L = []
    runs = [("with the quality gate (shipped)", ROOT / "runs" / "decision-2.0.0"),
            ("without the gate (`--no-quality-gate`: every image of every stage)", ROOT / "runs" / "decision-nogate")]
    rows = []
    for what, d in runs:
        f = d / "metrics.json"
        if not f.is_file():
            continue
        m = json.loads(f.read_text())
        bs = m.get("by_source") or {}
        rows.append(f"| {what} | {m['patients']} | {m['eligible_images']} | {m['auc_mean_of_repeats']:.3f} | "
                    + " ".join(f"{a:.3f}" for a in m["auc_repeats"]) + " | "
                    + " | ".join(f"{(bs.get(k) or {}).get('auc', float('nan')):.3f}" for k in ("iarc-colpo-bank", "annocerv"))
                    + f" | {m['operating_point']['threshold']:.3f} | {100 * m['sensitivity_mean_of_repeats']:.0f} % | "
                    f"{100 * m['specificity_mean_of_repeats']:.0f} % |")
    if rows:
        L += ["", "### The shipped recipe through `cervscan train-decision`", "",
              "The chosen candidate as `train-decision` fits it: images through the screening pipeline with the shipped "
              "stage model (its own training images, so the stage is nearly always right here) and the quality gate; "
              "5 folds x 3 repeats (the harness's folds, drawn over all 203 labelled patients; a patient without an "
              "eligible image is neither trained on nor scored, so both rows use the same folds); Platt "
              "calibration on the pooled out-of-fold scores; threshold for 90 % sensitivity; sensitivity and "
              "specificity at it, mean of the repeats. A first run with the gate drew its folds over the 199 "
              "eligible patients only (other splits): AUC 0.726 (0.729, 0.697, 0.753), specificity 16 % at the "
              "same target; the folds were then tied to all labelled patients so that the two rows compare the "
              "same splits.", "",
              "| run | patients | eligible images | AUC | repeats | IARC | AnnoCerv | threshold | sensitivity | specificity |",
              "|---|---|---|---|---|---|---|---|---|---|", *rows]
    ev = ROOT / "runs" / "eval-cv-2.0.0" / "metrics.json"
    if ev.is_file():
        e = json.loads(ev.read_text())
        bs = e.get("by_source") or {}
        L += ["", "Through the screening path (`cervscan evaluate ../shared/data/visits --labels "
              "../shared/data/visits/labels.csv --cv-run runs/decision-2.0.0`: each patient of repeat 0 screened "
              f"from the image files by the fold model that did not train on it): AUC {e['auc']:.3f} "
              f"({e['ci95']['auc'][0]:.2f}–{e['ci95']['auc'][1]:.2f}), sensitivity {100 * e['sensitivity']:.0f} %, "
              f"specificity {100 * e['specificity']:.0f} % on {e['patients']} patients ({e['patients_inadequate']} "
              "inadequate); " + "; ".join(f"{k}: AUC {v['auc']:.3f}, sensitivity {100 * v['sensitivity']:.0f} %, "
                                           f"specificity {100 * v['specificity']:.0f} %" for k, v in bs.items() if 'auc' in v) + "."]
    return L


def write_block(text: str) -> None:
    from results_md import replace_block

    replace_block(START, END, text, RESULTS)


def cmd_features(cache: Path, only: list[str] | None = None) -> None:
    rows = F.image_rows()
    pipe, refs = F.load_pipe()
    d = F.run_prep(rows, pipe, refs, cache)
    preps = F.load_prep(rows, d)
    for spec in needed_specs(candidates()):
        if only and not any(o in spec for o in only):
            continue
        F.run_features(rows, preps, spec, pipe, cache)


def cmd_run(cache: Path, names: list[str] | None, write: bool) -> list[dict]:
    OUT.mkdir(parents=True, exist_ok=True)
    store = OUT / "results.json"
    saved = json.loads(store.read_text()) if store.exists() else {}
    D = Data(cache)
    folds = D.folds()
    rows = []
    for c in candidates():
        if names and not any(n in c["name"] for n in names):
            continue
        key = cand_key(c)
        try:
            for s in needed_specs([c]):
                D.feat(s)
        except FileNotFoundError as e:
            print(f"skip {c['name']}: features missing ({e})", flush=True)
            continue
        if key not in saved:
            saved[key] = run_candidate(D, c, folds)
            tmp = store.with_suffix(".tmp")
            tmp.write_text(json.dumps(saved))
            tmp.replace(store)
        r = summarise(D, c, saved[key])
        rows.append(r)
        print(f"{r['name']:<64} AUC {r['auc']:.3f} ({r['ci'][0]:.2f}-{r['ci'][1]:.2f}) iarc {r['auc_iarc']:.3f} "
              f"anno {r['auc_annocerv']:.3f} spec90 {r['spec90']:.2f} ms {r['cost_ms_1thread']:.0f} "
              f"fit {r['fit_seconds']:.0f}s", flush=True)
    best, why = choose(rows)
    shipped, why3 = structure(rows, best)
    (OUT / "table.json").write_text(json.dumps({"rows": rows, "chosen": best and best["name"], "why": why,
                                                "shipped": shipped and shipped["name"], "why_structure": why3}, indent=1))
    if write and not names:
        xsrc = cross_source(D)
        for r in xsrc:
            print(f"{r['name']:<64} IARC->AnnoCerv {r['iarc->annocerv']:.3f} AnnoCerv->IARC {r['annocerv->iarc']:.3f}")
        write_block(render(rows, best, why, len(D.rows), len(D.patients), xsrc))
        t = json.loads((OUT / "table.json").read_text())
        t["cross_source"] = xsrc
        (OUT / "table.json").write_text(json.dumps(t, indent=1))
    for w in why:
        print(w)
    print("chosen:", best and best["name"])
    for w in why3:
        print(w)
    print("shipped:", shipped and shipped["name"])
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["features", "run", "all"])
    ap.add_argument("--only", nargs="*", help="features: only specs containing these strings; run: only these candidates")
    ap.add_argument("--cache", default=str(F.CACHE))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    cache = Path(a.cache)
    if a.command in ("features", "all"):
        cmd_features(cache, a.only if a.command == "features" else None)
    if a.command in ("run", "all"):
        cmd_run(cache, a.only if a.command == "run" else None, not a.no_write)


if __name__ == "__main__":
    main()
