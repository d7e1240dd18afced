"""``cervscan adapt``: a site's own decision from its labelled visits, and its refusals.

Fast: the image features of the frozen recipe are replaced by synthetic ones (one informative direction and
noise, per image with its quality measures and stage), except in the last test, which runs a handful of real
``via-visits`` patients through the real extraction (cached) with the shipped models. The installed decision
these runs compare with is a frozen-recipe checkpoint written by the recipe's own writer, whose head scores
the true direction.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from cervscan import api
from cervscan.cli import app
from cervscan.config import GateConfig, ScreenConfig, VotingConfig, load_config_file
from cervscan.errors import EXIT_ERROR, EXIT_NOT_VALIDATED, CervscanError, DataError
from cervscan.files import read_labels
from cervscan.metrics import paired_auc_delta
from cervscan.models import registry
from cervscan.models.networks import read_checkpoint
from cervscan.pipeline import quality
from cervscan.training import classifier as frozen
from cervscan.training.adapt_candidates import Candidate, candidates, select
from cervscan.training.validation import ValidationFailed

from conftest import write_image

DIM = 1280
STAGE_OF = ("saline", "acetic", "lugol")  # the three images of every synthetic visit, in order
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def flat(text: str) -> str:
    return "".join(text.split())


# --------------------------------------------------------------------------- a synthetic site

def _backbone(name: str):
    torch.manual_seed(0)  # the same "frozen" network every time it is built
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2).eval()


class _Pipe:
    """What adapt uses of the screening pipeline: its configuration and its gate."""

    def __init__(self):
        self.cfg = ScreenConfig(voting=VotingConfig(variants=("original", "segmented"), pooling="logit"),
                                gate=GateConfig(decision_stages=("acetic",)))

    def gate(self, q, p):
        return quality.gate(q, self.cfg.gate, stage=p.stage, stage_confidence=p.stage_confidence,
                            cervix_found=p.cervix_found)


def make_site(root: Path, n: int = 60, severe: int = 20, *, strength: float = 8.0, seed: int = 0) -> dict:
    """``n`` visit folders of three small images (saline, acetic, Lugol) and their labels; the synthetic features
    are ``strength`` x label along the unit direction ``u`` (spread over every dimension) plus noise, on the acetic
    images only (the others: noise). Returns paths, labels and ``u``."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=DIM)
    u /= np.linalg.norm(u)
    visits = root / "visits"
    labels = {f"S{i:03d}": int(i < severe) for i in range(n)}
    for pid in labels:
        for k in range(3):
            write_image(visits / pid / f"{pid}_{k}.jpg", np.full((40, 40, 3), 100 + k, np.uint8))
    csv_path = root / "labels.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "label", "source"])
        w.writerows([(p, y, "site") for p, y in labels.items()])
    return {"visits": visits, "labels": csv_path, "y": labels, "u": u, "strength": strength, "seed": seed}


def fake_extraction(monkeypatch, site: dict, *, glare_every: int = 0):
    """Replace the frozen recipe's pipeline, backbone and extraction by the synthetic site's (``glare_every``: every
    k-th image gets strong glare)."""
    rng = np.random.default_rng(site["seed"] + 1)
    feats: dict[str, np.ndarray] = {}

    def extract(cfg, pipe, refs, items, model, progress=None):
        out = []
        for i, (pid, path) in enumerate(items):
            stage = STAGE_OF[int(path.stem[-1])]
            if path.name not in feats:
                signal = site["strength"] * (2 * site["y"][pid] - 1) / 2 if stage == "acetic" else 0.0
                feats[path.name] = signal * site["u"] + rng.normal(size=DIM)
            f = feats[path.name]
            q = {"sharpness": 0.6, "brightness": 140.0, "overexposed": 0.05,
                 "glare": 0.2 if glare_every and i % glare_every == 0 else 0.001, "cervix_px": 400.0}
            out.append({"quality": q, "stage": stage, "stage_confidence": 0.95, "cervix_found": True,
                        "feats": {v: f for v in cfg.variants}, "eligible": True, "reason": ""})
            if progress:
                progress(i + 1, len(items))
        return out

    refs = {r: SimpleNamespace(label=f"{r}@test", sha256=r * 8) for r in ("stage", "cervix", "segmenter")}
    monkeypatch.setattr(frozen, "_pipeline", lambda cfg: (_Pipe(), refs))
    monkeypatch.setattr(frozen, "backbone", _backbone)
    monkeypatch.setattr(frozen, "extract", extract)
    monkeypatch.setattr(registry, "shipped_file", lambda role: None)  # no pooling unless a test gives features


