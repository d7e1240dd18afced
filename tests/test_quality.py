"""Image quality and eligibility gate: measures, rules, patient decision, options, report, batch, real images."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cervscan.pipeline import quality as Q
from cervscan.config import STAGES, GateConfig, ScreenConfig, load_config_file
from cervscan.errors import CervscanError

from conftest import REPO_ROOT, read_csv, read_json, synthetic_image, write_image

GATE = GateConfig()


def texture(h: int = 256, w: int = 256, seed: int = 0) -> np.ndarray:
    """A sharp, mid-grey, reddish texture (noise plus edges)."""
    import cv2

    rng = np.random.default_rng(seed)
    img = np.clip(np.array([170, 90, 95], np.float32) + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
    for _ in range(12):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, c, int(rng.integers(4, max(5, w // 8))), (220, 200, 200), 2)
    return img


def blurred(rgb: np.ndarray, frac: float = 0.03) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(rgb, (0, 0), frac * min(rgb.shape[:2]))


# --------------------------------------------------------------------------- measures (synthetic)

def test_sharpness_falls_with_blur_and_is_measured_at_a_fixed_scale():
    import cv2

    sharp = texture(512, 512)
    q = Q.measure(sharp)
    assert q["sharpness"] >= GATE.min_sharpness and not Q.problems(q, GATE)
    qb = Q.measure(blurred(sharp, 0.02))
    assert qb["sharpness"] < GATE.min_sharpness and "blurred" in Q.problems(qb, GATE)
    # the same scene at twice the resolution measures alike (both are scaled to 256 px); never scaled up
    big = cv2.resize(sharp, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    small = cv2.resize(sharp, (256, 256), interpolation=cv2.INTER_AREA)
    assert Q.measure(big)["sharpness"] == pytest.approx(Q.measure(small)["sharpness"], rel=0.35)


def _motion(rgb: np.ndarray, length: int, angle: float) -> np.ndarray:
    """Camera shake: a line kernel of ``length`` px along ``angle`` degrees (as benchmarks/quality_gate.py)."""
    import cv2

    return cv2.filter2D(rgb, -1, _bench()._motion_kernel(length, angle), borderType=cv2.BORDER_REFLECT)


def leaves(h: int = 512, w: int = 512, seed: int = 0, n: int = 600) -> np.ndarray:
    """A 'dead leaves' picture: overlapping sharp-edged discs of many sizes (edges at every scale and in every
    direction, like a photograph; pixel noise would not do: its re-blur ratio stays high under motion blur)."""
    import cv2

    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = (170, 90, 95)
    for _ in range(n):
        r = int(w * 0.3 * rng.uniform(0.02, 1) ** 2) + 2
        col = tuple(int(v) for v in np.clip(np.array([170, 90, 95]) + rng.normal(0, 40, 3), 0, 255))
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), r, col, -1)
    return img


def test_sharpness_catches_motion_blur_in_any_direction():
    """Motion blur along one direction is caught whatever the direction, and a diagonal blur measures like
    an axis-aligned one (the re-blur has the same length in every direction; with the former diagonal of an
    11 x 11 box, 45 and 135 degrees measured about 0.1 sharper than 0 and 90)."""
    sharp = leaves()
    assert Q.measure(sharp)["sharpness"] >= GATE.min_sharpness
    length = int(round(0.04 * 512)) | 1  # the benchmark's motion blur: 4 % of the shorter side
    values = {}
    for angle in (0, 22.5, 30, 45, 60, 90, 120, 135, 160):
        q = Q.measure(_motion(sharp, length, angle))
        values[angle] = q["sharpness"]
        assert "blurred" in Q.problems(q, GATE), (angle, q["sharpness"])
    assert values[45] == pytest.approx(values[0], abs=0.06) and values[135] == pytest.approx(values[90], abs=0.06)


def test_measures_look_inside_the_cervix_only():
    import cv2

    img = texture(300, 400)
    img[100:200, 150:250] = blurred(texture(100, 100, seed=3), 0.05)  # a blurred 'cervix' in a sharp frame
    mask = np.zeros(img.shape[:2], np.uint8)
    cv2.circle(mask, (200, 150), 45, 1, -1)
    assert "blurred" not in Q.problems(Q.measure(img), GATE)
    q = Q.measure(img, mask)
    assert "blurred" in Q.problems(q, GATE)
    assert q["cervix_px"] == pytest.approx(np.sqrt(mask.sum()))
    # without a mask the crop box is the region
    qb = Q.measure(img, None, (155, 105, 245, 195))
    assert "blurred" in Q.problems(qb, GATE) and qb["cervix_px"] is None
    # glare the cervix finder carved out of its mask still counts (the convex hull of the mask)
    img2 = texture(300, 400)
    img2[140:160, 190:210] = 255
    holed = mask.copy()
    holed[140:160, 190:210] = 0
    assert Q.measure(img2, holed)["glare"] == pytest.approx(400 / mask.sum(), rel=0.15)


def test_exposure_and_glare_measures():
    base = texture()
    assert not Q.problems(Q.measure(base), GATE)
    dark = (base // 6).astype(np.uint8)
    assert Q.measure(dark)["brightness"] < GATE.min_brightness and "dark" in Q.problems(Q.measure(dark), GATE)
    over = np.clip(base.astype(np.int32) * 3, 0, 255).astype(np.uint8)
    q = Q.measure(over)
    assert q["overexposed"] > 0.9 and "overexposed" in Q.problems(q, GATE)
    glare = base.copy()
    glare[:64, :128] = 255  # white specular patch: 1/8 of the frame
    q = Q.measure(glare)
    assert q["glare"] == pytest.approx(0.125, abs=0.01) and "glare" in Q.problems(q, GATE)
    red = base.copy()
    red[:64, :128] = (255, 120, 120)  # bright but coloured: not a specular highlight
    assert Q.measure(red)["glare"] < 0.01


# --------------------------------------------------------------------------- rules

def test_gate_rules_and_their_order():
    good = {"sharpness": 1e4, "brightness": 150.0, "overexposed": 0.0, "glare": 0.0, "cervix_px": 300.0}
    assert Q.gate(good, GATE, stage="saline", stage_confidence=0.99, cervix_found=True) == []  # all stages decide
    acetic = GateConfig(decision_stages=("acetic",))
    assert Q.gate(good, acetic, stage="saline", stage_confidence=0.99, cervix_found=True) == ["stage:saline"]
    # the stage model is not sure enough: the image stays eligible; no stage model: no stage rule
    assert Q.gate(good, acetic, stage="saline", stage_confidence=acetic.stage_min_confidence - 0.01) == []
    assert Q.gate(good, acetic, stage="", stage_confidence=None) == []
    bad = {**good, "sharpness": 0.0, "brightness": 5.0, "cervix_px": 10.0}
    assert Q.gate(bad, acetic, stage="lugol", stage_confidence=1.0, cervix_found=True) == \
        ["stage:lugol", "dark", "cervix_too_small", "blurred"]
    assert Q.gate(good, GATE, cervix_found=False) == ["no_cervix"]
    assert Q.gate({**good, "cervix_px": None}, GATE, cervix_found=None) == []  # no finder ran: no cervix rules
    assert Q.gate(bad, GateConfig(enabled=False), cervix_found=False) == []


def test_patient_reasons_a_nurse_can_act_on():
    assert Q.patient_reason(["blurred", "blurred;glare", "blurred"], STAGES) == \
        "retake: all 3 images blurred (hold the camera still and focus on the cervix)"
    assert Q.patient_reason(["stage:saline", "stage:green"], ("acetic",)).startswith(
        "no image after acetic acid: repeat after applying acetic acid")
    mixed = Q.patient_reason(["blurred", "glare", "blurred", "stage:saline"], ("acetic",))
    assert mixed.startswith("retake: no usable image of 4 (2 blurred, 1 not after acetic acid, 1 strong glare)")
    assert "hold the camera still" in mixed and "apply acetic acid" in mixed
    assert Q.excluded_note(["blurred", "", "stage:saline"]) in ("not used: 1 blurred, 1 stage saline",
                                                                 "not used: 1 stage saline, 1 blurred")


def test_gate_config_keys_in_a_config_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('quality_gate = false\nmin_sharpness = 0.55\ndecision_stages = ["acetic", "lugol"]\n'
                 'stage_min_confidence = 0.9\n')
    assert load_config_file(f) == {"quality_gate": False, "min_sharpness": 0.55,
                                   "decision_stages": ["acetic", "lugol"], "stage_min_confidence": 0.9}
    f2 = tmp_path / "c.json"
    f2.write_text(json.dumps({"decision_stages": "acetic"}))
    assert load_config_file(f2)["decision_stages"] == ("acetic",)
    for bad, msg in (({"decision_stages": ["acid"]}, "decision_stages"), ({"quality_gate": "no"}, "true or false"),
                     ({"max_glare": "x"}, "number")):
        f2.write_text(json.dumps(bad))
        with pytest.raises(CervscanError, match=msg):
            load_config_file(f2)
    with pytest.raises(CervscanError, match="decision_stages"):
        GateConfig(decision_stages=())
    assert ScreenConfig().gate.decision_stages == STAGES  # default: every stage decides (the shipped model's)


def test_stage_names_match_the_stage_model():
    from cervscan.training.stage import STAGES as TRAINED

    assert STAGES == TRAINED


# --------------------------------------------------------------------------- screening with the tiny models

def _screen(paths, out, tiny_models, **kw):
    from cervscan import api

    return api.screen(paths, out, seg_model=str(tiny_models["seg"]), cls_model=str(tiny_models["cls"]),
                      device="cpu", num_workers=0, threads=1, **kw)


def _visit(folder: Path, n: int, seed: int, blur: bool = False) -> list[Path]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = synthetic_image(rng, 96, 128)
        out.append(write_image(folder / f"img{i + 1}.png", blurred(im, 0.04) if blur else im))
    return out


@pytest.fixture(scope="module")
def gated(tiny_models, tmp_path_factory) -> dict:
    """GOOD (2 sharp images), BLUR (2 blurred), MIXED (1 sharp, 1 blurred): screened, then reports."""
    from cervscan.report.reports import write_reports

    root = tmp_path_factory.mktemp("gated")
    visits = root / "visits"
    _visit(visits / "GOOD", 2, 1)
    _visit(visits / "BLUR", 2, 2, blur=True)
    _visit(visits / "MIXED", 1, 3)
    b = _visit(visits / "MIXED2", 1, 4, blur=True)[0]
    b.rename(visits / "MIXED" / "img2.png")
    (visits / "MIXED2").rmdir()
    out = root / "out"
    res = _screen([visits], out, tiny_models)
    return {"out": out, "res": res, "paths": write_reports(out), "visits": visits}


def test_blurred_visit_is_inadequate_with_a_retake_reason(gated):
    res, out = gated["res"], gated["out"]
    pats = {p["patient_id"]: p for p in read_csv(out / "patients.csv")}
    assert pats["GOOD"]["decision"] in ("severe", "mildly_normal") and pats["GOOD"]["n_eligible"] == "2"
    blur = pats["BLUR"]
    assert blur["decision"] == "inadequate" and blur["score"] == "" and blur["n_eligible"] == "0"
    assert blur["reason"].startswith("retake: all 2 images blurred")
    assert blur["error"] == "" and blur["n_used"] == "2"  # screened fine, just not fit to decide from
    assert res.exit_code == 5 and res.run["exit_code"] == 5 and res.run["counts"]["inadequate"] == 1
    imgs = [r for r in read_csv(out / "images.csv") if r["patient_id"] == "BLUR"]
    for r in imgs:  # kept, with the measures, not classified
        assert (r["eligible"], r["reason"], r["score"], r["decision"]) == ("False", "blurred", "", "ineligible")
        assert float(r["sharpness"]) < GATE.min_sharpness and r["quality_flags"] == "blurred"
        assert r["mask"] and (out / r["overlay"]).is_file()


def test_ineligible_image_does_not_count_towards_the_score(gated):
    res = gated["res"]
    mixed = next(p for p in res.patients if p["patient_id"] == "MIXED")
    rows = {r["image"]: r for r in res.images if r["patient_id"] == "MIXED"}
    assert rows["img1.png"]["eligible"] is True and rows["img2.png"]["eligible"] is False
    assert mixed["score"] == pytest.approx(rows["img1.png"]["score"])
    assert (mixed["n_used"], mixed["n_eligible"], mixed["reason"]) == (2, 1, "not used: 1 blurred")
    assert all(r["eligible"] for r in res.images if r["patient_id"] == "GOOD")


def test_report_greys_ineligible_images_and_puts_the_retake_instruction_first(gated):
    from pypdf import PdfReader

    out = gated["out"]
    txt = " ".join("\n".join(p.extract_text() or "" for p in PdfReader(out / "reports" / "BLUR.pdf").pages).split())
    assert "INADEQUATE" in txt
    k = txt.find("retake: all 2 images blurred")
    assert k != -1 and k < txt.find("Patient ID") and k < txt.find("img1.png")  # before anything else
    assert txt.count("retake: all 2 images blurred") >= 2  # at the top and in the decision box
    assert "not used for the decision: blurred" in txt
    # the embedded originals and overlays of the ineligible images are grey (R = G = B)
    pics = [im.image for pg in PdfReader(out / "reports" / "BLUR.pdf").pages for im in pg.images]
    assert len(pics) == 4  # original + overlay of 2 images, no heatmap
    for pic in pics:
        a = np.asarray(pic.convert("RGB")).astype(int)
        assert np.abs(a[..., 0] - a[..., 2]).max() <= 12
    good = [im.image for pg in PdfReader(out / "reports" / "GOOD.pdf").pages for im in pg.images]
    assert any(np.abs(np.asarray(p.convert("RGB")).astype(int)[..., 0]
                      - np.asarray(p.convert("RGB")).astype(int)[..., 2]).max() > 40 for p in good)
    summary = " ".join("\n".join(p.extract_text() or "" for p in PdfReader(out / "reports" / "summary.pdf").pages).split())
    assert "inadequate" in summary and "retake: all 2 images blurred" in summary


def test_no_quality_gate_scores_everything(tiny_models, gated, tmp_path):
    from cervscan.cli import app

    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["screen", str(gated["visits"]), "-o", str(out), "--seg-model",
                                 str(tiny_models["seg"]), "--cls-model", str(tiny_models["cls"]), "--device", "cpu",
                                 "--no-quality-gate", "--json"])
    assert r.exit_code == 0, r.output
    run = read_json(out / "run.json")
    assert run["quality_gate"] is False and run["config"]["gate"]["enabled"] is False
    assert run["provenance"]["quality_gate"] == "option"
    pats = {p["patient_id"]: p for p in read_csv(out / "patients.csv")}
    assert pats["BLUR"]["decision"] in ("severe", "mildly_normal") and pats["BLUR"]["n_eligible"] == "2"
    imgs = read_csv(out / "images.csv")
    assert all(x["eligible"] == "True" and x["reason"] == "" and x["score"] for x in imgs)
    assert {x["quality_flags"] for x in imgs if x["patient_id"] == "BLUR"} == {"blurred"}  # still measured


def test_saline_only_visit_is_inadequate_under_an_acetic_policy(tiny_models, tmp_path, monkeypatch):
    from cervscan.pipeline.steps import Pipeline

    conf = {"value": 0.95}
    monkeypatch.setattr(Pipeline, "stage", lambda self, rgbs: [("saline", conf["value"])] * len(rgbs))
    _visit(tmp_path / "v" / "S1", 2, 5)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"decision_stages": ["acetic"]}))
    res = _screen([tmp_path / "v"], tmp_path / "o", tiny_models, stage_model=str(tiny_models["stage"]),
                  config_file=str(cfg))
    p = res.patients[0]
    assert p["decision"] == "inadequate" and res.exit_code == 5
    assert p["reason"].startswith("no image after acetic acid: repeat after applying acetic acid")
    assert {r["reason"] for r in res.images} == {"stage:saline"}
    # the stage model unsure: not rejected on stage
    conf["value"] = 0.5
    res = _screen([tmp_path / "v"], tmp_path / "o2", tiny_models, stage_model=str(tiny_models["stage"]),
                  config_file=str(cfg))
    assert res.patients[0]["decision"] in ("severe", "mildly_normal") and res.exit_code == 0
    # default policy (every stage decides): saline images decide
    conf["value"] = 0.95
    res = _screen([tmp_path / "v"], tmp_path / "o3", tiny_models, stage_model=str(tiny_models["stage"]))
    assert res.patients[0]["decision"] in ("severe", "mildly_normal")


def test_failed_images_win_over_inadequate_in_the_exit_code(tiny_models, tmp_path):
    _visit(tmp_path / "v" / "B", 1, 6, blur=True)
    (tmp_path / "v" / "E").mkdir(parents=True)
    (tmp_path / "v" / "E" / "broken.jpg").write_bytes(b"")
    res = _screen([tmp_path / "v"], tmp_path / "o", tiny_models)
    assert {p["patient_id"]: p["decision"] for p in res.patients} == {"B": "inadequate", "E": "error"}
    assert res.exit_code == 3


def test_batch_exits_5_for_an_inadequate_visit_and_counts_it(tiny_models, tmp_path):
    from cervscan import api

    kw = dict(seg_model=str(tiny_models["seg"]), cls_model=str(tiny_models["cls"]), device="cpu", num_workers=0,
              use_stage=False)
    root = tmp_path / "root"
    _visit(root / "A", 1, 7)
    _visit(root / "B", 2, 8, blur=True)
    res = api.batch(root, tmp_path / "out", **kw)
    assert (res.summary["inadequate"], res.summary["failed"], res.exit_code) == (1, 0, 5)
    assert read_json(tmp_path / "out" / "run.json")["exit_code"] == 5
    pats = {p["patient_id"]: p for p in read_csv(tmp_path / "out" / "patients.csv")}
    assert pats["B"]["decision"] == "inadequate" and pats["B"]["reason"].startswith("retake:")
    # next night nothing new: 0; a new failed visit: 3 wins
    assert api.batch(root, tmp_path / "out", **kw).exit_code == 0
    _visit(root / "C", 1, 9, blur=True)
    (root / "D").mkdir()
    (root / "D" / "broken.jpg").write_bytes(b"")
    res = api.batch(root, tmp_path / "out", **kw)
    assert (res.summary["inadequate"], res.summary["failed"], res.exit_code) == (1, 1, 3)


# --------------------------------------------------------------------------- real images, real cervix finder

def _bench():
    spec = importlib.util.spec_from_file_location("quality_gate_bench", REPO_ROOT / "benchmarks" / "quality_gate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cervix_finder() -> Path:
    from cervscan.models import registry as W

    try:
        return W.resolve("cervix").path  # the shipped one, once installed in weights/
    except CervscanError:
        pass
    p = REPO_ROOT / "runs" / "cervix-192" / "model.pt"
    if not p.is_file():
        pytest.skip("no trained cervix finder (weights/ or runs/cervix-192/model.pt)")
    return p


#: A few acetic-acid images of both sources.
REAL = [("iarc-AAAW", "AAAW3.jpg"), ("annocerv-C1", "C1Aceto_1.jpg"), ("annocerv-C5", "C5Aceto_1.jpg")]


@pytest.fixture(scope="module")
def real_originals():
    """The benchmark module, its pipeline (cervix finder, quality, gate) and the REAL images, decoded and
    located once (each on its own, as the benchmark does) for the tests below."""
    visits = (REPO_ROOT.parent / "shared" / "data" / "visits").resolve()
    items = [it for it in REAL if (visits / it[0] / it[1]).is_file()]
    if len(items) < 2:
        pytest.skip(f"the chosen real images are not under {visits}")
    bench = _bench()
    pipe = bench._pipeline(_cervix_finder())
    out = []
    for pid, name in items:
        rgb = pipe.decode(visits / pid / name).rgb
        out.append((pid, name, rgb, bench._located(pipe, [rgb])[0]))
    return bench, pipe, out


def test_gate_on_degraded_copies_of_real_images(real_originals):
    """The benchmark's degradations, regenerated from real images, through the pipeline's cervix, quality and
    gate steps with the default thresholds: every original accepted, every blurred / badly exposed copy and
    nearly every glare / out-of-frame copy rejected."""
    bench, pipe, originals = real_originals
    missed = []
    for k, (pid, name, rgb, p0) in enumerate(originals):
        assert p0.cervix_found, (pid, name)
        assert pipe.gate(pipe.quality(rgb, p0), p0) == [], (pid, name)
        rng = np.random.default_rng([bench.SEED, k])
        copies = [bench.degrade(rgb, kind, p0.cervix_mask, rng) for kind in bench.KINDS]
        for kind, im, p in zip(bench.KINDS, copies, bench._located(pipe, copies)):
            why = pipe.gate(pipe.quality(im, p), p)
            if not why:
                missed.append((pid, name, kind))
            if kind in ("gaussian_blur", "underexposed", "overexposed"):
                assert why, (pid, name, kind)
    assert len(missed) <= 1, missed


def test_gate_rejects_motion_blurred_real_images_as_blurred(real_originals):
    """Motion-blurred copies of real acetic-acid images (the benchmark's length, 4 % of the shorter side), in
    sixteen directions (every 11.25 degrees: on and half-way between the measure's directions), through the
    pipeline's cervix, quality and gate steps: every original is eligible, every copy is rejected as blurred."""
    bench, pipe, originals = real_originals
    angles = tuple(float(a) for a in np.arange(0.0, 180.0, 11.25))
    for pid, name, rgb, p0 in originals:
        assert pipe.gate(pipe.quality(rgb, p0), p0) == [], (pid, name)
        length = max(3, int(round(bench.PARAMS["motion_blur"]["length_of_shorter_side"] * min(rgb.shape[:2]))) | 1)
        copies = [_motion(rgb, length, a) for a in angles]
        for a, im, p in zip(angles, copies, bench._located(pipe, copies)):
            q = pipe.quality(im, p)
            assert "blurred" in pipe.gate(q, p), (pid, name, a, q["sharpness"])


def test_threshold_rule_keeps_the_expected_share_of_new_images():
    """Each threshold is the k-th most extreme of n values, k = floor(share * (n + 1)): it rejects k - 1 of
    them and a new exchangeable value with probability k / (n + 1) <= share."""
    bench = _bench()
    vals = [float(v) for v in range(1, 448)]  # n = 447, share 1 %: k = 4
    assert bench.choose(vals, "min", 0.01) == 4.0  # rejects 1, 2, 3 (v < 4)
    assert bench.choose(vals, "max", 0.01) == 450.0  # the 4th largest, 444, rounded up to 2 digits
    assert bench.choose(vals[:99], "min", 0.01) == 1.0  # k = 1 at n = 99: rejects none of them
    assert bench.choose(vals[:50], "min", 0.01) == 1.0  # k at least 1
    assert bench._round(0.4712, "min") == 0.47 and bench._round(0.0161, "max") == 0.017


def test_an_untrained_cervix_finder_only_crops(tiny_models, tmp_path):
    """The random tiny cervix finder (no training recorded) finds nothing meaningful: its verdict (no cervix,
    a tiny cervix) must not make images ineligible; the other rules still apply."""
    _visit(tmp_path / "v" / "C1", 2, 10)
    _visit(tmp_path / "v" / "C2", 1, 11, blur=True)
    res = _screen([tmp_path / "v"], tmp_path / "o", tiny_models, cervix_model=str(tiny_models["cervix"]),
                  overrides={"crop": "cervix"})
    rows = {(r["patient_id"], r["image"]): r for r in res.images}
    assert all(rows[("C1", n)]["eligible"] for n in ("img1.png", "img2.png"))
    assert rows[("C2", "img1.png")]["reason"] in ("blurred", "dark;blurred")
    assert {p["patient_id"]: p["decision"] for p in res.patients}["C2"] == "inadequate"


def test_evaluate_leaves_inadequate_patients_out_and_lists_them(tiny_models, gated, tmp_path):
    from cervscan import api

    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,label\nGOOD,1\nBLUR,1\nMIXED,0\n")
    kw = dict(seg_model=str(tiny_models["seg"]), cls_model=str(tiny_models["cls"]), device="cpu", n_bootstrap=20)
    m = api.evaluate([gated["visits"]], labels, tmp_path / "e", **kw)
    assert m["patients"] == 2 and m["patients_inadequate"] == 1 and m["quality_gate"] is True
    assert m["inadequate"][0]["patient_id"] == "BLUR" and m["inadequate"][0]["reason"].startswith("retake:")
    m = api.evaluate([gated["visits"]], labels, tmp_path / "e2", overrides={"quality_gate": False}, **kw)
    assert m["patients"] == 3 and m["patients_inadequate"] == 0 and m["quality_gate"] is False
