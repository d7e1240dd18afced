"""Grad-CAM heatmaps for the reports, and the screened images they are made of.

Heatmaps are computed here (CPU) and saved as ``OUT/heatmaps/<patient>/<stem>.jpg``; if the classifier file
is gone or changed, the report still builds and says heatmaps are unavailable.

Grad-CAM explains what the classifier saw: when the image row has a ``crop_box`` (the cervix crop, or the
centre crop when no cervix was found), the classifier input is the crop squashed to its input size, built
by the pipeline's own :func:`cervscan.pipeline.steps.classifier_views`; the heatmap is pasted back into the
frame at the box (outside greyed, the box framed in white) so that it lines up with the original and the
lesion overlay. Rows without ``crop_box`` (older outputs) get the heatmap of the whole frame.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from cervscan.config import VotingConfig
from cervscan.errors import CervscanError
from cervscan.files import atomic_write_image, output_stems, read_image
from cervscan.models.loading import LoadedModel, load_model
from cervscan.models.registry import sha256_file
from cervscan.pipeline.steps import classifier_views, crop_to_box, parse_box
from cervscan.pipeline.transforms import resize_square, to_tensor_batch
from cervscan.report.filenames import _file_names, _safe_stem
from cervscan.report.tables import ScreenOutput, load_screen_output
from cervscan.report.wording import _short_error

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- original images

def _original_path(row: dict) -> Path | None:
    """The screened image of an images.csv row on disk (its ``path`` column), or None when it is gone."""
    p = (row.get("path") or "").strip()
    return Path(p) if p and Path(p).is_file() else None


def _stems(rows: list[dict]) -> dict[str, str]:
    """File stem of each image's mask/overlay/heatmap: the one ``screen`` wrote, else
    the same naming rule (``cervscan.files.output_stems``) when masks were not written."""
    fallback = output_stems([r.get("image", "") for r in rows])
    out = {}
    for r in rows:
        rel = r.get("overlay") or r.get("mask")
        out[r.get("image", "")] = Path(rel).stem if rel else fallback[r.get("image", "")]
    return out


def _exam_date_from_files(paths: Iterable[Path]) -> str | None:
    days = set()
    for p in paths:
        try:
            days.add(_dt.date.fromtimestamp(p.stat().st_mtime))
        except OSError:
            continue
    if not days:
        return None
    lo, hi = min(days), max(days)
    s = lo.isoformat() if lo == hi else f"{lo.isoformat()} – {hi.isoformat()}"
    return f"{s} (image file date)"


# --------------------------------------------------------------------------- heatmaps

class HeatmapMaker:
    """Grad-CAM of the run's classifier on CPU, loaded once; ``reason`` says why not when unavailable.

    The classifier is loaded as screening loads it (:func:`cervscan.models.loading.load_model`) and
    its input is built by the pipeline's own functions (:meth:`input_tensor`), so the heatmap explains
    exactly what was classified."""

    def __init__(self, run: dict):
        self.model: LoadedModel | None = None
        self.reason: str | None = None
        #: the classifier's original view: "crop", or "frame" (the whole image), as the screen resolved it
        self.view = "crop"
        try:
            self.model = _load_classifier(run)
        except CervscanError as e:
            self.reason = str(e)
        except Exception as e:  # noqa: BLE001 - a report must still build without heatmaps
            self.reason = f"classifier could not be loaded ({type(e).__name__}: {e})"
        if self.reason:
            log.warning("heatmaps unavailable: %s", self.reason)
        else:
            recorded = (run.get("config") or {}).get("classify_view") or self.model.ckpt.get("classify_view")
            self.view = "frame" if recorded == "frame" else "crop"

    @property
    def available(self) -> bool:
        return self.model is not None

    @property
    def frame_view(self) -> bool:
        """The classifier's original view is the whole image (``classify_view`` "frame")."""
        return self.view == "frame"

    def input_tensor(self, rgb: np.ndarray, box: tuple[int, int, int, int] | None = None):
        """The classifier's input for an image: the original view that :meth:`cervscan.pipeline.steps.Pipeline.prepare`
        builds (:func:`cervscan.pipeline.steps.classifier_views` of the crop ``box``, in the decoded image's
        pixels; the whole frame when None), resized and normalised as the pipeline's runner feeds it to the
        network."""
        assert self.model is not None
        m = self.model
        crop = rgb if box is None or self.frame_view else crop_to_box(rgb, _check_box(box, rgb))
        no_lesion = np.zeros(crop.shape[:2], np.uint8)  # the segmented view is not explained
        original, _, _ = classifier_views(rgb, crop, no_lesion, m.size[0], VotingConfig(), self.view)
        return to_tensor_batch([resize_square(original, m.size)], m.ckpt["mean"], m.ckpt["std"])

    def cam(self, rgb: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Grad-CAM (class 'severe') of the classifier's input (the crop ``box`` of ``rgb``, else the
        whole frame), at the classifier's input size, values in [0, 1]."""
        import cervscan.report.gradcam as gradcam  # lazy: torch

        assert self.model is not None
        return gradcam.grad_cam(self.model.net, self.input_tensor(rgb, box), class_idx=1)

    def overlay(self, rgb: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """The heatmap blended onto what the classifier saw, at the frame's size.

        Without ``box`` (older outputs) the heatmap covers the whole frame. With a crop box it covers
        the crop, pasted back into the frame at the box, so that it lines up with the original and
        the lesion overlay; outside the crop (never seen by the classifier) the frame is greyed and the
        crop is framed in white."""
        import cervscan.report.gradcam as gradcam  # lazy: torch

        cam = self.cam(rgb, box)
        if box is None or self.frame_view:
            return gradcam.heatmap_overlay(rgb, cam)
        x0, y0, x1, y1 = _check_box(box, rgb)
        h, w = rgb.shape[:2]
        blended = gradcam.heatmap_overlay(crop_to_box(rgb, (x0, y0, x1, y1)), cam)
        if (x0, y0, x1, y1) == (0, 0, w, h):
            return blended
        grey = cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        out = cv2.addWeighted(grey, 0.45, np.full_like(rgb, 200), 0.55, 0)
        out[y0:y1, x0:x1] = blended
        t = max(1, round(max(h, w) / 300))
        cv2.rectangle(out, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), (255, 255, 255), t, lineType=cv2.LINE_4)
        return out


