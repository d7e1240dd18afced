"""Training on tiny synthetic data: patient-wise splits, train-seg and train-cls smoke runs,
resume, seeds, and installing a trained model for ``screen``.

Every run is a few seconds on one CPU thread: 64 px inputs, a handful of images,
two or three epochs (``max_steps_per_epoch`` caps the classifier steps).
"""

from __future__ import annotations

import csv
import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cervscan import api, metrics

from cervscan.training import finetune as cls_training
from cervscan.models import registry as W
from cervscan.cli import app
from cervscan.training.finetune import (ClsDataset, ClsTrainConfig, Sample, fit_temperature, patient_folds, patient_scores,
                                   patient_split, read_labels, train_cls, tune_vote_weights)
from cervscan.config import STUDY_WEIGHTS
from cervscan.errors import CervscanError, DataError
from cervscan.models.networks import read_checkpoint
from cervscan.training.segmenter import ANNOCERV_GROUP_REGEX, SegTrainConfig, group_of, split_pairs, train_seg

from conftest import REPO_ROOT, read_csv, read_json

# --------------------------------------------------------------------------- synthetic data


def _background(rng, h, w):
    return np.clip(np.array([170, 80, 90], np.float32) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def make_seg_data(root: Path, n_patients: int = 6, per_patient: int = 2, size: int = 64, seed: int = 0) -> Path:
    """images/C{p}Aceto_{k}.jpg with a whitish ellipse, masks/C{p}Aceto_{k}.png marking it."""
    import cv2

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for p in range(1, n_patients + 1):
        for k in range(1, per_patient + 1):
            img = _background(rng, size, size)
            mask = np.zeros((size, size), np.uint8)
            c = (int(rng.integers(size // 3, 2 * size // 3)), int(rng.integers(size // 3, 2 * size // 3)))
            ax = (int(rng.integers(size // 8, size // 4)), int(rng.integers(size // 8, size // 4)))
            ang = float(rng.integers(0, 180))
            cv2.ellipse(img, c, ax, ang, 0, 360, (235, 225, 225), -1)
            cv2.ellipse(mask, c, ax, ang, 0, 360, 255, -1)
            cv2.imwrite(str(root / "images" / f"C{p}Aceto_{k}.jpg"), img[..., ::-1])
            cv2.imwrite(str(root / "masks" / f"C{p}Aceto_{k}.png"), mask)
    return root


def make_cls_data(root: Path, n_patients: int = 10, per_patient: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """visits/P00.. with two images each; label 1 = a larger, brighter ellipse. labels.csv has a source column."""
    import cv2

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        label = i % 2
        pid = f"P{i:02d}"
        d = root / "visits" / pid
        d.mkdir(parents=True)
        for k in range(per_patient):
            img = _background(rng, 80, 80)
            r = int(rng.integers(18, 26)) if label else int(rng.integers(6, 10))
            cv2.ellipse(img, (40, 40), (r, r), 0, 0, 360, (250, 245, 245) if label else (200, 170, 170), -1)
            cv2.imwrite(str(d / f"img{k + 1}.jpg"), img[..., ::-1])
        rows.append({"patient_id": pid, "label": label, "source": "A" if i < n_patients // 2 else "B"})
    labels = root / "labels.csv"
    with open(labels, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["patient_id", "label", "source"])
        w.writeheader()
        w.writerows(rows)
    return root / "visits", labels


def state_dict_of(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


# --------------------------------------------------------------------------- splits

def _patients(n=40, seed=0):
    rng = np.random.default_rng(seed)
    pids = [f"P{i:03d}" for i in range(n)]
    y = (rng.random(n) < 0.35).astype(int)
    src = np.array(rng.choice(["clinicA", "clinicB"], n, p=[0.6, 0.4]), dtype=object)
    return pids, y, src


@pytest.mark.parametrize("k", [2, 5])
def test_patient_folds_partition_the_patients_and_keep_strata(k):
    pids, y, src = _patients()
    folds = patient_folds(pids, y, src, k, seed=0)
    assert len(folds) == k
    seen = [p for _, va in folds for p in va]
    assert sorted(seen) == sorted(pids)  # every patient in exactly one validation fold
    by = dict(zip(pids, zip(y, src)))
    for tr, va in folds:
        assert not (tr & va) and (tr | va) == set(pids)
        # stratified by label x source: each fold holds its share of every stratum (+-1 patient)
        for stratum in set(zip(y, src)):
            total = sum(v == stratum for v in by.values())
            in_val = sum(by[p] == stratum for p in va)
            assert abs(in_val - total / k) <= 1, (stratum, in_val, total)
    assert patient_folds(pids, y, src, k, seed=0) == folds
    assert patient_folds(pids, y, src, k, seed=1) != folds


def test_patient_folds_with_a_rare_source_fall_back_to_label_strata():
    pids, y, src = _patients()
    src = src.copy()
    src[0] = "one-patient-clinic"
    folds = patient_folds(pids, y, src, 5, seed=0)
    assert sorted(p for _, va in folds for p in va) == sorted(pids)
    for _, va in folds:
        assert abs(sum(y[pids.index(p)] for p in va) - y.sum() / 5) <= 1


def test_patient_folds_with_too_few_patients_of_a_class_is_a_data_error():
    pids = [f"P{i}" for i in range(10)]
    y = np.array([1, 1] + [0] * 8)
    with pytest.raises(DataError, match="3-fold cross-validation needs at least 3 patients of each class"):
        patient_folds(pids, y, np.array(["a"] * 10, dtype=object), 3, seed=0)


def test_patient_split_is_disjoint_and_stratified():
    pids, y, src = _patients()
    for seed in range(5):
        tr, va = patient_split(pids, y, src, 0.25, seed)
        assert not (tr & va) and (tr | va) == set(pids)
        assert len(va) == 10
        yv = [y[pids.index(p)] for p in va]
        assert abs(sum(yv) - 0.25 * y.sum()) <= 1
    assert patient_split(pids, y, src, 0.25, 3) == patient_split(pids, y, src, 0.25, 3)


def test_patient_split_of_a_small_set_with_sources():
    """12 patients, 4 label x source strata, 3 validation patients: falls back to label strata."""
    pids = [f"P{i:02d}" for i in range(12)]
    y = np.array([0, 1] * 6)
    src = np.array(["a"] * 6 + ["b"] * 6, dtype=object)
    tr, va = patient_split(pids, y, src, 0.2, seed=0)
    assert not (tr & va) and len(va) == 3 and len(tr) == 9
    assert {y[pids.index(p)] for p in va} == {0, 1}
    with pytest.raises(DataError, match="too few for a stratified validation split"):
        patient_split(pids[:3], np.array([0, 1, 1]), src[:3], 0.34, seed=0)


def _touch_pairs(root: Path, stems: list[str]) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for s in stems:
        (root / "images" / f"{s}.jpg").write_bytes(b"")
        (root / "masks" / f"{s}.png").write_bytes(b"")


def test_seg_split_by_patient_group_never_shares_a_patient(tmp_path):
    stems = [f"C{p}_{s}" for p in range(1, 13) for s in "abc"[: 1 + p % 3]]
    _touch_pairs(tmp_path, stems)
    val_sizes = set()
    for seed in range(8):
        tr, va, note = split_pairs(tmp_path, 0.25, ANNOCERV_GROUP_REGEX, seed)
        g_tr = {group_of(ip.stem, ANNOCERV_GROUP_REGEX) for ip, _ in tr}
        g_va = {group_of(ip.stem, ANNOCERV_GROUP_REGEX) for ip, _ in va}
        assert not (g_tr & g_va), seed
        assert len(g_va) == 3 and len(g_tr) == 9  # 12 patient groups, a quarter for validation
        assert sorted(ip.stem for ip, _ in tr + va) == sorted(stems)
        assert all(ip.stem == mp.stem for ip, mp in tr + va)
        assert "split by patient group" in note
        val_sizes.add(frozenset(g_va))
    assert len(val_sizes) > 1  # the seed changes the split


def test_seg_split_uses_given_train_and_val_folders(tmp_path):
    _touch_pairs(tmp_path / "train", ["C1_a", "C2_a"])
    _touch_pairs(tmp_path / "val", ["C3_a"])
    tr, va, note = split_pairs(tmp_path, 0.5, ANNOCERV_GROUP_REGEX, 0)
    assert [ip.stem for ip, _ in tr] == ["C1_a", "C2_a"] and [ip.stem for ip, _ in va] == ["C3_a"]
    assert note == "given train/ and val/"


def test_seg_split_errors(tmp_path):
    _touch_pairs(tmp_path / "one", ["C1_a", "C1_b"])
    with pytest.raises(DataError, match="at least 2 patient groups"):
        split_pairs(tmp_path / "one", 0.2, ANNOCERV_GROUP_REGEX, 0)
    (tmp_path / "nomask" / "images").mkdir(parents=True)
    (tmp_path / "nomask" / "masks").mkdir()
    (tmp_path / "nomask" / "images" / "C1_a.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no mask with the same stem"):
        split_pairs(tmp_path / "nomask", 0.2, ANNOCERV_GROUP_REGEX, 0)


def test_group_of():
    assert group_of("C10Aceto_1", ANNOCERV_GROUP_REGEX) == "C10"
    assert group_of("C1Aceto_1", ANNOCERV_GROUP_REGEX) == "C1"
    assert group_of("patient7", ANNOCERV_GROUP_REGEX) == "patient7"  # no match: the stem
    assert group_of("ab12cd", r"\d+") == "12"  # no group: the whole match


# --------------------------------------------------------------------------- train-seg

def seg_cfg(data: Path, out: Path, **kw) -> SegTrainConfig:
    base = dict(data=str(data), out=str(out), encoder="resnet18", pretrained=False, input_size=64, epochs=3,
                batch_size=4, lr=3e-3, val_fraction=0.34, seed=0)
    return SegTrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory) -> Path:
    return make_seg_data(tmp_path_factory.mktemp("segdata"))


@pytest.fixture(scope="module")
def seg_run(seg_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("segrun")
    cfg = seg_cfg(seg_data, out)
    return cfg, train_seg(cfg), out


@pytest.mark.slow
def test_train_seg_writes_a_loadable_segmenter_and_reports(seg_run):
    cfg, m, out = seg_run
    ck = read_checkpoint(out / "model.pt")
    assert ck["kind"] == "segmenter" and ck["arch"] == "resnet18" and ck["form"] == "train"
    assert tuple(ck["input_size"]) == (64, 64)
    assert ck["train_summary"]["n_train"] + ck["train_summary"]["n_val"] == 12

    rows = read_csv(out / "val_iou.csv")
    with open(out / "val_iou.csv", newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == ["image", "iou", "dice", "gt_area", "pred_area"]
    assert len(rows) == m["n_val"] == 4  # two of six patient groups, two images each
    val_groups = {group_of(r["image"], ANNOCERV_GROUP_REGEX) for r in rows}
    assert len(val_groups) == 2
    for r in rows:
        assert 0 <= float(r["iou"]) <= float(r["dice"]) <= 1  # Dice >= IoU always
        assert 0 < float(r["gt_area"]) < 1  # every synthetic mask has a lesion

    saved = read_json(out / "metrics.json")
    assert saved["n_train"] == 8 and saved["n_val"] == 4
    assert [h["epoch"] for h in saved["history"]] == [1, 2, 3]
    assert saved["best_epoch"] in (1, 2, 3)
    assert saved["val_mean_iou"] == saved["history"][saved["best_epoch"] - 1]["val_iou"]
    assert saved["history"][-1]["train_loss"] < saved["history"][0]["train_loss"]  # it learns
    assert (out / "iou.png").stat().st_size > 0
    assert read_json(out / "run.json")["config"]["epochs"] == 3


@pytest.mark.slow
def test_trained_segmenter_loads_in_screen(seg_run, tiny_models, tmp_path, make_visit):
    _, _, out = seg_run
    make_visit(tmp_path / "visits" / "V1", 2, seed=4)
    res = api.screen([tmp_path / "visits"], tmp_path / "screen", seg_model=str(out / "model.pt"),
                     cls_model=str(tiny_models["cls"]), device="cpu", num_workers=0)
    assert res.exit_code == 0
    sha = W.sha256_file(out / "model.pt")
    rows = read_csv(tmp_path / "screen" / "patients.csv")
    assert [r["patient_id"] for r in rows] == ["V1"] and rows[0]["n_used"] == "2"
    assert sha[:12] in rows[0]["seg_model"]
    assert len(list((tmp_path / "screen" / "masks" / "V1").glob("*.png"))) == 2


@pytest.mark.slow
def test_resume_of_a_finished_run_does_not_retrain(seg_run, tmp_path):
    cfg, m, out = seg_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = (copy / "model.pt").read_bytes()
    m2 = train_seg(seg_cfg(cfg.data, copy, resume=True))
    assert m2["history"] == m["history"]  # the same three epochs, none added
    assert (copy / "model.pt").read_bytes() == before
    assert m2["best_epoch"] == m["best_epoch"]
    # recomputed from val_iou.csv (6 decimals) instead of the in-memory rows
    assert m2["val_iou_quartiles"] == pytest.approx(m["val_iou_quartiles"], abs=1e-5)


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_uninterrupted_result(seg_run, tmp_path):
    cfg, m, out = seg_run

    def stop_in_epoch_3(ev):
        if ev["phase"] == "val" and ev["epoch"] == 3:
            raise Interrupted  # after training epoch 3, before its state is saved

    part = tmp_path / "part"
    with pytest.raises(Interrupted):
        train_seg(seg_cfg(cfg.data, part), progress=stop_in_epoch_3)
    assert [h["epoch"] for h in torch.load(part / "last_state.pt", weights_only=True)["history"]] == [1, 2]

    epochs_run = []
    m2 = train_seg(seg_cfg(cfg.data, part, resume=True), progress=lambda ev: epochs_run.append(ev["epoch"]))
    assert set(epochs_run) == {3}  # only the missing epoch
    assert without_seconds(m2["history"]) == without_seconds(m["history"])
    assert same_tensors(state_dict_of(part / "last_state.pt"), state_dict_of(out / "last_state.pt"))


def test_resume_with_more_epochs_keeps_training(seg_data, tmp_path):
    out = tmp_path / "run"
    cfg = seg_cfg(seg_data, out, epochs=2, max_steps_per_epoch=1)
    train_seg(cfg)
    w2 = state_dict_of(out / "last_state.pt")
    m = train_seg(seg_cfg(seg_data, out, epochs=3, max_steps_per_epoch=1, resume=True))
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3]
    w3 = state_dict_of(out / "last_state.pt")
    # the cosine schedule is stretched to the new end, so epoch 3 still has a learning rate
    name = "encoder.conv1.weight"
    assert not torch.equal(w2[name], w3[name])
    lr = torch.load(out / "last_state.pt", weights_only=True)["sched"]["_last_lr"][0]
    assert lr == pytest.approx(0.0, abs=1e-12)  # the schedule still ends at 0 after the last epoch


@pytest.mark.slow
def test_same_seed_same_segmenter(seg_data, tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train_seg(seg_cfg(seg_data, tmp_path / name, epochs=1, max_steps_per_epoch=2, seed=seed))
        runs[name] = tmp_path / name
    assert (runs["a"] / "val_iou.csv").read_bytes() == (runs["b"] / "val_iou.csv").read_bytes()
    assert read_json(runs["a"] / "metrics.json")["history"][0]["train_loss"] == \
        read_json(runs["b"] / "metrics.json")["history"][0]["train_loss"]
    assert same_tensors(state_dict_of(runs["a"] / "last_state.pt"), state_dict_of(runs["b"] / "last_state.pt"))
    assert not same_tensors(state_dict_of(runs["a"] / "last_state.pt"), state_dict_of(runs["c"] / "last_state.pt"))


def test_train_seg_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        train_seg(seg_cfg(tmp_path / "missing", tmp_path / "out"))
    make_seg_data(tmp_path / "d", n_patients=2, per_patient=1)
    with pytest.raises(CervscanError, match="use --no-pretrained"):
        train_seg(seg_cfg(tmp_path / "d", tmp_path / "out", pretrained=True))


# --------------------------------------------------------------------------- train-cls: helpers

def _sample(pid, label, seed, source="all"):
    rng = np.random.default_rng(seed)
    return Sample(pid, f"{pid}.jpg", label, source, rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
                  rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), False, 0.1)


def test_read_labels(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("patient_id,label,source\nP1,1,A\nP2,,A\n P3 ,0,\n", encoding="utf-8")
    assert read_labels(p) == [{"patient_id": "P1", "label": 1, "source": "A"},
                              {"patient_id": "P3", "label": 0, "source": "all"}]
    p.write_text("patient_id,label\nP1,2\n", encoding="utf-8")
    with pytest.raises(DataError, match="label must be 0 or 1"):
        read_labels(p)
    p.write_text("id,label\nP1,1\n", encoding="utf-8")
    with pytest.raises(DataError, match="needs columns patient_id,label"):
        read_labels(p)


@pytest.mark.parametrize("which,n", [("both", 6), ("original", 3), ("segmented", 3)])
def test_cls_dataset_samples_option(which, n):
    samples = [_sample(f"P{i}", i % 2, i) for i in range(3)]
    ds = ClsDataset(samples, which, (0.5,) * 3, (0.5,) * 3, train=False, size=8)
    assert len(ds) == n
    want = [a for s in samples for a in
            ([s.original] if which != "segmented" else []) + ([s.segmented] if which != "original" else [])]
    assert all(np.array_equal(img, w) for (img, _), w in zip(ds.items, want))
    x, lab = ds[0]
    assert x.shape == (3, 8, 8) and lab == samples[0].label


def test_patient_scores_hand_case():
    samples = [_sample("A", 1, 0), _sample("A", 1, 1), _sample("B", 0, 2)]
    # logits chosen so that P(severe) per variant is known: softmax([0, z]) = sigmoid(z)
    p = np.array([[0.9] * 6, [0.5] * 6, [0.2, 0.2, 0.2, 0.2, 0.8, 0.8]])
    logits = np.stack([np.zeros_like(p), np.log(p / (1 - p))], -1)
    w = [1, 1, 1, 1, 0, 0]
    pids, scores, img = patient_scores(samples, logits, 1.0, w)
    assert pids == ["A", "B"]
    np.testing.assert_allclose(img, [0.9, 0.5, 0.2])
    np.testing.assert_allclose(scores, [0.7, 0.2])
    # a temperature above 1 pulls probabilities towards 0.5
    _, s2, _ = patient_scores(samples, logits, 2.0, w)
    assert abs(s2[1] - 0.5) < abs(scores[1] - 0.5)


def test_fit_temperature_recovers_an_overconfident_scale():
    rng = np.random.default_rng(0)
    n = 4000
    z = rng.normal(0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)  # labels drawn from the calibrated model
    logits = np.stack([np.zeros(n), 3.0 * z], -1)  # three times overconfident
    assert fit_temperature(logits, y) == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(np.stack([np.zeros(n), z], -1), y) == pytest.approx(1.0, rel=0.1)


def test_tune_vote_weights_finds_the_informative_variant():
    rng = np.random.default_rng(1)
    samples = [_sample(f"P{i:02d}", i % 2, i) for i in range(30)]
    y = np.array([s.label for s in samples])
    p = rng.uniform(0.2, 0.8, (30, 6))  # five noise variants
    p[:, 2] = 0.3 + 0.4 * y + rng.normal(0, 0.02, 30)  # variant 3 separates perfectly
    logits = np.stack([np.zeros_like(p), np.log(p / (1 - p))], -1)
    w, auc = tune_vote_weights(samples, logits, 1.0, {s.patient_id: s.label for s in samples}, step=0.25)
    assert len(w) == 6 and sum(w) == pytest.approx(1.0) and min(w) >= 0
    assert auc == 1.0
    _, study_scores, _ = patient_scores(samples, logits, 1.0, STUDY_WEIGHTS)
    assert metrics.binary_metrics(y, study_scores, 0.5)["auc"] < 1.0  # the study weights do not reach it
    _, tuned_scores, _ = patient_scores(samples, logits, 1.0, w)
    assert metrics.binary_metrics(y, tuned_scores, 0.5)["auc"] == 1.0


def test_tune_vote_weights_keeps_the_study_weights_when_nothing_beats_them():
    samples = [_sample(f"P{i}", i % 2, i) for i in range(6)]
    p = np.tile(np.array([0.3, 0.7] * 3)[:, None], (1, 6))  # every variant separates perfectly
    logits = np.stack([np.zeros_like(p), np.log(p / (1 - p))], -1)
    w, auc = tune_vote_weights(samples, logits, 1.0, {s.patient_id: s.label for s in samples}, step=0.5)
    assert auc == 1.0
    np.testing.assert_allclose(w, np.array(STUDY_WEIGHTS) / sum(STUDY_WEIGHTS))


# --------------------------------------------------------------------------- train-cls: smoke runs

@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    visits, labels = make_cls_data(tmp_path_factory.mktemp("clsdata"))
    return visits, labels, tmp_path_factory.mktemp("clscache")


def cls_cfg(cls_data, tiny_models, out: Path, **kw) -> ClsTrainConfig:
    visits, labels, cache = cls_data
    base = dict(visits=str(visits), labels=str(labels), out=str(out), seg_model=str(tiny_models["seg"]),
                cervix_model=str(tiny_models["cervix"]), arch="repvgg_a0", input_size=64, epochs=2, batch_size=4, max_steps_per_epoch=2, val_fraction=0.4,
                cache_dir=str(cache), device="cpu",
                force=True)  # a few tiny patients: no classifier can pass its validation (test_safety_training.py)
    return ClsTrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def fast_bootstrap():
    """2000 bootstrap resamples x 3 subsets take longer than the tiny training itself; 200 are enough here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cls_training, "full_report", functools.partial(metrics.full_report, n_bootstrap=200))
        yield


@pytest.fixture(scope="module")
def cls_run(cls_data, tiny_models, tmp_path_factory, fast_bootstrap):
    out = tmp_path_factory.mktemp("clsrun")
    cfg = cls_cfg(cls_data, tiny_models, out)
    return cfg, train_cls(cfg), out


def test_train_cls_metrics(cls_run):
    cfg, m, out = cls_run
    saved = read_json(out / "metrics.json")
    assert saved["patients"] == 10 and saved["images"] == 20 and saved["severe"] == 5
    assert saved["evaluation"] == "validation split"
    (fold,) = saved["folds"]
    assert fold["fold"] == 1 and fold["train_patients"] == 6 and fold["val_patients"] == 4
    held = saved["held_out"]
    for k in ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "threshold", "confusion", "ci95"):
        assert k in held, k
    assert held["patients"] == 4 and sum(map(sum, held["confusion"])) == 4
    assert set(held["by_source"]) == {"A", "B"}
    op = saved["operating_point"]
    assert set(op) >= {"threshold", "sensitivity", "specificity", "target_sensitivity"}
    assert op["sensitivity"] >= cfg.target_sensitivity and held["threshold"] == op["threshold"]
    assert 0.05 <= saved["temperature"] <= 20
    assert saved["voting_weights"] == list(STUDY_WEIGHTS) and saved["tuned_vote_auc"] is None
    assert saved["checkpoint"] == str(out / "model.pt")
    for f in ("roc.png", "confusion.png", "image_predictions.csv", "oof_logits.npz", "run.json"):
        assert (out / f).is_file(), f


def test_train_cls_predictions_have_each_held_out_patient_once(cls_run, cls_data):
    _, m, out = cls_run
    rows = read_csv(out / "predictions.csv")
    labels = {r["patient_id"]: r for r in read_csv(cls_data[1])}
    pids = [r["patient_id"] for r in rows]
    assert len(pids) == len(set(pids)) == m["folds"][0]["val_patients"]
    thr = m["operating_point"]["threshold"]
    for r in rows:
        assert r["label"] == labels[r["patient_id"]]["label"] and r["source"] == labels[r["patient_id"]]["source"]
        if abs(float(r["score"]) - thr) > 1e-6:  # the CSV holds 6 decimals: nearer the threshold it cannot tell
            assert r["decision"] == ("severe" if float(r["score"]) > thr else "mildly_normal")
        assert r["fold"] == "1"
    # the held-out metrics are those of these rows
    scores = [float(r["score"]) for r in rows]
    y = [int(r["label"]) for r in rows]
    severe = [r["decision"] == "severe" for r in rows]
    confusion = [[sum(1 for t, d in zip(y, severe) if t == a and d == b) for b in (False, True)] for a in (0, 1)]
    assert confusion == m["held_out"]["confusion"]
    again = metrics.binary_metrics(y, scores, thr)
    if len(set(scores)) == len(scores):  # the CSV keeps 6 decimals: the tiny model's scores may tie there
        assert again["auc"] == pytest.approx(m["held_out"]["auc"])


def test_train_cls_checkpoint_is_deploy_form_and_screen_loads_it(cls_run, cls_data, tiny_models, tmp_path):
    _, m, out = cls_run
    ck = read_checkpoint(out / "model.pt")
    assert ck["kind"] == "classifier" and ck["form"] == "deploy" and ck["arch"] == "repvgg_a0"
    assert ck["threshold"] == pytest.approx(m["operating_point"]["threshold"])
    assert ck["operating_point"]["evaluated_on"] == "validation split" and ck["operating_point"]["patients"] == 4
    assert ck["voting"]["weights"] == list(STUDY_WEIGHTS) and ck["voting"]["tuned"] is False
    assert ck["temperature"] == pytest.approx(m["temperature"])
    assert ck["train_summary"]["samples"] == "both"

    res = api.screen([cls_data[0]], tmp_path / "screen", seg_model=str(tiny_models["seg"]), cervix_model=str(tiny_models["cervix"]),
                     cls_model=str(out / "model.pt"), device="cpu", num_workers=0)
    assert res.exit_code == 0
    rows = read_csv(tmp_path / "screen" / "patients.csv")
    assert len(rows) == 10 and all(r["n_used"] == "2" for r in rows)
    assert all(float(r["threshold"]) == pytest.approx(ck["threshold"]) for r in rows)
    assert all(W.sha256_file(out / "model.pt")[:12] in r["cls_model"] for r in rows)


@pytest.mark.parametrize("which", ["original", "segmented"])
def test_train_cls_samples_option(which, cls_data, tiny_models, tmp_path, fast_bootstrap):
    steps = set()
    cfg = cls_cfg(cls_data, tiny_models, tmp_path, samples=which, epochs=1, max_steps_per_epoch=1)
    m = train_cls(cfg, progress=lambda ev: steps.add(ev["steps"]) if ev.get("fold") == "split" else None)
    # 6 training patients x 2 images, one sample per image, batches of 4: 3 batches ('both' would give 6)
    assert steps == {3}
    assert m["summary"]["samples"] == which
    assert read_checkpoint(tmp_path / "model.pt")["train_summary"]["samples"] == which


def test_train_cls_interrupted_run_resumes_to_the_uninterrupted_result(cls_run, cls_data, tiny_models, tmp_path):
    _, m, out = cls_run

    def stop_in_epoch_2(ev):
        if ev.get("fold") == "split" and ev["epoch"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_cls(cls_cfg(cls_data, tiny_models, tmp_path), progress=stop_in_epoch_2)
    assert torch.load(tmp_path / "state_fold1.pt", weights_only=True)["epoch"] == 1
    m2 = train_cls(cls_cfg(cls_data, tiny_models, tmp_path, resume=True))
    assert (tmp_path / "predictions.csv").read_bytes() == (out / "predictions.csv").read_bytes()
    assert m2["temperature"] == m["temperature"]
    # more epochs than the saved one-cycle schedule: a clear error, not torch's ValueError mid-epoch
    with pytest.raises(CervscanError, match="saved for 4 training steps, the options now give 6"):
        train_cls(cls_cfg(cls_data, tiny_models, tmp_path, resume=True, epochs=3))


def test_train_cls_rejects_a_bad_samples_option(cls_data, tiny_models, tmp_path):
    with pytest.raises(CervscanError, match="--samples must be both, original or segmented"):
        train_cls(cls_cfg(cls_data, tiny_models, tmp_path, samples="all"))


def test_train_cls_single_class_labels(cls_data, tiny_models, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,label\nP00,0\nP02,0\nP04,0\n", encoding="utf-8")
    with pytest.raises(DataError, match="single class"):
        train_cls(cls_cfg(cls_data, tiny_models, tmp_path / "out", labels=str(labels)))


@pytest.mark.slow
def test_train_cls_cross_validation_tuned_votes_and_seed_repeatability(cls_data, tiny_models, tmp_path,
                                                                       fast_bootstrap):
    runs = []
    for name in ("a", "b"):
        cfg = cls_cfg(cls_data, tiny_models, tmp_path / name, folds=2, full=True, tune_votes=True, epochs=1, seed=3)
        runs.append(train_cls(cfg))
    a, b = runs
    assert a["evaluation"] == "cross-validation" and [r["fold"] for r in a["folds"]] == [1, 2]
    assert sum(r["val_patients"] for r in a["folds"]) == 10 and "auc" in a["fold_summary"]
    assert a["final_model"].startswith("trained on all 10 patients")
    rows = read_csv(tmp_path / "a" / "predictions.csv")
    assert sorted(r["patient_id"] for r in rows) == [f"P{i:02d}" for i in range(10)]  # every patient once
    assert {r["fold"] for r in rows} == {"1", "2"}
    assert len(a["voting_weights"]) == 6 and sum(a["voting_weights"]) == pytest.approx(1.0)
    assert min(a["voting_weights"]) >= 0 and a["tuned_vote_auc"] is not None
    ck = read_checkpoint(tmp_path / "a" / "model.pt")
    assert ck["form"] == "deploy" and ck["operating_point"]["evaluated_on"] == "cross-validation"
    assert ck["voting"]["weights"] == a["voting_weights"] and ck["voting"]["tuned"] is True
    # the same seed: the same folds, scores, weights, temperature and final model
    assert (tmp_path / "a" / "predictions.csv").read_bytes() == (tmp_path / "b" / "predictions.csv").read_bytes()
    assert a["voting_weights"] == b["voting_weights"] and a["temperature"] == b["temperature"]
    cb = read_checkpoint(tmp_path / "b" / "model.pt")
    assert same_tensors(ck["state_dict"], cb["state_dict"])


# --------------------------------------------------------------------------- models install

def test_models_install_of_a_training_run_is_used_by_screen_until_rollback(cls_run, tiny_models, cls_data, tmp_path,
                                                                           monkeypatch):
    _, _, run_dir = cls_run
    monkeypatch.setattr(W, "shipped_dir", lambda: tiny_models["dir"])  # the tiny models play the shipped ones
    before = W.resolve("classifier")
    assert before.source == "shipped"
    runner = CliRunner()

    r = runner.invoke(app, ["models", "install", str(run_dir), "--force"])  # its validation failed (4 patients)
    assert r.exit_code == 0, r.output
    new_sha = W.sha256_file(run_dir / "model.pt")
    assert "installed classifier" in r.stdout and new_sha[:12] in r.stdout

    r = runner.invoke(app, ["models", "list"])
    assert r.exit_code == 0, r.output
    out = " ".join(r.stdout.split())
    assert "classifier: installed" in out and "segmenter: shipped" in out
    # the table is narrow under CliRunner: cells are cut to a few characters
    rows = [line for line in r.stdout.splitlines() if line.startswith("│")]
    installed = [line for line in rows if new_sha[:7] in line]
    shipped_cls = [line for line in rows if before.sha256[:7] in line]
    assert len(installed) == 1 and "yes" in installed[0]
    assert len(shipped_cls) == 1 and "yes" not in shipped_cls[0]

    res = api.screen([cls_data[0]], tmp_path / "screen", device="cpu", num_workers=0)
    rows = read_csv(tmp_path / "screen" / "patients.csv")
    assert rows and all(new_sha[:12] in r_["cls_model"] for r_ in rows)
    assert res.run["models"]["classifier"]["source"] == "installed"
    assert res.run["models"]["segmenter"]["sha256"] == W.sha256_file(tiny_models["seg"])

    r = runner.invoke(app, ["models", "rollback"])
    assert r.exit_code == 0, r.output
    after = W.resolve("classifier")
    assert (after.source, after.path, after.sha256) == (before.source, before.path, before.sha256)


def test_train_cls_learning_curve_scores_without_changing_training(cls_run, cls_data, tiny_models, tmp_path):
    _, m, out = cls_run
    m2 = train_cls(cls_cfg(cls_data, tiny_models, tmp_path, eval_epochs=(1,)))
    # scoring the held-out patients after epoch 1 does not disturb the training that follows
    assert (tmp_path / "predictions.csv").read_bytes() == (out / "predictions.csv").read_bytes()
    curve = m2["epoch_curve"]
    assert [r["epoch"] for r in curve] == [1, 2]
    # the last point is the run's own held-out result
    assert curve[-1]["auc"] == pytest.approx(m2["held_out"]["auc"])
    assert curve[-1]["temperature"] == pytest.approx(m2["temperature"])
    assert set(curve[0]) >= {"auc", "auc[A]", "auc[B]", "specificity_at_op", "sensitivity_at_op"}
    assert m["epoch_curve"] is None
    with np.load(tmp_path / "curve_fold1.npz") as z:
        assert z.files == ["e1"] and z["e1"].shape == (8, 6, 2)  # 4 held-out patients x 2 images


@pytest.mark.parametrize("arch", ["repvgg_a0", "tf_efficientnet_lite0"])
def test_head_std_reinitialises_only_the_head(arch):
    base = dict(visits="", labels="", out="", arch=arch)
    torch.manual_seed(0)
    plain = cls_training._build(ClsTrainConfig(**base))[0]
    torch.manual_seed(0)
    small = cls_training._build(ClsTrainConfig(**base, head_std=0.001))[0]
    head = small.get_classifier()
    assert 0.0007 < float(head.weight.detach().std()) < 0.0013 and float(head.bias.detach().abs().max()) == 0.0
    assert float(plain.get_classifier().weight.detach().std()) > 0.005
    if arch == "tf_efficientnet_lite0":  # timm: U(+-1/sqrt(2)) for a 2-class head, std 0.41
        assert float(plain.get_classifier().weight.detach().std()) == pytest.approx(0.408, abs=0.02)
    names = {n for n, _ in small.get_classifier().named_parameters(prefix="")}
    head_params = {id(p) for p in head.parameters()}
    for (n, a), b in zip(plain.named_parameters(), small.parameters()):
        if id(b) not in head_params:
            assert torch.equal(a, b), n
    assert names == {"weight", "bias"}


@pytest.mark.parametrize("value", ["0", "7", "2,x"])
def test_train_cls_rejects_bad_eval_epochs(value, tmp_path):
    r = CliRunner().invoke(app, ["train-cls", str(tmp_path), "--labels", str(tmp_path / "l.csv"), "-o",
                                 str(tmp_path / "o"), "--recipe", "finetune", "--epochs", "6", "--eval-epochs", value])
    assert r.exit_code != 0 and "--eval-epochs" in r.output


# --------------------------------------------------------------------------- defaults = the shipped recipes

def test_train_cls_defaults_are_the_shipped_classifier_recipe():
    """train-cls with no recipe options trains what weights/classifier.pt records having been trained with."""
    from cervscan.training.configs import DecisionTrainConfig, classifier_config

    from conftest import REPO_ROOT

    ck = read_checkpoint(REPO_ROOT / "weights" / "classifier.pt")
    cfg = classifier_config(visits="v", labels="l", out="o")  # the default recipe, nothing given
    assert isinstance(cfg, DecisionTrainConfig) and ck["recipe"] == "frozen-linear"
    assert ck["arch"] == f"tf_efficientnet_{cfg.backbone}" and ck["name"] == cfg.name
    assert list(ck["input_size"]) == [cfg.input_size] * 2 == [ck["train_summary"]["input_size"]] * 2
    assert ck["classify_view"] == cfg.classify_view == ck["train_summary"]["classify_view"]
    assert ck["decision_stages"] == list(cfg.decision_stages) == ck["train_summary"]["decision_stages"]
    assert ck["voting"]["variants"] == list(cfg.variants) and ck["voting"]["weights"] == list(cfg.weights)
    assert f"C={cfg.C}," in ck["train_summary"]["head"]
    assert f"trained on {'+'.join(cfg.train_variants)};" in ck["train_summary"]["head"]


def test_train_seg_and_stage_defaults_are_the_shipped_recipes():
    from cervscan.models.networks import DEFAULT_SEG_ENCODER
    from cervscan.training.configs import SEG_ENCODER, StageTrainConfig, seg_config

    from conftest import REPO_ROOT

    assert SEG_ENCODER == DEFAULT_SEG_ENCODER
    for role, target in (("segmenter", "lesion"), ("cervix", "cervix")):
        ck = read_checkpoint(REPO_ROOT / "weights" / f"{role}.pt")
        cfg = seg_config(data="d", out="o", **({} if target == "lesion" else {"target": target}))
        assert (ck["target"], ck["name"], list(ck["input_size"])) == (cfg.target, cfg.name, [cfg.input_size] * 2)
    assert seg_config(data="d", out="o", target="cervix", epochs=3).epochs == 3  # an option given wins
    assert read_checkpoint(REPO_ROOT / "weights" / "stage.pt")["name"] == StageTrainConfig(visits="v", out="o").name


def test_train_cls_refuses_the_other_recipes_options(tmp_path):
    r = CliRunner().invoke(app, ["train-cls", str(tmp_path), "--labels", str(tmp_path / "l.csv"), "-o",
                                 str(tmp_path / "o"), "--arch", "repvgg_a0"])
    assert r.exit_code == 1 and "--arch: not a setting of --recipe frozen" in " ".join(r.output.split()), r.output
    r = CliRunner().invoke(app, ["train-cls", str(tmp_path), "--labels", str(tmp_path / "l.csv"), "-o",
                                 str(tmp_path / "o"), "--recipe", "finetune", "--repeats", "2"])
    assert r.exit_code == 1 and "--repeats: not a setting of --recipe finetune" in " ".join(r.output.split()), r.output


# --------------------------------------------------------------------------- train-stage

STAGE_RAW = {"acetic": "After application of acetic acid", "lugol": "After Lugol's iodine", "green": "Green filter",
             "saline": "After normal saline", "other": "Speculum examination"}


# Every stage string of the two shared stage tables, with its class. visits/images.csv trains the shipped stage
# model: none of its strings may change class. via-visits/images.csv (the VIA bank's order, inferred): "Before
# acetic acid" is the cervix before any solution, the saline class, not acetic acid.
VISITS_STAGES = {
    "After Lugol's iodine": "lugol", "After acetic acid": "acetic",
    "After acetic acid and pushing the polyp inside": "acetic",
    "After acetic acid with endocervical speculum": "other", "After acetic acid with green filter": "green",
    "After acetic acid with higher magnification": "acetic", "After normal saline": "saline",
    "After normal saline with green filter": "green",
    "After normal saline with green filter with higher magnification": "green",
    "After normal saline with higher magnification": "saline", "Examination of endocervical canal": "other",
    "Examination of endocervix": "other", "Examination of the vagina": "other",
    "Examination with endocervical speculum": "other", "Speculum examination": "other",
    "Speculum examination with higher magnification": "other", "Visualization of the SCJ": "other",
    "Vulva after acetic acid": "other", "Vulva before acetic acid": "other"}
VIA_STAGES = {"Before acetic acid (naked eye)": "saline", "After acetic acid (naked eye, VIA)": "acetic",
              "After Lugol's iodine (naked eye, VILI)": "lugol"}


@pytest.mark.parametrize("raw,expected", [*VISITS_STAGES.items(), *VIA_STAGES.items(), ("", None), ("  ", None),
                                          ("before acetic acid", "saline"), ("AFTER ACETIC ACID", "acetic")])
def test_stage_class_maps_every_recorded_stage(raw, expected):
    from cervscan.training.stage import stage_class

    assert stage_class(raw) == expected


@pytest.mark.parametrize("table,expected", [("visits", VISITS_STAGES), ("via-visits", VIA_STAGES)])
def test_stage_class_tables_cover_the_shared_stage_strings(table, expected):
    """The tables above are every distinct stage of the shared data (so a new string gets a deliberate class)."""
    path = REPO_ROOT.parent / "shared" / "data" / table / "images.csv"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    with open(path, newline="", encoding="utf-8") as f:
        assert {r["stage"] for r in csv.DictReader(f)} == set(expected)


def test_train_stage_on_tiny_visits(tmp_path):
    """train-stage end to end: frozen Lite0 features (offline ImageNet weights), a regression folded into the
    network, cross-validated accuracy; the checkpoint screens as a stage model."""
    from cervscan.config import STAGES
    from cervscan.models.loading import load_model

    from conftest import synthetic_image, write_image

    rng = np.random.default_rng(0)
    visits = tmp_path / "visits"
    rows = []
    for k in range(4):
        pid = f"IARC-{k}"
        for j, stage in enumerate(STAGES):
            img = synthetic_image(rng, 48, 64)
            img[..., j % 3] = np.clip(img[..., j % 3].astype(int) + 60 * (j + 1) % 200, 0, 255)  # a stage's colour cast
            write_image(visits / pid / f"{stage}.jpg", img.astype(np.uint8))
            rows.append({"patient_id": pid, "image": f"{stage}.jpg", "stage": STAGE_RAW[stage]})
    with open(visits / "images.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["patient_id", "image", "stage"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train-stage", str(visits), "-o", str(out), "--folds", "2", "--threads", "1",
                                 "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    m = read_json(out / "metrics.json")
    assert 0.0 <= m["accuracy"] <= 1.0 and set(m["per_class"]) == set(STAGES)
    run = read_json(out / "run.json")
    assert run["command"] == "train-stage" and run["config"]["folds"] == 2 and run["config"]["name"] == "cervscan-stage-lite0"
    ck = read_checkpoint(out / "model.pt")
    assert ck["kind"] == "stage" and list(ck["classes"]) == list(STAGES)
    stage = load_model("stage", out / "model.pt", torch.device("cpu"))
    with torch.no_grad():
        logits = stage.net(torch.zeros(1, 3, 224, 224))
    assert logits.shape == (1, len(STAGES))