def installed_checkpoint(path: Path, u: np.ndarray, *, input_size: int = 384) -> Path:
    """A frozen-recipe classifier (written by the recipe's own writer) whose linear head scores ``u``."""
    from cervscan.training.configs import DecisionTrainConfig

    cfg = DecisionTrainConfig(visits="-", labels="-", out="-", input_size=input_size, name="installed", version="t")
    model = (SimpleNamespace(mean_=np.zeros(DIM), scale_=np.ones(DIM)),
             SimpleNamespace(coef_=u[None], intercept_=np.zeros(1)))
    calib = SimpleNamespace(a=1.0, c=0.0, thr=0.5, op={"threshold": 0.5})
    metrics = {"evaluation": "test", "validation": {"passed": True, "auc": 0.9, "ci_low": 0.8, "ci_high": 1.0}}
    frozen._write_checkpoint(cfg, _Pipe(), _backbone("lite0"), calib, metrics, model, path, "test", {})
    return path


def run_kwargs(site: dict, out: Path, installed: Path, **kw) -> dict:
    return {"visits": str(site["visits"]), "labels": str(site["labels"]), "out": str(out), "cls_model": str(installed),
            "repeats": 1, "n_bootstrap": 500, "curve_draws": 3, "training_features": str(out.parent / "none.npz"),
            **kw}


@pytest.fixture
def site(tmp_path, monkeypatch):
    s = make_site(tmp_path)
    fake_extraction(monkeypatch, s, glare_every=7)
    s["installed"] = installed_checkpoint(tmp_path / "installed.pt", s["u"])
    return s


# --------------------------------------------------------------------------- RUN/

def test_adapt_writes_what_the_site_needs(site, tmp_path):
    out = tmp_path / "run"
    m = api.adapt(**run_kwargs(site, out, site["installed"], decision_stages=("acetic",)))
    for name in ("model.pt", "site.toml", "metrics.json", "comparison.json", "adapt.md", "oof.csv"):
        assert (out / name).is_file(), name
    # the config file screen --config reads: the site's gate thresholds, stages and the threshold
    cfg = load_config_file(out / "site.toml")
    assert cfg["decision_stages"] == ["acetic"] and cfg["threshold"] == pytest.approx(m["operating_point"]["threshold"])
    assert cfg["max_glare"] == m["gate"]["site"]["max_glare"] and cfg["max_glare"] > 0.016  # glare is common here
    ck = read_checkpoint(out / "model.pt")
    assert ck["kind"] == "classifier" and ck["recipe"] == "frozen-linear" and ck["decision_stages"] == ["acetic"]
    assert ck["validation"]["passed"] and ck["site"]["fitted_on"] == "local" and ck["site"]["installable"]
    assert ck["threshold"] == pytest.approx(m["operating_point"]["threshold"])
    comp = json.loads((out / "comparison.json").read_text())
    assert comp["installable"] is True and comp["inadequate"]["installed"] > 0 == comp["inadequate"]["adapted"]
    assert comp["paired"]["patients"] == 60 - comp["inadequate"]["installed"]  # those the installed gate decides
    assert comp["installed"]["how"].startswith("its folded linear head")
    assert comp["installed"]["auc"] > 0.9  # the installed head knows the true direction
    card = (out / "adapt.md").read_text()
    for part in ("## Patients", "## The adapted decision", "## Compared with the installed decision",
                 "## Quality gate and stage policy", "## Learning curve", "## Warnings", "Installable: yes"):
        assert part in card, part
    assert [r["train_patients"] for r in m["learning_curve"]["local"]] == [10, 20, 40, "all 60"]
    assert m["warnings"] and "fewer than 30" in m["warnings"][0]  # 20 severe patients


