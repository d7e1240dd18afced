"""End-to-end ``api.screen`` with tiny models: outputs, voting arithmetic, options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cervscan
from cervscan import api
from cervscan.config import STUDY_WEIGHTS, VARIANT_NAMES
from cervscan.errors import CervscanError
from cervscan.pipeline.steps import IMAGE_COLUMNS
from cervscan.models.registry import sha256_file

from conftest import assert_no_tmp_files, read_csv, read_json, synthetic_image, write_image

P_COLS = [f"p_v{i}" for i in range(1, 7)]


def run_screen(models: dict, paths, out: Path, **kw) -> api.ScreenResult:
    kw.setdefault("num_workers", 0)
    kw.setdefault("device", "cpu")
    return api.screen([str(p) for p in paths], out, seg_model=str(models["seg"]), cls_model=str(models["cls"]), **kw)


def decode_png(path: Path) -> np.ndarray:
    import cv2

    return cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)


def f(x: str) -> float:
    return float(x)


# --------------------------------------------------------------------------- the full output contract

@pytest.fixture(scope="module")
def synthetic_run(tiny_models, tmp_path_factory):
    """Three synthetic visits screened with the default DataLoader worker."""
    root = tmp_path_factory.mktemp("e2e")
    visits = root / "visits"
    for pid, n, seed, ext in (("P001", 2, 1, ".jpg"), ("P002", 3, 2, ".png"), ("P003", 1, 3, ".jpg")):
        rng = np.random.default_rng(seed)
        for i in range(n):
            write_image(visits / pid / f"img{i + 1}{ext}", synthetic_image(rng))
    calls = []
    res = api.screen([visits], root / "out", seg_model=str(tiny_models["seg"]), cls_model=str(tiny_models["cls"]),
                     device="cpu", progress=lambda *a: calls.append(a))  # default num_workers (1 process)
    return res, root / "out", visits, calls


def test_csv_columns_and_rows(synthetic_run):
    res, out, visits, _ = synthetic_run
    assert res.exit_code == 0
    with open(out / "patients.csv", encoding="utf-8") as fh:
        assert fh.readline().strip().split(",") == api.PATIENT_COLUMNS
    with open(out / "images.csv", encoding="utf-8") as fh:
        assert fh.readline().strip().split(",") == IMAGE_COLUMNS
    pats = read_csv(out / "patients.csv")
    imgs = read_csv(out / "images.csv")
    assert [p["patient_id"] for p in pats] == ["P001", "P002", "P003"]
    assert [(p["n_images"], p["n_used"], p["n_failed"]) for p in pats] == [("2", "2", "0"), ("3", "3", "0"),
                                                                          ("1", "1", "0")]
    assert [(r["patient_id"], r["image"]) for r in imgs] == [
        ("P001", "img1.jpg"), ("P001", "img2.jpg"), ("P002", "img1.png"), ("P002", "img2.png"),
        ("P002", "img3.png"), ("P003", "img1.jpg")]
    assert read_csv(out / "skipped.csv") == []
    for r in imgs:
        assert r["status"] == "ok" and r["error"] == ""
        assert r["seg_model"].startswith("tiny-seg@test:") and r["cls_model"].startswith("tiny-cls@test:")
        for c in P_COLS + ["score", "lesion_fraction", "sharpness", "brightness"]:
            assert np.isfinite(f(r[c])), c
        assert 0 <= f(r["score"]) <= 1
        assert r["decision"] == ("severe" if f(r["score"]) > f(r["threshold"]) else "mildly_normal")
    for p in pats:
        mine = [f(r["score"]) for r in imgs if r["patient_id"] == p["patient_id"]]
        assert f(p["score"]) == pytest.approx(np.mean(mine), abs=2e-6)
        assert p["decision"] == ("severe" if f(p["score"]) > f(p["threshold"]) else "mildly_normal")
        assert p["cervscan_version"] == cervscan.__version__
    # the returned object agrees with the files
    assert [p["patient_id"] for p in res.patients] == ["P001", "P002", "P003"]
    assert res.patients[1]["score"] == pytest.approx(f(pats[1]["score"]), abs=1e-6)


def test_masks_and_overlays(synthetic_run):
    res, out, visits, _ = synthetic_run
    for r in read_csv(out / "images.csv"):
        src = visits / r["patient_id"] / r["image"]
        with Image.open(src) as im:
            w, h = im.size
        assert (int(r["width"]), int(r["height"])) == (w, h)
        mp = out / r["mask"]
        assert mp == out / "masks" / r["patient_id"] / (Path(r["image"]).stem + ".png")
        assert mp.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        m = decode_png(mp)
        assert m.shape == (h, w) and m.dtype == np.uint8
        assert set(np.unique(m)) <= {0, 255}
        assert (m > 0).mean() == pytest.approx(f(r["lesion_fraction"]), abs=1e-6)
        ov = out / r["overlay"]
        assert ov.suffix == ".jpg"
        with Image.open(ov) as im:
            assert im.format == "JPEG" and im.size == (w, h)
    assert_no_tmp_files(out)


def test_run_json(synthetic_run, tiny_models):
    res, out, visits, _ = synthetic_run
    run = read_json(out / "run.json")
    for k in ("config", "versions", "device", "models", "timings", "counts", "threshold", "provenance",
              "cervscan_version", "inputs", "exit_code", "disclaimer"):
        assert k in run, k
    assert run["device"] == "cpu" and run["exit_code"] == 0
    assert run["config"]["voting"]["weights"] == list(STUDY_WEIGHTS)
    assert run["config"]["voting"]["variants"] == list(VARIANT_NAMES)
    assert run["config"]["threshold"] == run["threshold"] == 0.5
    assert run["provenance"]["threshold"] == "checkpoint" and run["provenance"]["weights"] == "checkpoint"
    assert set(run["versions"]) >= {"cervscan", "torch", "timm", "segmentation_models_pytorch", "python"}
    for role, key in (("segmenter", "seg"), ("classifier", "cls")):
        m = run["models"][role]
        assert m["sha256"] == sha256_file(tiny_models[key])
        assert m["verified"] is True  # the manifest beside the file lists it
        assert m["source"] == "option" and m["path"] == str(tiny_models[key])
        assert m["form"] == ("train" if role == "segmenter" else "deploy")
    assert run["models"]["classifier"]["threshold"] == 0.5
    t = run["timings"]
    assert set(t) == {"load_models_s", "screen_s", "total_s", "images_per_s"}
    assert all(v >= 0 for v in t.values()) and t["total_s"] >= t["screen_s"]
    assert run["counts"] == {"patients": 3, "images": 6, "images_failed": 0, "patients_error": 0,
                             "severe": sum(p["decision"] == "severe" for p in res.patients),
                             "mildly_normal": sum(p["decision"] == "mildly_normal" for p in res.patients),
                             "inadequate": 0, "images_ineligible": 0, "no_cervix": 0, "skipped_files": 0}
    assert run["counts"]["severe"] + run["counts"]["mildly_normal"] == 3
    assert json.loads(json.dumps(res.run)) == run
    json.dumps(res.summary())


def test_progress_callback(synthetic_run):
    *_, calls = synthetic_run
    assert calls[0] == ("images", 0, 6)
    assert calls[-1] == ("images", 6, 6)
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)


def test_worker_processes_do_not_change_results(synthetic_run, tiny_models, tmp_path):
    res, out, visits, _ = synthetic_run
    res0 = run_screen(tiny_models, [visits], tmp_path / "o", num_workers=0, batch_images=1)
    a = [(r["patient_id"], r["image"], r["score"]) for r in res.images]
    b = [(r["patient_id"], r["image"], r["score"]) for r in res0.images]
    assert [x[:2] for x in a] == [x[:2] for x in b]
    np.testing.assert_allclose([x[2] for x in a], [x[2] for x in b], atol=1e-5)


# --------------------------------------------------------------------------- voting arithmetic through the pipeline

@pytest.fixture(scope="module")
def varied_visits(tmp_path_factory):
    root = tmp_path_factory.mktemp("varied")
    rng = np.random.default_rng(5)
    for pid, n in (("A", 3), ("B", 2)):
        for i in range(n):
            write_image(root / pid / f"{pid}{i}.png", synthetic_image(rng, 96, 112))
    return root


def test_weighted_vote_of_six_variants(varied_models, varied_visits, tmp_path):
    res = run_screen(varied_models, [varied_visits], tmp_path / "o")
    imgs = read_csv(tmp_path / "o" / "images.csv")
    probs = np.array([[f(r[c]) for c in P_COLS] for r in imgs])
    # the check is not vacuous: this classifier gives different P(severe) per variant and per image
    assert np.ptp(probs) > 0.05
    w = np.array(STUDY_WEIGHTS)
    for r, p in zip(imgs, probs):
        assert f(r["score"]) == pytest.approx(float(w @ p), abs=2e-6)  # CSV rounding is 1e-6
    for p in res.patients:
        mine = [r["score"] for r in res.images if r["patient_id"] == p["patient_id"]]
        assert p["score"] == pytest.approx(float(np.mean(mine)), abs=1e-12)


def test_variants_original_only(varied_models, varied_visits, tmp_path):
    res = run_screen(varied_models, [varied_visits], tmp_path / "o", overrides={"variants": ("original",)})
    for r in read_csv(tmp_path / "o" / "images.csv"):
        assert r["p_v1"] != "" and all(r[c] == "" for c in P_COLS[1:])
        assert f(r["score"]) == pytest.approx(f(r["p_v1"]), abs=1e-6)
    assert list(res.run["config"]["voting"]["variants"]) == ["original"]
    assert res.run["provenance"]["variants"] == "option"


def test_custom_weights_and_brightness_options(varied_models, varied_visits, tmp_path):
    res = run_screen(varied_models, [varied_visits], tmp_path / "o",
                     overrides={"weights": (0, 0, 0, 0, 1, 1), "brightness": 0.8})
    for r in res.images:
        assert r["score"] == pytest.approx(0.5 * r["p_v5"] + 0.5 * r["p_v6"], abs=1e-9)
    ref = run_screen(varied_models, [varied_visits], tmp_path / "ref")
    # a different brightness changes P(severe) of variants 5/6 only
    for a, b in zip(res.images, ref.images):
        assert a["p_v1"] == pytest.approx(b["p_v1"], abs=1e-6)
    assert any(abs(a["p_v5"] - b["p_v5"]) > 1e-4 for a, b in zip(res.images, ref.images))


def test_empty_masks_fall_back_and_are_flagged(varied_models, varied_visits, tmp_path, monkeypatch):
    from cervscan.pipeline.steps import Pipeline

    # every lesion mask empty (a mask_threshold of 1 that would force it is refused as a setting)
    monkeypatch.setattr(Pipeline, "lesion", lambda self, crops: [np.zeros(c.shape[:2], np.uint8) for c in crops])
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"mask_threshold": 0.9}))
    res = run_screen(varied_models, [varied_visits], tmp_path / "o", config_file=str(cfg))
    assert res.exit_code == 0
    for r in read_csv(tmp_path / "o" / "images.csv"):
        assert r["empty_mask"] == "True" and f(r["lesion_fraction"]) == 0.0
        # variants 2, 4, 6 repeat the original's view
        assert f(r["p_v2"]) == pytest.approx(f(r["p_v1"]), abs=2e-6)
        assert f(r["p_v4"]) == pytest.approx(f(r["p_v3"]), abs=2e-6)
        assert f(r["p_v6"]) == pytest.approx(f(r["p_v5"]), abs=2e-6)
        assert decode_png(tmp_path / "o" / r["mask"]).max() == 0
    pats = read_csv(tmp_path / "o" / "patients.csv")
    assert all(p["n_empty_mask"] == p["n_images"] for p in pats)
    assert res.run["provenance"]["mask_threshold"] == "config"


def test_threshold_option_decides_strictly(tiny_models, synthetic_batch, tmp_path):
    base = run_screen(tiny_models, [synthetic_batch], tmp_path / "a")
    s = base.patients[0]["score"]
    res = run_screen(tiny_models, [synthetic_batch], tmp_path / "b", overrides={"threshold": s})
    p = res.patients[0]
    assert p["score"] == s and p["threshold"] == s and p["decision"] == "mildly_normal"  # not strictly greater
    res = run_screen(tiny_models, [synthetic_batch], tmp_path / "c", overrides={"threshold": np.nextafter(s, 0)})
    assert res.patients[0]["decision"] == "severe"
    assert res.run["provenance"]["threshold"] == "option"
    assert {r["threshold"] for r in read_csv(tmp_path / "c" / "patients.csv")} == {f"{np.nextafter(s, 0):.6f}"}


# --------------------------------------------------------------------------- sizes, names, options

def test_masks_are_at_working_size_when_images_are_scaled_down(tiny_models, tmp_path):
    write_image(tmp_path / "v" / "P1" / "big.png", synthetic_image(np.random.default_rng(0), 96, 128))
    cfg = tmp_path / "c.toml"
    cfg.write_text("max_side = 64\n")
    run_screen(tiny_models, [tmp_path / "v"], tmp_path / "o", config_file=str(cfg))
    r = read_csv(tmp_path / "o" / "images.csv")[0]
    assert (r["width"], r["height"]) == ("128", "96")  # the original size
    assert decode_png(tmp_path / "o" / r["mask"]).shape == (48, 64)  # the working size
    with Image.open(tmp_path / "o" / r["overlay"]) as im:
        assert im.size == (64, 48)


def test_same_stem_different_extension(tiny_models, tmp_path):
    rng = np.random.default_rng(0)
    write_image(tmp_path / "P1" / "a.jpg", synthetic_image(rng))
    write_image(tmp_path / "P1" / "a.png", synthetic_image(rng))
    write_image(tmp_path / "P1" / "b.png", synthetic_image(rng))
    run_screen(tiny_models, [tmp_path / "P1"], tmp_path / "o")
    masks = {r["image"]: r["mask"] for r in read_csv(tmp_path / "o" / "images.csv")}
    assert masks == {"a.jpg": "masks/P1/a_jpg.png", "a.png": "masks/P1/a_png.png", "b.png": "masks/P1/b.png"}
    assert all((tmp_path / "o" / m).is_file() for m in masks.values())


def test_no_masks_option(tiny_models, synthetic_batch, tmp_path):
    res = run_screen(tiny_models, [synthetic_batch], tmp_path / "o", write_masks=False, write_overlays=False)
    assert res.exit_code == 0
    assert not (tmp_path / "o" / "masks").exists() and not (tmp_path / "o" / "overlays").exists()
    assert all(r["mask"] == "" and r["overlay"] == "" for r in read_csv(tmp_path / "o" / "images.csv"))
    assert res.run["config"]["write_masks"] is False


def test_several_paths_and_single_visit_paths(tiny_models, synthetic_batch, tmp_path):
    res = run_screen(tiny_models, [synthetic_batch / "P003", synthetic_batch / "P001"], tmp_path / "o")
    assert [p["patient_id"] for p in res.patients] == ["P003", "P001"]
    assert [Path(p).resolve() for p in res.run["inputs"]] == [(synthetic_batch / "P003").resolve(),
                                                               (synthetic_batch / "P001").resolve()]


def test_unwritable_output_is_a_clear_error(tiny_models, synthetic_batch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CervscanError, match="output folder is not writable"):
        run_screen(tiny_models, [synthetic_batch], blocker / "out")


def test_bad_config_and_bad_device_fail_before_writing(tiny_models, synthetic_batch, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"weigths": [1,1,1,1,1,1]}')
    with pytest.raises(CervscanError, match="unknown config key"):
        run_screen(tiny_models, [synthetic_batch], tmp_path / "o1", config_file=str(cfg))
    assert not (tmp_path / "o1").exists()
    with pytest.raises(CervscanError, match="unknown device"):
        run_screen(tiny_models, [synthetic_batch], tmp_path / "o2", device="tpu")
    assert not (tmp_path / "o2" / "patients.csv").exists()


def test_screen_uses_installed_models_when_none_given(tiny_models, synthetic_batch, tmp_path):
    from cervscan.models import registry as W

    W.install([tiny_models["seg"], tiny_models["cls"]], name="t", force=True)  # the tiny classifier records no validation
    res = api.screen([synthetic_batch], tmp_path / "o", device="cpu", num_workers=0)
    assert res.run["models"]["segmenter"]["source"] == "installed"
    assert res.run["models"]["classifier"]["verified"] is True
    assert res.run["models"]["classifier"]["sha256"] == sha256_file(tiny_models["cls"])


# --------------------------------------------------------------------------- real images

@pytest.mark.data
def test_real_and_synthetic_images_end_to_end(tiny_models, shared_data, tmp_path):
    visits = tmp_path / "visits"
    src = shared_data / "visits"
    iarc = sorted(d for d in src.iterdir() if d.is_dir() and d.name.startswith("iarc-"))[0]
    for d in (src / "annocerv-C1", iarc):
        if not d.is_dir():
            pytest.skip(f"{d} not available")
        shutil.copytree(d, visits / d.name)
        for p in (visits / d.name).iterdir():  # the shared data is read-only
            p.chmod(0o644)
    write_image(visits / "synthetic" / "s1.jpg", synthetic_image(np.random.default_rng(9)))
    res = run_screen(tiny_models, [visits], tmp_path / "o", num_workers=1)
    assert res.exit_code == 0
    pats = {p["patient_id"]: p for p in read_csv(tmp_path / "o" / "patients.csv")}
    assert set(pats) == {"annocerv-C1", iarc.name, "synthetic"}
    n_real = {d: len([p for p in (visits / d).iterdir()]) for d in ("annocerv-C1", iarc.name)}
    for d, n in n_real.items():
        assert pats[d]["n_used"] == str(n) and pats[d]["decision"] in ("severe", "mildly_normal")
    for r in read_csv(tmp_path / "o" / "images.csv"):
        with Image.open(visits / r["patient_id"] / r["image"]) as im:
            w, h = im.size
        assert (int(r["width"]), int(r["height"])) == (w, h)
        assert decode_png(tmp_path / "o" / r["mask"]).shape == (h, w)
        assert (tmp_path / "o" / r["overlay"]).is_file()
    assert_no_tmp_files(tmp_path / "o")


@pytest.mark.gpu
def test_screen_on_cuda_matches_cpu(varied_models, varied_visits, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = run_screen(varied_models, [varied_visits], tmp_path / "cpu")
    gpu = run_screen(varied_models, [varied_visits], tmp_path / "gpu", device="cuda")
    assert gpu.run["device"].startswith("cuda")
    np.testing.assert_allclose([r["score"] for r in gpu.images], [r["score"] for r in cpu.images], atol=2e-3)


# --------------------------------------------------------------------------- regression tests

def test_mask_names_never_collide(tiny_models, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "a.png", "a_jpg.png"):
        write_image(tmp_path / "P1" / name, synthetic_image(rng))
    run_screen(tiny_models, [tmp_path / "P1"], tmp_path / "o")
    masks = [r["mask"] for r in read_csv(tmp_path / "o" / "images.csv")]
    assert len(set(masks)) == 3, masks


def test_explicit_device_overrides_the_config_file(tiny_models, synthetic_batch, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"device": "cuda:7"}')
    res = run_screen(tiny_models, [synthetic_batch], tmp_path / "o", config_file=str(cfg), device="cpu")
    assert res.run["device"] == "cpu"


def test_files_beside_the_visit_folders_are_listed_as_skipped(tiny_models, make_visit, tmp_path):
    batch = tmp_path / "batch"
    make_visit(batch / "P1", n=1)
    (batch / "labels.csv").write_text("patient_id,label\nP1,0\n", encoding="utf-8")
    (batch / ".nightly-state").write_text("{}", encoding="utf-8")  # hidden: listed as hidden, not screened
    res = run_screen(tiny_models, [batch], tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "skipped.csv")
    assert [(r["patient_id"], Path(r["file"]).name) for r in rows] == [("", ".nightly-state"), ("", "labels.csv")]
    assert rows[0]["reason"] == "hidden; outside any visit folder (not screened)"
    assert rows[1]["reason"] == "not an image file; outside any visit folder (not screened)"
    assert res.run["counts"]["skipped_files"] == 2
