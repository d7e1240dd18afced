"""PDF reports and Grad-CAM: built from synthetic and real screen outputs with tiny models (CPU, fast)."""

from __future__ import annotations

import json
import shutil
import subprocess
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from cervscan.errors import CervscanError

torch.set_num_threads(1)

NON_ASCII_ID = "Zoë-Ødegård"
CLINIC = "Clinique Saint-Éloi"


# --------------------------------------------------------------------------- helpers

def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Reddish 'cervix' with a whitish ellipse."""
    import cv2

    img = np.clip(np.array([170, 80, 90], np.float32) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    cv2.ellipse(img, (w // 2, h // 2), (w // 5, h // 6), 20, 0, 360, (235, 225, 225), -1)
    return img


def _write(path: Path, rgb: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def _text(pdf: Path) -> str:
    from pypdf import PdfReader

    txt = "\n".join(p.extract_text() or "" for p in PdfReader(pdf).pages)
    return unicodedata.normalize("NFC", txt)


def _flat(s: str) -> str:
    return " ".join(s.split())


def _pages(pdf: Path):
    from pypdf import PdfReader

    return PdfReader(pdf).pages


def _screen(visits: list[Path], out: Path, models: dict):
    from cervscan import api

    return api.screen(visits, out, seg_model=str(models["seg"]), cls_model=str(models["cls"]), device="cpu",
                      num_workers=0, threads=1)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def synth(tiny_models, tmp_path_factory) -> dict:
    """Screen + reports of 4 synthetic visits: a non-ASCII id with a 0-byte image, a portrait image
    plus a non-image file, a landscape visit, and an empty visit (error)."""
    from cervscan.report import write_reports

    root = tmp_path_factory.mktemp("synth")
    visits = root / "visits"
    rng = np.random.default_rng(0)
    _write(visits / NON_ASCII_ID / "a1.jpg", _image(rng, 96, 128))
    _write(visits / NON_ASCII_ID / "a2.png", _image(rng, 90, 120))
    (visits / NON_ASCII_ID / "broken.jpg").write_bytes(b"")
    _write(visits / "P002" / "portrait.jpg", _image(rng, 140, 90))
    (visits / "P002" / "notes.txt").write_text("not an image")
    _write(visits / "P003" / "x.jpg", _image(rng, 80, 110))
    (visits / "P004-empty").mkdir()
    out = root / "out"
    res = _screen([visits], out, tiny_models)
    paths = write_reports(out, clinic=CLINIC)
    return {"out": out, "res": res, "paths": paths, "visits": visits}


@pytest.fixture(scope="module")
def real(tiny_models, tmp_path_factory) -> dict:
    """Screen + reports of 3 real colposcopy images (2 patients) copied from ../shared/data."""
    from cervscan.report import write_reports

    data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "visits"
    picks = {"iarc-AAAW": ["AAAW1.jpg", "AAAW4.jpg"], "annocerv-C1": ["C1Aceto_1.jpg"]}
    if not all((data / pid / n).is_file() for pid, ns in picks.items() for n in ns):
        pytest.skip(f"real data not available at {data}")
    root = tmp_path_factory.mktemp("real")
    for pid, names in picks.items():
        (root / "visits" / pid).mkdir(parents=True)
        for n in names:
            shutil.copy(data / pid / n, root / "visits" / pid / n)
    out = root / "out"
    res = _screen([root / "visits"], out, tiny_models)
    return {"out": out, "res": res, "paths": write_reports(out)}


def _patient(res, pid: str) -> dict:
    return next(p for p in res.patients if p["patient_id"] == pid)


# --------------------------------------------------------------------------- synthetic run

def test_all_reports_written_atomically(synth):
    out = synth["out"]
    names = sorted(p.name for p in synth["paths"])
    assert names == sorted([f"{NON_ASCII_ID}.pdf", "P002.pdf", "P003.pdf", "P004-empty.pdf", "summary.pdf"])
    assert synth["paths"][-1] == out / "reports" / "summary.pdf"
    for p in synth["paths"]:
        assert p.parent == out / "reports"
        assert p.read_bytes()[:5] == b"%PDF-"
    left = [p.name for p in (out / "reports").iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    assert not left


def test_patient_report_states_id_decision_score(synth):
    res = synth["res"]
    for pid in ("P002", "P003"):
        p = _patient(res, pid)
        txt = _flat(_text(synth["out"] / "reports" / f"{pid}.pdf"))
        assert pid in txt
        assert {"severe": "SEVERE", "mildly_normal": "MILDLY NORMAL"}[p["decision"]] in txt
        assert f"Score {p['score']:.3f}" in txt
        assert f"threshold {p['threshold']:.3f}" in txt
        assert "sensitivity 90%" in txt and "specificity 50%" in txt  # the tiny classifier's operating point
        assert "Recommended next step" in txt
        assert CLINIC in txt
        assert "does not replace the clinician's judgement" in txt
        assert "Signature" in txt and "notes" in txt


def test_non_ascii_patient_id_renders_and_is_extractable(synth):
    pdf = synth["out"] / "reports" / f"{NON_ASCII_ID}.pdf"
    assert pdf.is_file()
    txt = _text(pdf)
    assert NON_ASCII_ID in txt
    assert CLINIC in txt
    fonts = set()
    for page in _pages(pdf):
        for f in (page["/Resources"].get("/Font") or {}).values():
            fonts.add(str(f.get_object()["/BaseFont"]))
    assert any("DejaVu" in f or "Vera" in f for f in fonts), fonts  # an embedded TTF, not a base-14 font


def test_failed_images_are_listed(synth):
    txt = _flat(_text(synth["out"] / "reports" / f"{NON_ASCII_ID}.pdf"))
    assert "1 image(s) could not be used" in txt
    assert "Images that could not be used (1)" in txt
    assert "broken.jpg" in txt and "empty file" in txt
    assert "2 of 3 image(s) used" in txt
    # the non-image file of P002 is listed as not screened
    txt2 = _flat(_text(synth["out"] / "reports" / "P002.pdf"))
    assert "notes.txt" in txt2 and "not an image file" in txt2


def test_error_patient_report(synth):
    txt = _flat(_text(synth["out"] / "reports" / "P004-empty.pdf"))
    assert "NO RESULT" in txt
    assert "no image files in visit folder" in txt
    assert "No score" in txt


def test_images_pages_and_heatmaps(synth):
    out = synth["out"]
    for pid, n_ok in ((NON_ASCII_ID, 2), ("P002", 1), ("P003", 1), ("P004-empty", 0)):
        pages = _pages(out / "reports" / f"{pid}.pdf")
        n_pages = len(pages)
        assert 1 <= n_pages <= 3
        assert f"Page {n_pages} of {n_pages}" in (pages[-1].extract_text() or "")
        # original + lesion overlay + Grad-CAM heatmap per usable image
        assert sum(len(p.images) for p in pages) == 3 * n_ok
    rows = [r for r in synth["res"].images if r["status"] == "ok"]
    for r in rows:
        hm = out / "heatmaps" / r["patient_id"] / (Path(r["overlay"]).stem + ".jpg")
        assert hm.is_file(), hm
        from cervscan.files import read_image

        assert read_image(hm).rgb.shape[:2] == (r["height"], r["width"])
    txt = _text(out / "reports" / "P003.pdf")
    assert "Grad-CAM" in txt and "unavailable" not in txt


def test_write_heatmaps_hook(synth):
    from cervscan.report import write_heatmaps

    res = write_heatmaps(synth["out"], patients=[NON_ASCII_ID])
    assert set(k[0] for k in res) == {NON_ASCII_ID}
    assert isinstance(res[(NON_ASCII_ID, "a1.jpg")], Path) and res[(NON_ASCII_ID, "a1.jpg")].is_file()
    assert res[(NON_ASCII_ID, "broken.jpg")] == "image could not be used"


def test_summary_lists_all_patients_severe_first_with_errors(synth):
    txt = _flat(_text(synth["out"] / "reports" / "summary.pdf"))
    res = synth["res"]
    for p in res.patients:
        assert p["patient_id"] in txt
    assert "4 patient(s)" in txt
    assert "Patients without a result (1)" in txt and "no image files in visit folder" in txt
    assert "Images that could not be used (1)" in txt and "broken.jpg" in txt
    order = sorted((p for p in res.patients), key=lambda p: txt.index(p["patient_id"] + " "))
    ranks = [{"severe": 0, "mildly_normal": 1, "error": 2}[p["decision"]] for p in order]
    assert ranks == sorted(ranks), [(p["patient_id"], p["decision"]) for p in order]
    for p in res.patients:
        if p["score"] is not None:
            assert f"{p['score']:.3f}" in txt


def test_pdftoppm_renders(synth, tmp_path):
    if shutil.which("pdftoppm") is None:
        pytest.skip("pdftoppm (poppler-utils) not installed")
    from PIL import Image

    for name in (f"{NON_ASCII_ID}.pdf", "summary.pdf"):
        prefix = tmp_path / Path(name).stem
        subprocess.run(["pdftoppm", "-png", "-r", "30", str(synth["out"] / "reports" / name), str(prefix)],
                       check=True, capture_output=True, timeout=60)
        pngs = sorted(tmp_path.glob(f"{Path(name).stem}*.png"))
        assert pngs
        im = np.asarray(Image.open(pngs[0]).convert("L"))
        assert im.std() > 5  # not a blank page


# --------------------------------------------------------------------------- options and errors

def test_subset_letter_config_and_exam_date(synth, tmp_path):
    out = synth["out"]
    cfg = tmp_path / "report.toml"
    cfg.write_text('clinic = "Hôpital de Test"\n[next_step]\nsevere = "Call the colposcopy unit today."\n'
                   'mildly_normal = "Re-screen in 3 years."\n', encoding="utf-8")
    from cervscan.report import write_reports

    paths = write_reports(out, patients=["P003"], page_size="letter", config_file=cfg, exam_date="2024-03-05")
    assert [p.name for p in paths] == ["P003.pdf", "summary.pdf"]
    page = _pages(paths[0])[0]
    assert [round(float(v)) for v in page.mediabox[2:]] == [612, 792]
    txt = _flat(_text(paths[0]))
    assert "Hôpital de Test" in txt and "2024-03-05" in txt
    step = {"severe": "Call the colposcopy unit today.", "mildly_normal": "Re-screen in 3 years."}
    assert step[_patient(synth["res"], "P003")["decision"]] in txt
    # the option wins over the config file
    write_reports(out, patients=["P003"], clinic="Option Clinic", config_file=cfg)
    assert "Option Clinic" in _text(paths[0])
    # restore the A4 report with the default clinic for the other tests
    write_reports(out, patients=["P003"], clinic=CLINIC)


def test_errors_not_output_unknown_patient_bad_page(synth, tmp_path):
    from cervscan.report import write_reports

    with pytest.raises(CervscanError, match="not a cervscan screen output folder"):
        write_reports(tmp_path)
    with pytest.raises(CervscanError, match="not a folder"):
        write_reports(tmp_path / "nope")
    with pytest.raises(CervscanError, match="unknown patient.*nobody"):
        write_reports(synth["out"], patients=["nobody"])
    with pytest.raises(CervscanError, match="page size"):
        write_reports(synth["out"], page_size="a3")


def test_report_without_classifier_file(synth, tmp_path):
    from cervscan.report import write_reports

    out = tmp_path / "copy"
    shutil.copytree(synth["out"], out, ignore=shutil.ignore_patterns("heatmaps", "reports"))
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    run["models"]["classifier"]["path"] = str(tmp_path / "gone.pt")
    run["models"]["classifier"]["operating_point"] = None
    (out / "run.json").write_text(json.dumps(run), encoding="utf-8")
    paths = write_reports(out, patients=["P003"])
    txt = _flat(_text(paths[0]))
    assert "Heatmaps unavailable" in txt and "gone.pt" in txt
    assert "not available" in txt  # sensitivity/specificity without an operating point
    assert sum(len(p.images) for p in _pages(paths[0])) == 2  # original + overlay
    assert not (out / "heatmaps").exists()


# --------------------------------------------------------------------------- real images

@pytest.mark.data
def test_real_images_report(real):
    out, res = real["out"], real["res"]
    assert {p.name for p in real["paths"]} == {"iarc-AAAW.pdf", "annocerv-C1.pdf", "summary.pdf"}
    for p in res.patients:
        pdf = out / "reports" / f"{p['patient_id']}.pdf"
        txt = _flat(_text(pdf))
        assert p["patient_id"] in txt and f"Score {p['score']:.3f}" in txt
        # original, overlay and heatmap per image used; no heatmap of an image the quality gate left out
        n_out = p["n_used"] - p["n_eligible"]
        assert sum(len(pg.images) for pg in _pages(pdf)) == 3 * p["n_eligible"] + 2 * n_out
    summary = _flat(_text(out / "reports" / "summary.pdf"))
    assert "iarc-AAAW" in summary and "annocerv-C1" in summary and "2 patient(s)" in summary
    # a heatmap for every image used for the decision (AAAW4, Lugol's iodine, has strong glare: left out)
    for r in res.images:
        assert (out / "heatmaps" / r["patient_id"] / f"{Path(r['image']).stem}.jpg").is_file() == r["eligible"]


# --------------------------------------------------------------------------- Grad-CAM

@pytest.fixture(scope="module")
def repvgg():
    from cervscan.models.networks import build_classifier, to_deploy

    torch.manual_seed(0)
    train = build_classifier("repvgg_a0").eval()
    return train, to_deploy(train)


def test_grad_cam_shape_range_and_layer(repvgg):
    from cervscan.report.gradcam import find_target_layer, grad_cam

    x = torch.randn(1, 3, 64, 80)
    for model in repvgg:
        layer = find_target_layer(model, (64, 80))
        feats = []
        h = layer.register_forward_hook(lambda m, i, o: feats.append(o))
        with torch.no_grad():
            model(x)
        h.remove()
        assert feats[0].dim() == 4
        with torch.inference_mode():  # must work from inside inference code
            cam = grad_cam(model, x, class_idx=1)
        assert cam.shape == (64, 80) and cam.dtype == np.float32
        assert 0.0 <= cam.min() and cam.max() <= 1.0
        assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_grad_cam_matches_forward_features_split(repvgg):
    """Hooking the found layer equals Grad-CAM on timm's forward_features output, for the deploy form."""
    import torch.nn.functional as F

    from cervscan.report.gradcam import grad_cam

    model = repvgg[1]
    x = torch.randn(1, 3, 64, 64)
    cam = grad_cam(model, x, class_idx=1)
    f = model.forward_features(x)
    f.retain_grad()
    model.forward_head(f)[0, 1].backward()
    model.zero_grad(set_to_none=True)
    ref = torch.relu((f.grad[0].mean((1, 2))[:, None, None] * f[0]).sum(0)).detach()
    ref = F.interpolate(ref[None, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0].numpy()
    ref = ref / ref.max() if ref.max() > 0 else ref
    np.testing.assert_allclose(cam, ref, atol=1e-5)


def test_heatmap_overlay_shape():
    from cervscan.report.gradcam import heatmap_overlay

    rgb = np.full((50, 70, 3), 128, np.uint8)
    out = heatmap_overlay(rgb, np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert not np.array_equal(out[0, 0], out[-1, -1])


def test_report_file_names_stay_inside_reports():
    from cervscan.report.filenames import _file_name

    assert _file_name(NON_ASCII_ID) == NON_ASCII_ID
    assert "/" not in _file_name("../x") and not _file_name("../x").startswith(".")
    assert _file_name("summary") != "summary"  # never overwrites the run summary


def test_scores_next_to_the_threshold_get_enough_decimals():
    from cervscan.report.wording import _caption, _score_digits

    assert _score_digits(0.2, 0.435) == 3
    assert _score_digits(0.43491, 0.43477) == 4  # both would print 0.435
    assert _score_digits(0.435, 0.435) == 3  # equal: nothing to tell apart
    assert _score_digits(0.7, None) == 3
    cap = _caption({"image": "a.jpg", "score": "0.43491", "threshold": "0.43477", "decision": "mildly_normal"})
    assert "image score 0.4349 (threshold 0.4348)" in cap
    assert "image score 0.200 →" in _caption({"image": "a.jpg", "score": "0.2", "threshold": "0.435",
                                              "decision": "mildly_normal"})


# --------------------------------------------------------------------------- cervix crop, exam stage, four models

CERVIX_RGB = (200, 60, 70)


def _cervix_image(rng: np.random.Generator, h: int, w: int, centre: tuple[int, int] | None, r: int = 24) -> np.ndarray:
    """Grey textured frame; with ``centre``, a red 'cervix' disc there holding a whitish 'lesion'."""
    import cv2

    img = np.clip(110 + rng.normal(0, 6, (h, w, 1)), 0, 255).astype(np.uint8).repeat(3, axis=2)
    if centre is not None:
        cv2.circle(img, centre, r, CERVIX_RGB, -1)
        cv2.ellipse(img, centre, (r // 3, r // 4), 30, 0, 360, (235, 225, 225), -1)
    return img


def _red_disc_finder(original):
    """Pipeline._segment whose cervix masks are the red discs drawn by _cervix_image.

    The tiny cervix finder still runs (and is recorded in run.json), but a random
    network marks ~95% of every frame as cervix, so the crop would always be the
    whole frame; this stand-in tells the tests exactly where the cervix is."""

    def segment(self, role, images, threshold):
        masks = original(self, role, images, threshold)
        if role != "cervix":
            return masks
        out = []
        for im in images:
            r, g, b = (im[..., k].astype(int) for k in range(3))
            out.append(((r > 160) & (g < 110) & (b < 120)).astype(np.uint8))
        return out

    return segment


@pytest.fixture(scope="module")
def cropped(tiny_models, tmp_path_factory) -> dict:
    """Screen (crop 'cervix', all four tiny models) + reports: P010 with two images whose cervix
    is found off-centre, P011 with one image without a cervix (centre crop)."""
    from cervscan import api
    from cervscan.pipeline.steps import Pipeline
    from cervscan.report import write_reports

    root = tmp_path_factory.mktemp("cropped")
    visits = root / "visits"
    rng = np.random.default_rng(5)
    _write(visits / "P010" / "cx1.png", _cervix_image(rng, 96, 128, (40, 45)))
    _write(visits / "P010" / "cx2.png", _cervix_image(rng, 120, 100, (62, 80), r=20))
    _write(visits / "P011" / "nocx.png", _cervix_image(rng, 90, 120, None))
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Pipeline, "_segment", _red_disc_finder(Pipeline._segment))
        res = api.screen([visits], out, seg_model=str(tiny_models["seg"]), cls_model=str(tiny_models["cls"]),
                         cervix_model=str(tiny_models["cervix"]), stage_model=str(tiny_models["stage"]),
                         overrides={"crop": "cervix"}, device="cpu", num_workers=0, threads=1)
    return {"out": out, "res": res, "paths": write_reports(out)}


def test_cropped_screen_has_the_new_columns(cropped):
    from conftest import read_csv

    rows = {r["image"]: r for r in read_csv(cropped["out"] / "images.csv")}
    assert rows["cx1.png"]["cervix_found"] == "True" and rows["nocx.png"]["cervix_found"] == "False"
    assert rows["cx1.png"]["crop_box"] and rows["cx1.png"]["crop_box"] != "0 0 128 96"  # a real crop
    assert all(r["stage"] for r in rows.values())
    assert set(cropped["res"].run["models"]) == {"stage", "cervix", "segmenter", "classifier"}
    assert cropped["res"].run["config"]["crop"] == "cervix"


def test_cropped_report_states_stage_cervix_and_all_models(cropped):
    from cervscan.pipeline.quality import STAGE_WORDS

    out, res = cropped["out"], cropped["res"]
    names = {"tiny-stage", "tiny-cervix", "tiny-seg", "tiny-cls"}
    for p in res.patients:
        txt = _flat(_text(out / "reports" / f"{p['patient_id']}.pdf"))
        for label in ("Exam-stage model", "Cervix finder", "Lesion segmenter", "Classifier"):
            assert label in txt
        for role, info in res.run["models"].items():
            assert f"{info['name']}@test" in txt and info["sha256"][:12] in txt, role
        assert {n for n in names if f"{n}@test" in txt} == names
        # score, threshold, model version and the disclaimer are still there
        assert f"Score {p['score']:.3f}" in txt and f"threshold {p['threshold']:.3f}" in txt
        assert "does not replace the clinician's judgement" in txt
        # exam stage of each image, with its confidence, and of the patient
        for r in (r for r in res.images if r["patient_id"] == p["patient_id"]):
            assert f"{STAGE_WORDS[r['stage']]} ({r['stage_confidence']:.2f})" in txt
        n, stage = p["stages"].split(";")[0].split(":")[::-1]
        assert f"exam stage: {n} {STAGE_WORDS[stage]}" in txt
        # the legend of the overlay and the heatmap
        assert "blue = cervix outline and crop" in txt and "green = lesion" in txt
        assert "Grad-CAM of the classifier on the crop it classified" in txt
    found = _flat(_text(out / "reports" / "P010.pdf"))
    assert "cervix found" in found and "% of the cervix" in found and "cervix not found" not in found
    lost = _flat(_text(out / "reports" / "P011.pdf"))
    assert "cervix not found: centre crop used" in lost
    assert "cervix not found in 1 image(s)" in lost and "% of the centre crop" in lost
    summary = _flat(_text(out / "reports" / "summary.pdf"))
    assert {n for n in names if f"{n}@test" in summary} == names
    assert "Exam-stage model" in summary and "Cervix finder" in summary
    assert "cervix not found in 1 image(s)" in summary


def test_grad_cam_input_is_the_crop(cropped, monkeypatch):
    """The heatmap explains what the classifier saw: its input is the crop, as Pipeline.prepare builds it."""
    import cervscan.report.gradcam
    from cervscan.files import read_image
    from cervscan.models.networks import read_checkpoint
    from cervscan.pipeline.steps import centre_box, crop_to_box, parse_box, resize_square
    from cervscan.report import write_heatmaps
    from cervscan.pipeline.transforms import to_tensor_batch

    seen = []

    def fake_grad_cam(model, x, class_idx=1, layer=None):
        seen.append(x.detach().clone())
        return np.linspace(0, 1, x.shape[-2] * x.shape[-1], dtype=np.float32).reshape(x.shape[-2:])

    monkeypatch.setattr(cervscan.report.gradcam, "grad_cam", fake_grad_cam)
    out, res = cropped["out"], cropped["res"]
    ck = read_checkpoint(res.run["models"]["classifier"]["path"])
    S = int(ck["input_size"][0])
    made = write_heatmaps(out)
    rows = [r for r in res.images if r["status"] == "ok"]
    assert len(seen) == len(rows) == 3
    for x, r in zip(seen, rows):
        rgb = read_image(r["path"], max_side=res.run["config"]["max_side"]).rgb
        box = parse_box(r["crop_box"])
        assert box != (0, 0, rgb.shape[1], rgb.shape[0])
        if not r["cervix_found"]:
            assert box == centre_box(rgb.shape[1], rgb.shape[0], res.run["config"]["centre_crop"])
        want = to_tensor_batch([resize_square(crop_to_box(rgb, box), S)], ck["mean"], ck["std"])
        assert tuple(x.shape) == (1, 3, S, S)
        torch.testing.assert_close(x, want, rtol=0, atol=1e-6)
        # not the whole frame
        frame = to_tensor_batch([resize_square(rgb, S)], ck["mean"], ck["std"])
        assert not torch.allclose(x, frame, atol=1e-3)
        # the heatmap is pasted back into the frame at the box
        hm = made[(r["patient_id"], r["image"])]
        assert isinstance(hm, Path) and read_image(hm).rgb.shape[:2] == rgb.shape[:2]


@pytest.mark.parametrize("view", ["crop", "frame"])
def test_heatmap_input_is_what_screening_classifies(cropped, tiny_models, monkeypatch, view):
    """One definition of what the classifier sees: for the same image, the heatmap's input tensor equals
    the tensor that the screening pipeline feeds its classifier for the image's original view
    (Pipeline.prepare, then Pipeline.classify through the runner), for a crop and a whole-frame view."""
    from cervscan.files import read_image
    from cervscan.pipeline.steps import Pipeline, parse_box
    from cervscan.report.heatmaps import HeatmapMaker

    monkeypatch.setattr(Pipeline, "_segment", _red_disc_finder(Pipeline._segment))
    pipe = Pipeline.from_config(seg_model=str(tiny_models["seg"]), cls_model=str(tiny_models["cls"]),
                                cervix_model=str(tiny_models["cervix"]), stage_model=str(tiny_models["stage"]),
                                overrides={"crop": "cervix", "classify_view": view}, device="cpu")
    assert pipe.cfg.classify_view == view
    fed = []
    hook = pipe.models["classifier"].net.register_forward_pre_hook(lambda mod, args: fed.append(args[0].clone()))
    run = cropped["res"].run
    maker = HeatmapMaker({**run, "config": {**run["config"], "classify_view": view}})
    rows = [r for r in cropped["res"].images if r["status"] == "ok"]
    try:
        for r in rows:
            rgb = read_image(r["path"], max_side=run["config"]["max_side"]).rgb
            prepared = pipe.prepare([rgb])[0]
            assert prepared.crop_box == parse_box(r["crop_box"])  # the same crop as the screen
            fed.clear()
            pipe.classify([prepared.original])
            assert len(fed) == 1
            torch.testing.assert_close(maker.input_tensor(rgb, parse_box(r["crop_box"])), fed[0], rtol=0, atol=0)
    finally:
        hook.remove()


def test_heatmap_is_pasted_back_at_the_box(cropped, monkeypatch):
    import cervscan.report.gradcam
    from cervscan.files import read_image
    from cervscan.pipeline.steps import parse_box
    from cervscan.report.heatmaps import HeatmapMaker

    maker = HeatmapMaker(cropped["res"].run)
    assert maker.available
    r = next(r for r in cropped["res"].images if r["image"] == "cx1.png")
    rgb = read_image(r["path"]).rgb
    x0, y0, x1, y1 = box = parse_box(r["crop_box"])
    monkeypatch.setattr(cervscan.report.gradcam, "grad_cam", lambda m, x, class_idx=1, layer=None:
                        np.ones(x.shape[-2:], np.float32))  # all red
    out = maker.overlay(rgb, box)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    inside = out[y0 + 3:y1 - 3, x0 + 3:x1 - 3].reshape(-1, 3).astype(int)
    assert (inside[:, 0] > inside[:, 2] + 40).all()  # heat (jet red) inside the crop
    outside = np.ones(rgb.shape[:2], bool)
    outside[max(0, y0 - 3):y1 + 3, max(0, x0 - 3):x1 + 3] = False
    assert outside.any()
    o = out[outside].astype(int)
    assert (o[:, 0] == o[:, 1]).all() and (o[:, 1] == o[:, 2]).all()  # greyed: the classifier did not see it
    # a box that does not fit the image (image replaced since the screen) is refused, not misread
    with pytest.raises(CervscanError, match="does not fit"):
        maker.overlay(rgb, (0, 0, rgb.shape[1] + 10, rgb.shape[0]))


def test_older_output_without_new_columns_still_renders(cropped, tmp_path, monkeypatch):
    """An output folder of an earlier cervscan (no stage/cervix columns or roles, no crop) renders
    as before: whole-frame Grad-CAM, 'of the image', two model lines."""
    import csv

    import cervscan.report.gradcam
    from conftest import read_csv
    from cervscan.files import read_image
    from cervscan.models.networks import read_checkpoint
    from cervscan.pipeline.steps import resize_square
    from cervscan.report import write_reports
    from cervscan.pipeline.transforms import to_tensor_batch

    new_img = {"stage", "stage_confidence", "cervix_found", "cervix_fraction", "crop_box", "cervix_mask",
               "stage_model", "cervix_model", "eligible", "reason", "overexposed", "glare", "cervix_px"}
    new_pat = {"n_no_cervix", "stages", "stage_model", "cervix_model", "n_eligible", "reason"}
    out = tmp_path / "old"
    shutil.copytree(cropped["out"], out, ignore=shutil.ignore_patterns("heatmaps", "reports", "cervix"))
    for name, drop in (("images.csv", new_img), ("patients.csv", new_pat)):
        rows = read_csv(out / name)
        cols = [c for c in rows[0] if c not in drop]
        with open(out / name, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    for role in ("stage", "cervix"):
        run["models"].pop(role)
    for key in ("crop", "cervix_margin", "cervix_min_fraction", "centre_crop"):
        run["config"].pop(key)
    (out / "run.json").write_text(json.dumps(run), encoding="utf-8")

    seen = []

    def fake_grad_cam(model, x, class_idx=1, layer=None):
        seen.append(x.detach().clone())
        return np.zeros(x.shape[-2:], np.float32)

    monkeypatch.setattr(cervscan.report.gradcam, "grad_cam", fake_grad_cam)
    paths = write_reports(out, patients=["P011"])
    txt = _flat(_text(paths[0]))
    assert "P011" in txt and "Score" in txt and "does not replace the clinician's judgement" in txt
    assert "Lesion segmenter" in txt and "Classifier" in txt and "tiny-seg@test" in txt and "tiny-cls@test" in txt
    assert "Exam-stage model" not in txt and "Cervix finder" not in txt
    assert "cervix not found" not in txt and "exam stage" not in txt and "blue = cervix" not in txt
    assert "% of the image" in txt and "Grad-CAM of the classifier on the original image" in txt
    ck = read_checkpoint(run["models"]["classifier"]["path"])
    S = int(ck["input_size"][0])
    r = next(r for r in cropped["res"].images if r["patient_id"] == "P011")
    rgb = read_image(r["path"]).rgb
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], to_tensor_batch([resize_square(rgb, S)], ck["mean"], ck["std"]),
                               rtol=0, atol=1e-6)


def test_stage_and_cervix_words():
    from cervscan.report.wording import _caption, _model_rows, _stage_summary

    assert _stage_summary({"stages": "acetic:3;lugol:1"}, []) == "3 acetic acid, 1 Lugol's iodine"
    assert _stage_summary({}, [{"stage": "green"}, {"stage": "acetic"}, {"stage": "green"}, {"stage": ""}]) \
        == "2 green filter, 1 acetic acid"
    assert _stage_summary({"stages": ""}, [{}]) == ""
    cap = _caption({"image": "a.jpg", "stage": "acetic", "stage_confidence": "0.9712", "cervix_found": "False",
                    "lesion_fraction": "0.1234", "empty_mask": "False", "score": "0.7", "threshold": "0.5",
                    "decision": "severe"}, "cervix")
    assert "acetic acid (0.97)" in cap and "cervix not found: centre crop used" in cap
    assert "lesion area 12.3% of the centre crop" in cap and "image score 0.700" in cap
    cap = _caption({"image": "a.jpg", "cervix_found": "True", "cervix_fraction": "0.4", "lesion_fraction": "0.05"},
                   "cervix")
    assert "cervix found (40% of the image)" in cap and "lesion area 5.0% of the cervix" in cap
    assert "lesion area 5.0% of the image" in _caption({"image": "a.jpg", "lesion_fraction": "0.05"})
    assert "of the centre crop" in _caption({"image": "a.jpg", "lesion_fraction": "0.05", "cervix_found": ""},
                                            "centre")
    rows = _model_rows({"models": {"classifier": {"name": "c", "version": "1", "sha256": "ab" * 32},
                                   "stage": {"name": "s", "version": "2"}, "segmenter": {"name": "l"}}})
    assert [k for k, _ in rows] == ["Exam-stage model", "Lesion segmenter", "Classifier"]
    assert rows[2][1].startswith("c@1") and "sha256 abababababab" in rows[2][1]


def test_frame_view_heatmap_covers_the_whole_image(cropped, monkeypatch):
    """A classifier whose original view is the whole image (checkpoint ``classify_view`` "frame", as weights
    2.0.0): Grad-CAM's input is the whole frame even when the row has a crop box, and nothing is greyed."""
    import cervscan.report.gradcam
    from cervscan.files import read_image
    from cervscan.pipeline.steps import parse_box, resize_square
    from cervscan.report.heatmaps import HeatmapMaker
    from cervscan.pipeline.transforms import to_tensor_batch

    run = cropped["res"].run
    assert HeatmapMaker(run).available and not HeatmapMaker(run).frame_view
    maker = HeatmapMaker({**run, "config": {**run["config"], "classify_view": "frame"}})
    assert maker.frame_view
    seen = []

    def fake(m, x, class_idx=1, layer=None):
        seen.append(x.detach().clone())
        return np.ones(x.shape[-2:], np.float32)  # all red

    monkeypatch.setattr(cervscan.report.gradcam, "grad_cam", fake)
    r = next(r for r in cropped["res"].images if r["image"] == "cx1.png")
    rgb = read_image(r["path"]).rgb
    box = parse_box(r["crop_box"])
    assert box != (0, 0, rgb.shape[1], rgb.shape[0])
    out = maker.overlay(rgb, box)
    ck = maker.model.ckpt
    want = to_tensor_batch([resize_square(rgb, int(ck["input_size"][0]))], ck["mean"], ck["std"])
    torch.testing.assert_close(seen[0], want, rtol=0, atol=1e-6)
    px = out[3:-3, 3:-3].reshape(-1, 3).astype(int)
    assert (px[:, 0] > px[:, 2] + 40).all()  # heat everywhere, no greyed margin