def test_adapt_measures_every_candidate_and_chooses_by_the_rule(site, tmp_path):
    """No --stages, --gate or --pool: the four candidates (two stage policies x two gates, local only: no shipped
    features here) are measured on the same folds and kept; the choice is the rule's on those numbers; the nested
    cross-validation repeats the choice in each of the 5 outer folds."""
    m = api.adapt(**run_kwargs(site, tmp_path / "run", site["installed"]))
    rows = m["choice"]["candidates"]
    assert [r["key"] for r in rows] == ["acetic/installed-gate/local", "acetic/site-gate/local",
                                        "every-stage/installed-gate/local", "every-stage/site-gate/local"]
    assert all(r["allowed"] and r["auc"] is not None for r in rows) and sum(r["chosen"] for r in rows) == 1
    assert [r["departures"] for r in rows] == [0, 1, 1, 2]
    key, _ = select(rows, margin=0.01, max_inadequate=0.10)
    assert m["candidate"] == key == next(r["key"] for r in rows if r["chosen"])
    # 1 image in 7 has strong glare, so the installed gate leaves too many patients without an eligible acetic image
    assert rows[0]["inadequate_rate"] > 0.10 >= rows[1]["inadequate_rate"]
    sp = m["stage_policy"]  # the stage model's drops are still reported
    assert sp["installed"] == ["acetic"] and sp["share"] == pytest.approx(2 / 3) and key in sp["why"]
    assert sp["stages"] == next(r["stages"] for r in rows if r["chosen"])
    n = m["nested"]
    assert 0.5 < n["auc"] <= 1 and n["ci_low"] <= n["auc"] <= n["ci_high"] and sum(n["chosen_in_outer_folds"].values()) == 5
    assert load_config_file(tmp_path / "run" / "site.toml")["decision_stages"] == sp["stages"]
    card = (tmp_path / "run" / "adapt.md").read_text()
    assert "## Candidates" in card and all(r["key"] in card for r in rows) and "nested cross-validated AUC" in card
    fixed = api.adapt(**run_kwargs(site, tmp_path / "run2", site["installed"], gate="installed"))
    assert fixed["gate"]["chosen"] == "installed" and fixed["candidate"].endswith("/installed-gate/local")
    assert [r["allowed"] for r in fixed["choice"]["candidates"]] == [True, False, True, False]
    assert fixed["gate"]["site"] == fixed["gate"]["installed"] != fixed["gate"]["derived"]


def test_adapt_pools_with_the_shipped_training_patients(site, tmp_path):
    rng = np.random.default_rng(7)
    y = np.repeat([0, 1], 40)
    X = {v: ((2 * y - 1)[:, None] * site["u"] * 1.25 + rng.normal(size=(80, DIM))).astype(np.float16)
         for v in ("original", "segmented")}
    meta = {"recipe": {"backbone": "lite0", "input_size": 384, "classify_view": "frame"}, "models": {}}
    feats = tmp_path / "shipped.npz"
    np.savez(feats, patient_id=np.array([f"T{i}" for i in range(80)]), label=y.astype(np.int8),
             source=np.array(["shipped"] * 80), meta=np.array(json.dumps(meta)), **X)
    m = api.adapt(**{**run_kwargs(site, tmp_path / "run", site["installed"], decision_stages=("acetic",)),
                     "training_features": str(feats)})
    assert set(m["choice"]["auc_mean_of_repeats"]) == {"local", "pooled"}
    assert m["chosen"] == max(m["choice"]["auc_mean_of_repeats"], key=m["choice"]["auc_mean_of_repeats"].get)
    assert m["training_features"]["patients"] == 80 and set(m["learning_curve"]) == {"local", "pooled"}
    ck = read_checkpoint(tmp_path / "run" / "model.pt")
    assert ck["site"]["fitted_on"] == m["chosen"]


# --------------------------------------------------------------------------- refusals