def _load_classifier(run: dict) -> LoadedModel:
    """The classifier file run.json names, on CPU; CervscanError when it is gone, changed or not a classifier."""
    info = (run.get("models") or {}).get("classifier") or {}
    path = info.get("path")
    if not path:
        raise CervscanError("run.json does not name the classifier file")
    p = Path(path)
    if not p.is_file():
        raise CervscanError(f"classifier file {p} not found")
    want = info.get("sha256")
    if want:
        got = sha256_file(p)
        if got != want:
            raise CervscanError(f"classifier file {p} has changed since the screen "
                                f"(sha256 {got[:12]}, run used {want[:12]})")
    model = load_model("classifier", p, "cpu")
    model.net.eval()
    return model


def _row_box(r: dict) -> tuple[int, int, int, int] | None:
    """The crop box of an images.csv row (None for older outputs without the column, or an empty value)."""
    return parse_box(r.get("crop_box"))


def _check_box(box: tuple[int, int, int, int], rgb: np.ndarray) -> tuple[int, int, int, int]:
    """The box when it lies inside the decoded image; CervscanError otherwise (image changed since the screen)."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise CervscanError(f"crop box {x0} {y0} {x1} {y1} does not fit the {w}x{h} image "
                            "(image changed since the screen?)")
    return x0, y0, x1, y1


def _read_rgb(path: Path | None, max_side: int = 2048) -> tuple[np.ndarray | None, str | None]:
    if path is None:
        return None, "not found"
    try:
        return read_image(path, max_side=max_side).rgb, None
    except CervscanError as e:
        return None, _short_error(str(e), str(path))
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


def write_heatmaps(out: str | Path, patients: list[str] | None = None) -> dict[tuple[str, str], Path | str]:
    """Compute Grad-CAM heatmaps for the screened images of an output folder.

    Writes ``OUT/heatmaps/<patient>/<stem>.jpg`` and returns, per
    (patient_id, image), the written path or the reason none was made. This
    is the hook for a ``--heatmaps`` option of ``screen``; reports call it
    implicitly.
    """
    so = load_screen_output(out)
    wanted = set(patients) if patients else None
    maker = HeatmapMaker(so.run)
    max_side = int((so.run.get("config") or {}).get("max_side") or 2048)
    result: dict[tuple[str, str], Path | str] = {}
    by_pid: dict[str, list[dict]] = {}
    for r in so.images:
        by_pid.setdefault(r.get("patient_id", ""), []).append(r)
    names = _file_names(p.get("patient_id", "") for p in so.patients)
    for pid, rows in by_pid.items():
        if wanted is not None and pid not in wanted:
            continue
        stems = _stems(rows)
        for r in rows:
            key = (pid, r.get("image", ""))
            if r.get("status") != "ok":
                result[key] = "image could not be used"
                continue
            if not maker.available:
                result[key] = f"unavailable: {maker.reason}"
                continue
            rgb, why = _read_rgb(_original_path(r), max_side)
            if rgb is None:
                result[key] = f"original image {why}"
                continue
            try:
                blended = maker.overlay(rgb, _row_box(r))
            except CervscanError as e:
                result[key] = f"not computed: {e}"
                continue
            try:
                result[key] = _save_heatmap(so, names[pid], stems[key[1]], blended)
            except (OSError, CervscanError) as e:
                result[key] = f"not saved: {e.strerror or e}"
    return result


def _keep_heatmap(so: ScreenOutput, folder: str, stem: str, blended: np.ndarray) -> None:
    """Save a heatmap that a report shows; when its file cannot be written (or a file cervscan did not
    create is in its place) the report still shows it."""
    try:
        _save_heatmap(so, folder, stem, blended)
    except (OSError, CervscanError) as e:
        log.warning("%s: heatmap file not saved (%s); the report shows the heatmap",
                    so.out / "heatmaps" / folder / f"{_safe_stem(stem)}.jpg", getattr(e, "strerror", None) or e)


def _save_heatmap(so: ScreenOutput, folder: str, stem: str, blended: np.ndarray) -> Path:
    """Write ``OUT/heatmaps/<folder>/<stem>.jpg`` (``folder``: the patient's :func:`_file_names` name),
    claimed in the output ledger first, so that a file cervscan did not create is never replaced."""
    rel = Path("heatmaps") / folder / f"{_safe_stem(stem)}.jpg"
    if so.ledger is not None:
        so.ledger.claim([rel])
    return atomic_write_image(so.out / rel, blended)
