"""The screening pipeline: crop geometry, crop modes, and no drift between training data and screening."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cervscan.config import ScreenConfig
from cervscan.pipeline.steps import Pipeline
from cervscan.models.loading import load_model
from cervscan.pipeline.steps import centre_box, cervix_box, crop_to_box, format_box, largest_component, parse_box, paste_box, square_box

from conftest import read_csv


# --------------------------------------------------------------------------- geometry

def test_square_box_is_centred_with_margin_and_clipped():
    # 40 x 20 box centred at (50, 50), margin 0.1 -> side 48
    assert square_box(30, 40, 70, 60, 0.1, 200, 200) == (26, 26, 74, 74)
    # near the border: clipped, not shifted
    assert square_box(0, 0, 40, 20, 0.1, 100, 100) == (0, 0, 44, 34)


def test_centre_box_fraction_of_shorter_side():
    assert centre_box(800, 600, 0.8) == (160, 60, 640, 540)
    assert centre_box(100, 100, 1.0) == (0, 0, 100, 100)


def test_cervix_box_found_and_not_found():
    cfg = ScreenConfig(cervix_min_fraction=0.03, cervix_margin=0.0, centre_crop=0.5)
    m = np.zeros((100, 200), np.uint8)
    m[20:60, 50:90] = 1  # 8 % of the frame
    box, found, frac = cervix_box(m, cfg)
    assert found and frac == pytest.approx(0.08) and box == (50, 20, 90, 60)
    tiny = np.zeros((100, 200), np.uint8)
    tiny[0:5, 0:5] = 1
    box, found, frac = cervix_box(tiny, cfg)
    assert not found and box == centre_box(200, 100, 0.5)


def test_largest_component_drops_specks():
    m = np.zeros((50, 50), np.uint8)
    m[10:30, 10:30] = 1
    m[45:47, 45:47] = 1
    lc = largest_component(m)
    assert lc.sum() == 400 and lc[46, 46] == 0


def test_crop_paste_and_box_text_round_trip():
    a = np.arange(100, dtype=np.uint8).reshape(10, 10)
    box = (2, 3, 7, 9)
    c = crop_to_box(a, box)
    assert c.shape == (6, 5)
    back = paste_box(c, box, 10, 10)
    assert (back[3:9, 2:7] == c).all() and back.sum() == c.sum()
    assert parse_box(format_box(box)) == box and parse_box("") is None and parse_box("1 2 x 4") is None


# --------------------------------------------------------------------------- crop modes through screen

@pytest.mark.parametrize("crop", ["frame", "centre", "cervix"])
def test_crop_modes_are_recorded(tiny_models, synthetic_batch, tmp_path, crop):
    from cervscan import api

    res = api.screen([synthetic_batch], tmp_path / "o", seg_model=str(tiny_models["seg"]),
                     cls_model=str(tiny_models["cls"]), cervix_model=str(tiny_models["cervix"]),
                     overrides={"crop": crop}, device="cpu")
    assert res.run["config"]["crop"] == crop and res.run["provenance"]["crop"] == "option"
    assert ("cervix" in res.run["models"]) == (crop == "cervix")
    rows = read_csv(tmp_path / "o" / "images.csv")
    for r in rows:
        w, h = int(r["width"]), int(r["height"])
        box = parse_box(r["crop_box"])
        if crop == "frame":
            assert box == (0, 0, w, h) and r["cervix_found"] == ""
        elif crop == "centre":
            assert box == centre_box(w, h, ScreenConfig().centre_crop) and r["cervix_found"] == ""
        else:
            assert r["cervix_found"] in ("True", "False")
            assert r["cervix_mask"], "cervix mask file not recorded"
            cm = (tmp_path / "o" / r["cervix_mask"])
            import cv2
            m = cv2.imread(str(cm), cv2.IMREAD_GRAYSCALE)
            assert m.shape == (h, w) and set(np.unique(m)) <= {0, 255}
            if r["cervix_found"] == "False":
                assert box == centre_box(w, h, ScreenConfig().centre_crop)
        lm = __import__("cv2").imread(str(tmp_path / "o" / r["mask"]), 0)
        assert lm.shape == (h, w), "lesion mask not at the image's own size"
        assert r["stage"] in ("acetic", "lugol", "green", "saline", "other")
        assert 0 < float(r["stage_confidence"]) <= 1


def test_crop_cervix_without_a_cervix_model_is_a_clear_error(tiny_models, synthetic_batch, tmp_path, monkeypatch):
    from cervscan import api
    from cervscan.errors import CervscanError

    import cervscan.models.registry as W
    monkeypatch.setattr(W, "shipped_dir", lambda: None)
    with pytest.raises(CervscanError, match="no cervix model found"):
        api.screen([synthetic_batch], tmp_path / "o", seg_model=str(tiny_models["seg"]),
                   cls_model=str(tiny_models["cls"]), overrides={"crop": "cervix"}, device="cpu")


def test_cervix_finder_runs_on_the_frame_and_the_lesion_on_the_crop(tiny_models):
    """A cervix found in the left half: the lesion segmenter must see only that crop."""
    seen = {}
    pipe = Pipeline({"segmenter": load_model("segmenter", tiny_models["seg"], "cpu"),
                     "cervix": load_model("cervix", tiny_models["cervix"], "cpu")},
                    ScreenConfig(crop="cervix", cervix_margin=0.0))
    rgb = np.random.default_rng(0).integers(0, 255, (60, 120, 3), dtype=np.uint8)

    def fake_segment(role, images, thr):
        seen[role] = [im.shape for im in images]
        if role == "cervix":
            m = np.zeros(images[0].shape[:2], np.uint8)
            m[10:50, 5:45] = 1
            return [m]
        return [np.ones(im.shape[:2], np.uint8) for im in images]

    pipe._segment = fake_segment
    p = pipe.prepare([rgb], size=32)[0]
    assert seen["cervix"] == [(60, 120, 3)] and seen["segmenter"] == [(40, 40, 3)]
    assert p.crop_box == (5, 10, 45, 50) and p.cervix_found is True
    assert p.lesion_mask.shape == (60, 120) and p.lesion_mask.sum() == 1600
    assert p.lesion_fraction == pytest.approx(1.0)  # the whole cervix is lesion
    assert p.original.shape == (32, 32, 3)


# --------------------------------------------------------------------------- no drift between training and screening

def test_training_data_and_screening_give_the_same_arrays_and_score(tiny_models, tmp_path, make_visit):
    """prepare_samples (train-cls) and screen go through the same pipeline: same arrays, same score.

    Screening runs one image per batch here, as data preparation does: a different batch size may
    change the float rounding of a convolution, which can flip a mask pixel lying exactly at the
    threshold (the random tiny models put many pixels there)."""
    pass
    from cervscan.training.finetune import ClsTrainConfig, patient_scores, prepare_samples, variant_logits
    from cervscan.config import STUDY_WEIGHTS
    from cervscan.models.networks import model_from_checkpoint, read_checkpoint

    visits = tmp_path / "visits"
    make_visit(visits / "P1", 2, seed=5)
    make_visit(visits / "P2", 1, seed=6)
    (tmp_path / "labels.csv").write_text("patient_id,label,source\nP1,1,a\nP2,0,a\n")
    cfg = ClsTrainConfig(visits=str(visits), labels=str(tmp_path / "labels.csv"), out=str(tmp_path / "run"),
                         seg_model=str(tiny_models["seg"]), cervix_model=str(tiny_models["cervix"]), crop="cervix",
                         input_size=64, device="cpu", cache_dir=str(tmp_path / "cache"))
    samples, info = prepare_samples(cfg)
    assert set(info) == {"segmenter", "cervix"}
    samples_cached, _ = prepare_samples(cfg)  # second time from the cache: identical
    for a, b in zip(samples, samples_cached):
        assert np.array_equal(a.original, b.original) and np.array_equal(a.segmented, b.segmented)

    pipe = Pipeline.from_config(seg_model=str(tiny_models["seg"]), cls_model=str(tiny_models["cls"]),
                                         cervix_model=str(tiny_models["cervix"]), overrides={"crop": "cervix"},
                                         device="cpu", batch_images=1)
    items = [(s.patient_id, visits / s.patient_id / s.image) for s in samples]
    results = list(pipe.run(items))
    for s, r in zip(samples, results):
        assert r.record["status"] == "ok"
        assert np.array_equal(s.original, r.prepared.original), s.image
        assert np.array_equal(s.segmented, r.prepared.segmented), s.image
        assert s.lesion_fraction == pytest.approx(r.record["lesion_fraction"])
        assert s.empty_mask == r.record["empty_mask"]

    # the training-side score of each image equals the screening score
    ck = read_checkpoint(tiny_models["cls"])
    model = model_from_checkpoint(ck)
    cfg_cls = ClsTrainConfig(visits="", labels="", out="", arch=ck["arch"], input_size=64)
    logits = variant_logits(model, samples, cfg_cls, torch.device("cpu"))
    _, _, img_scores = patient_scores(samples, logits, float(ck.get("temperature") or 1.0), STUDY_WEIGHTS)
    for sc, r in zip(img_scores, results):
        assert sc == pytest.approx(r.record["score"], abs=1e-5)