def test_too_few_patients_in_a_class_is_refused_naming_the_numbers(tmp_path, monkeypatch):
    s = make_site(tmp_path, n=30, severe=8)
    fake_extraction(monkeypatch, s)
    inst = installed_checkpoint(tmp_path / "installed.pt", s["u"])
    with pytest.raises(DataError, match=r"8 severe \(label 1\) and 22 mildly normal .* at least 10 of each class"):
        api.adapt(**run_kwargs(s, tmp_path / "run", inst))
    assert not (tmp_path / "run").exists()  # refused before anything was screened or written
    m = api.adapt(**run_kwargs(s, tmp_path / "run", inst, force=True, decision_stages=("acetic",)))
    assert m["forced"] and m["warnings"][0].startswith("FORCED")
    assert "FORCED (--force)" in (tmp_path / "run" / "adapt.md").read_text()


def test_shuffled_labels_end_in_exit_6_naming_the_auc_and_its_ci(tmp_path, monkeypatch):
    s = make_site(tmp_path, n=40, severe=20)  # the features follow the true labels; the file's are shuffled
    fake_extraction(monkeypatch, s)
    shuffled = np.random.default_rng(3).permutation(list(s["y"].values()))
    s["labels"].write_text("patient_id,label,source\n" + "".join(f"{p},{y},site\n" for p, y in zip(s["y"], shuffled)),
                           encoding="utf-8")
    inst = installed_checkpoint(tmp_path / "installed.pt", s["u"])
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["adapt", str(s["visits"]), "--labels", str(s["labels"]), "-o", str(out),
                                 "--cls-model", str(inst), "--repeats", "1", "--stages", "acetic"])
    assert r.exit_code == EXIT_NOT_VALIDATED, r.output
    text = flat(r.output)
    assert "NOBETTERTHANCHANCE" in text or "BELOWCHANCE" in text
    v = json.loads((out / "metrics.json").read_text())["validation"]
    assert f"AUC{v['auc']:.3f}(95%CI{v['ci_low']:.3f}-{v['ci_high']:.3f}" in text and v["ci_low"] <= 0.5
    assert not (out / "model.pt").exists() and not (out / "site.toml").exists()
    assert "Installable: NO" in (out / "adapt.md").read_text()


def test_an_adapted_decision_worse_than_the_installed_one_is_not_installable(tmp_path, monkeypatch):
    # the signal is spread over 1280 dimensions: 80 local patients cannot find its direction well, the
    # installed head knows it
    s = make_site(tmp_path, n=80, severe=40, strength=2.5)
    fake_extraction(monkeypatch, s)
    inst = installed_checkpoint(tmp_path / "installed.pt", s["u"])
    m = api.adapt(**run_kwargs(s, tmp_path / "run", inst, decision_stages=("acetic",), force=True))
    comp = json.loads((tmp_path / "run" / "comparison.json").read_text())
    p = comp["paired"]
    assert p["auc_delta"] < 0 and p["ci95"][1] < 0
    assert comp["installable"] is False and m["installable"] is False
    why = comp["not_installable_because"][-1]
    assert "worse than the installed decision" in why
    assert f"AUC {comp['adapted']['auc']:.3f} against {comp['installed']['auc']:.3f}" in why
    assert f"difference {p['auc_delta']:+.3f} (95 % CI {p['ci95'][0]:+.3f} to {p['ci95'][1]:+.3f})" in why
    assert read_checkpoint(tmp_path / "run" / "model.pt")["site"]["installable"] is False
    assert "Installable: NO" in (tmp_path / "run" / "adapt.md").read_text()


def test_paired_auc_delta_of_repeats_is_the_mean_of_the_rows():
    y = np.repeat([0, 1], 10)
    a = np.linspace(0, 1, 20)  # AUC 1
    b = np.stack([a, a[::-1]])  # AUC 1 and 0
    d = paired_auc_delta(y, a, b, n=200)
    assert d["delta"] == pytest.approx(-0.5) and d["ci95"][0] <= -0.5 <= d["ci95"][1]
    assert paired_auc_delta(y, a, a, n=50)["delta"] == 0.0


def _row(key, auc, inadequate_rate=0.0, departures=0, allowed=True):
    return {"key": key, "auc": auc, "inadequate_rate": inadequate_rate, "departures": departures, "allowed": allowed}


def test_selection_keeps_the_installed_settings_unless_a_change_gains_more_than_the_margin():
    installed, change, two = _row("inst", 0.80), _row("gate", 0.81, departures=1), _row("both", 0.805, departures=2)
    assert select([installed, change, two], margin=0.01, max_inadequate=0.1)[0] == "inst"  # +0.01: a tie
    assert select([installed, _row("gate", 0.8101, departures=1), two], margin=0.01, max_inadequate=0.1)[0] == "gate"
    # among the tied, fewest departures first, then the higher AUC, then the candidates' order
    rows = [_row("a", 0.70), _row("b", 0.90, departures=2), _row("c", 0.895, departures=1), _row("d", 0.899, departures=1)]
    key, why = select(rows, margin=0.01, max_inadequate=0.1)
    assert key == "d" and "best AUC 0.900" in why and "3 within 0.01" in why
    assert select([_row("x", 0.8, departures=1), _row("y", 0.8, departures=1)], margin=0.0, max_inadequate=0.1)[0] == "x"
    # a candidate the options fix out, or one that could not be measured, is never chosen
    rows = [_row("inst", 0.6), _row("fixed-out", 0.99, allowed=False), _row("none", None)]
    assert select(rows, margin=0.01, max_inadequate=0.1)[0] == "inst"
    with pytest.raises(DataError, match="no candidate"):
        select([_row("none", None), _row("nan", float("nan"))], margin=0.01, max_inadequate=0.1)


def test_selection_caps_the_inadequate_share_unless_every_candidate_exceeds_it():
    rows = [_row("inst", 0.90, inadequate_rate=0.18), _row("site", 0.70, inadequate_rate=0.10, departures=1),
            _row("all", 0.75, inadequate_rate=0.0, departures=2)]
    assert select(rows, margin=0.01, max_inadequate=0.10)[0] == "all"  # 0.10 is allowed, 0.18 is not
    assert select(rows, margin=0.01, max_inadequate=0.20)[0] == "inst"
    rows = [_row("inst", 0.80, inadequate_rate=0.3), _row("site", 0.85, inadequate_rate=0.2, departures=1)]
    key, why = select(rows, margin=0.01, max_inadequate=0.10)
    assert key == "site" and "every candidate leaves more than 10%" in why


def test_candidates_follow_the_options_and_count_departures_from_the_installed_settings():
    cfg = SimpleNamespace(decision_stages=None, gate="auto", pool="auto")
    cs = candidates(cfg, ("acetic",), pooled=True)
    assert len(cs) == 8 and all(c.allowed for c in cs)
    assert {c.key: c.departures for c in cs}["acetic/installed-gate/pooled"] == 0
    assert {c.key: c.departures for c in cs}["every-stage/site-gate/local"] == 3
    cs = candidates(SimpleNamespace(decision_stages=("acetic", "lugol"), gate="site", pool="local"), ("acetic",), True)
    assert len(cs) == 12 and [c.key for c in cs if c.allowed] == ["acetic+lugol/site-gate/local"]
    assert [c.departures for c in candidates(cfg, ("acetic",), pooled=False)] == [0, 1, 1, 2]
    assert isinstance(cs[0], Candidate)


# --------------------------------------------------------------------------- labels CSV

@pytest.mark.parametrize("sep, end, bom", [(",", "\r\n", True), (";", "\n", False), (";", "\r\n", True),
                                           ("\t", "\n", False)])
def test_labels_csv_with_bom_semicolons_and_windows_line_ends(tmp_path, sep, end, bom):
    text = end.join([sep.join(["patient_id", "label", "source"]), sep.join(["P1", "1", "A"]), sep.join(["P2", "0", ""]),
                     sep.join(["P3", "", "A"])]) + end
    p = tmp_path / "labels.csv"
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    rows, unlabelled = read_labels(p)
    assert rows == [{"patient_id": "P1", "label": 1, "source": "A"}, {"patient_id": "P2", "label": 0, "source": ""}]
    assert unlabelled == 1


def test_labels_csv_names_every_bad_value(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("patient_id;label\nP1;yes\nP2;1\nP3;2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"label must be 0 or 1.*2 row\(s\).*line 2, patient P1: 'yes'; "
                                        r"line 4, patient P3: '2'"):
        read_labels(p)


def test_adapt_names_the_label_problems(site, tmp_path):
    extra = site["visits"] / "NOLABEL"
    shutil.copytree(site["visits"] / "S000", extra)
    with open(site["labels"], "a", newline="", encoding="utf-8") as f:
        f.write("GONE,1,site\nS001,1,site\n")
    m = api.adapt(**run_kwargs(site, tmp_path / "run", site["installed"], decision_stages=("acetic",)))
    lc = m["labels_check"]
    assert lc["labelled_without_folder"] == ["GONE"] and lc["folders_without_label"] == ["NOLABEL"]
    assert lc["duplicates"][0]["patient_id"] == "S001"
    card = (tmp_path / "run" / "adapt.md").read_text()
    assert "GONE" in card and "NOLABEL" in card and "S001" in card
    one = tmp_path / "one.csv"
    one.write_text("patient_id,label\n" + "".join(f"S{i:03d},0\n" for i in range(20, 60)), encoding="utf-8")
    with pytest.raises(DataError, match=r"both classes.*40 labelled 0 \(mildly normal\) and 0 labelled 1"):
        api.adapt(**{**run_kwargs(site, tmp_path / "run2", site["installed"]), "labels": str(one)})


# --------------------------------------------------------------------------- the command line

def test_cli_adapt_screens_with_a_classifier_of_another_kind(site, tmp_path, tiny_models):
    """A classifier that is not of the frozen recipe (here a tiny RepVGG) is compared by screening with it."""
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["adapt", str(site["visits"]), "--labels", str(site["labels"]), "-o", str(out),
                                 "--cls-model", str(tiny_models["cls"]), "--seg-model", str(tiny_models["seg"]),
                                 "--cervix-model", str(tiny_models["cervix"]), "--repeats", "1",
                                 "--stages", "acetic"])
    assert r.exit_code == 0, r.output
    assert "adapteddecision(local" in flat(r.output)
    comp = json.loads((out / "comparison.json").read_text())
    assert comp["installed"]["how"].startswith("screened")
    assert comp["installed"]["model"].startswith("tiny-cls") or "cls" in comp["installed"]["model"]
    r = CliRunner().invoke(app, ["adapt", str(site["visits"]), "--labels", str(site["labels"]), "-o", str(out),
                                 "--pool", "sometimes"])
    assert r.exit_code == EXIT_ERROR and "--poolmustbeoneof" in flat(r.output)


# --------------------------------------------------------------------------- benchmarks/site_curve.py

def test_site_curve_on_a_tiny_site_with_a_pool_of_other_patients(tmp_path, monkeypatch):
    """The benchmark's path on synthetic data: a site of the patients of one source, a pool of another's written
    as a training-features file, adapt with its learning curve at two sizes (two draws), the RESULTS block and
    the picture."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("site_curve_bench", REPO / "benchmarks" / "site_curve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    s = make_site(tmp_path, n=100, severe=40)
    fake_extraction(monkeypatch, s)
    s["labels"].write_text("patient_id,label,source\n" + "".join(
        f"{p},{y},{'pool' if i % 2 else 'site'}\n" for i, (p, y) in enumerate(s["y"].items())), encoding="utf-8")
    inst = installed_checkpoint(tmp_path / "installed.pt", s["u"])
    site = bench.split_site("tiny", s["visits"], s["labels"], "site", "pool", tmp_path / "work", None)
    assert site["pool"].startswith("50 pool patients") and len(list(Path(site["visits"]).iterdir())) == 50
    r = bench.run_site(site, tmp_path / "out", sizes=(10, 20), draws=2, cls_model=str(inst), repeats=1,
                       n_bootstrap=200)
    assert r["patients"] == 50 and r["severe"] == 20 and set(r["curve"]) == {"local", "pooled"}
    for rows in r["curve"].values():
        assert [x["train_patients"] for x in rows] == [10, 20, "all 50"] and rows[0]["draws"] == 2
    text = bench.block([r], "python benchmarks/site_curve.py --tiny", 1.0, (10, 20), 2)
    assert text.startswith(bench.START) and text.endswith(bench.END) and "| tiny | local |" in text
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Benchmarks\n\n{bench.START}\nOLD-BLOCK\n{bench.END}\n\nafter\n", encoding="utf-8")
    bench.replace_block(bench.START, bench.END, text, path=results)
    assert "OLD-BLOCK" not in results.read_text() and results.read_text().endswith("after\n")
    bench.plot([r], tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000


# --------------------------------------------------------------------------- real VIA patients

@pytest.mark.data
@pytest.mark.shipped_stage
@pytest.mark.skipif(not (DATA / "via-visits").is_dir(), reason="needs ../shared/data/via-visits")
def test_adapt_on_a_handful_of_real_via_patients(tmp_path):
    """Six patients of each class of the VIA bank through the real extraction (shipped models; features cached
    in the user cache, so seconds after the first run), 3-fold, forced (fewer than 10 per class)."""
    with open(DATA / "via-visits" / "labels.csv", newline="", encoding="utf-8") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["patient_id"])
    picked = [r for r in rows if r["label"] == "0"][:6] + [r for r in rows if r["label"] == "1"][:6]
    visits = tmp_path / "visits"
    visits.mkdir()
    for r in picked:  # linked, not copied: the feature cache is keyed by the image files' real paths
        (visits / r["patient_id"]).symlink_to((DATA / "via-visits" / r["patient_id"]).resolve(), target_is_directory=True)
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,label,source\n" + "".join(f"{r['patient_id']},{r['label']},{r['source']}\n"
                                                           for r in picked), encoding="utf-8")
    out = tmp_path / "run"
    try:
        m = api.adapt(visits=str(visits), labels=str(labels), out=str(out), folds=3, repeats=1, n_bootstrap=300,
                      curve_sizes=(6,), curve_draws=3, threads=1, force=True)
    except ValidationFailed as e:  # 12 patients may not beat chance; the run's files are there all the same
        m = e.metrics
    assert m["counts"]["severe"] == 6 and m["counts"]["mildly_normal"] == 6
    assert m["images"] == sum(len(list((visits / r["patient_id"]).iterdir())) for r in picked)
    assert m["stage_policy"]["images"] == m["images"] and m["gate"]["how"]["n"] > 0
    assert (out / "metrics.json").is_file() and (out / "comparison.json").is_file() and (out / "adapt.md").is_file()
    comp = json.loads((out / "comparison.json").read_text())
    assert comp["installed"]["how"].startswith("its folded linear head")  # the shipped 2.0.0 classifier
    if (out / "model.pt").is_file():
        assert load_config_file(out / "site.toml")["decision_stages"] == m["stage_policy"]["stages"]


def test_run_folder_of_someone_elses_files_is_refused_before_screening(tmp_path):
    from cervscan.training.adapt import _check_run_folder

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "adapt.md").write_text("the clinic's own notes", encoding="utf-8")
    with pytest.raises(CervscanError, match="not an earlier 'cervscan adapt' run"):
        _check_run_folder(mine)
    assert (mine / "adapt.md").read_text(encoding="utf-8") == "the clinic's own notes"
    store = tmp_path / "installed"
    store.mkdir()
    (store / "manifest.json").write_text("{}", encoding="utf-8")
    with pytest.raises(CervscanError, match="holds manifest.json"):
        _check_run_folder(store)
    a_file = tmp_path / "labels.csv"
    a_file.write_text("x", encoding="utf-8")
    with pytest.raises(CervscanError, match="not a folder"):
        _check_run_folder(a_file)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.json").write_text('{"command": "adapt"}', encoding="utf-8")
    _check_run_folder(earlier)  # an earlier adapt run may be replaced
    _check_run_folder(tmp_path / "new")


@pytest.mark.parametrize("folds,repeats", [(1, 3), (0, 3), (5, 0)])
def test_bad_fold_counts_are_one_line_errors(folds, repeats):
    from cervscan.training.adapt import _check
    from cervscan.training.configs import AdaptConfig

    with pytest.raises(CervscanError, match="--folds|--repeats"):
        _check(AdaptConfig(visits="v", labels="l", out="o", folds=folds, repeats=repeats))
