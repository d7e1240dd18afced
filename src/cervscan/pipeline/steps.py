"""The screening pipeline: every per-image step, in order, and the per-patient decision.

One object, :class:`Pipeline`, owns the steps. ``screen``, ``evaluate``,
``train-cls`` (data preparation) and ``report`` (Grad-CAM input) all go
through it, so training cannot drift from screening::

    decode -> stage -> cervix -> crop -> lesion -> quality gate -> variants -> classify -> score
    (per image; eligible images only from 'variants' on)                   aggregate (per patient)

Where each step lives (a new step gets a method here and a call in
:meth:`Pipeline.process`):

- ``decode``: :func:`cervscan.files.read_image` (EXIF, colour modes, size guards);
- ``stage``: the exam-stage model (``stage`` role: acetic, lugol, green, saline, other), whole frame;
- ``cervix``: the cervix finder (``cervix`` role, a U-Net++), whole frame; largest connected
  component; :func:`cervix_box` turns it into the crop box, or the documented centre crop
  (:func:`centre_box`) when no cervix is found;
- ``crop``: the square box around the cervix plus a margin, clipped to the image;
- ``lesion``: the lesion segmenter (``segmenter`` role, a U-Net++) on the crop;
- ``quality`` / ``gate``: :func:`cervscan.pipeline.quality.measure` (sharpness at a fixed scale, exposure, glare
  inside the cervix, cervix size) and :func:`cervscan.pipeline.quality.gate` (eligible or not, and why; the exam
  stage under ``decision_stages``); ineligible images are kept with their measures but not classified;
- ``variants``: the study's segmented image (:func:`cervscan.pipeline.vote.segment_region`) and the
  six variants (:func:`cervscan.pipeline.vote.make_variants`) at the classifier's input size;
- ``classify`` / ``score``: one batched classifier pass, temperature, weighted vote;
- ``aggregate``: :meth:`Pipeline.aggregate` (mean of the eligible images' scores, threshold; ``inadequate``
  with a retake instruction when no image is eligible).

Writing files is not a step: :class:`cervscan.pipeline.outputs.OutputWriter` does it.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from cervscan import __version__
from cervscan.config import VARIANT_NAMES, ScreenConfig
from cervscan.errors import CervscanError, ImageError
from cervscan.files import read_image
from cervscan.models.loading import LoadedModel
from cervscan.pipeline import build
from cervscan.pipeline import quality as Q
from cervscan.pipeline.runners import TorchRunner, torch_device
from cervscan.pipeline.transforms import resize_square
from cervscan.pipeline.vote import (
    aggregate_patient,
    decide,
    make_variants,
    segment_region,
    weighted_score,
)

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ["patient_id", "image", "path", "status", "error", "width", "height",
                 "stage", "stage_confidence", "cervix_found", "cervix_fraction", "crop_box",
                 "lesion_fraction", "empty_mask", *[f"p_v{i}" for i in range(1, 7)], "score", "threshold", "decision",
                 "eligible", "reason", "sharpness", "brightness", "overexposed", "glare", "cervix_px", "quality_flags",
                 "mask", "cervix_mask", "overlay", "stage_model", "cervix_model", "seg_model", "cls_model"]
PATIENT_COLUMNS = ["patient_id", "decision", "score", "threshold", "n_images", "n_used", "n_eligible", "n_failed",
                   "n_empty_mask", "n_no_cervix", "stages", "quality", "reason", "error",
                   "stage_model", "cervix_model", "seg_model", "cls_model", "cervscan_version"]

# --------------------------------------------------------------------------- geometry (pure NumPy / OpenCV)

def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a binary mask (uint8 0/1)."""
    m = (mask > 0).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 2:
        return m
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return (lab == k).astype(np.uint8)


def square_box(x0: int, y0: int, x1: int, y1: int, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Square of side max(box w, box h) x (1 + 2 margin) centred on the box, clipped to the image."""
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    bx0, by0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    bx1, by1 = int(round(cx + side / 2)), int(round(cy + side / 2))
    bx0, by0, bx1, by1 = max(0, bx0), max(0, by0), min(width, bx1), min(height, by1)
    if bx1 - bx0 < 2 or by1 - by0 < 2:
        return 0, 0, width, height
    return bx0, by0, bx1, by1


def centre_box(width: int, height: int, fraction: float) -> tuple[int, int, int, int]:
    """Fallback crop when no cervix is found: the centred square whose side is ``fraction`` of the shorter side."""
    side = max(2, int(round(min(width, height) * fraction)))
    x0, y0 = (width - side) // 2, (height - side) // 2
    return x0, y0, x0 + side, y0 + side


def cervix_box(mask: np.ndarray, cfg: ScreenConfig) -> tuple[tuple[int, int, int, int], bool, float]:
    """Crop box, whether a cervix was found, and the cervix's fraction of the frame.

    The cervix is the largest connected component of the finder's mask; it counts as
    found when it covers at least ``cfg.cervix_min_fraction`` of the frame.
    """
    h, w = mask.shape[:2]
    frac = float((mask > 0).mean()) if mask.size else 0.0
    if frac < cfg.cervix_min_fraction:
        return centre_box(w, h, cfg.centre_crop), False, frac
    ys, xs = np.nonzero(mask)
    box = square_box(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1, cfg.cervix_margin, w, h)
    return box, True, frac


def crop_to_box(arr: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.ascontiguousarray(arr[y0:y1, x0:x1])


def paste_box(crop_mask: np.ndarray, box: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    out = np.zeros((height, width), np.uint8)
    x0, y0, x1, y1 = box
    out[y0:y1, x0:x1] = crop_mask
    return out


def classifier_views(image: np.ndarray, crop: np.ndarray, lesion: np.ndarray, size: int, voting,
                     view: str = "crop"):
    """The classifier's two input images at ``size``: the original view (the crop, or the whole ``image`` with
    ``view`` "frame") and the study's segmented image of the crop (:func:`cervscan.pipeline.vote.segment_region`
    with the crop's lesion mask). Returns (original, segmented, region)."""
    reg = segment_region(crop, lesion, voting)
    return resize_square(image if view == "frame" else crop, size), resize_square(reg.image, size), reg


def format_box(box: tuple[int, int, int, int] | None) -> str:
    return "" if box is None else " ".join(str(int(v)) for v in box)


def parse_box(text: str | None) -> tuple[int, int, int, int] | None:
    parts = (text or "").split()
    if len(parts) != 4:
        return None
    try:
        x0, y0, x1, y1 = (int(float(p)) for p in parts)
    except ValueError:
        return None
    return x0, y0, x1, y1


# --------------------------------------------------------------------------- per-image results

@dataclass
class Prepared:
    """What the classifier sees of one image, and how it was found (everything up to 'classify')."""

    original: np.ndarray  # S x S x 3 uint8: the cervix crop (the whole frame with classify_view "frame") at the classifier's input size
    segmented: np.ndarray  # S x S x 3 uint8: the study's segmented image of the crop
    empty_mask: bool
    lesion_fraction: float  # of the cervix (of the crop when no cervix was found)
    stage: str = ""
    stage_confidence: float | None = None
    cervix_found: bool | None = None  # None: no cervix finder in use
    cervix_fraction: float | None = None
    crop_box: tuple[int, int, int, int] | None = None
    lesion_mask: np.ndarray | None = None  # H x W uint8 0/1 at the decoded image's size
    cervix_mask: np.ndarray | None = None  # H x W uint8 0/1 (None without a cervix finder)


@dataclass
class ImageResult:
    record: dict
    rgb: np.ndarray | None = None
    prepared: Prepared | None = None


# --------------------------------------------------------------------------- the pipeline

class Pipeline:
    """Loaded models + configuration; see the module docstring for the steps."""

    def __init__(self, models: dict[str, LoadedModel], cfg: ScreenConfig, device=None):
        self.models = models
        self.cfg = cfg
        self.device = torch_device(device)
        #: role -> the runner every step calls its network through (:mod:`cervscan.pipeline.runners`)
        self.runners = {role: TorchRunner(m, self.device) for role, m in models.items()}

    # ---- construction
    @classmethod
    def from_config(cls, **options) -> "Pipeline":
        """The pipeline of resolved models and configuration (:func:`cervscan.pipeline.build.resolve`: model
        paths, ``site``, ``config_file``, ``overrides``, ``device``, ...); ``refs``, ``provenance``, ``site`` and
        ``load_seconds`` say where each model and setting came from and what loading took."""
        r = build.resolve(**options)
        pipe = cls(r.models, r.cfg, r.device)
        pipe.refs, pipe.provenance, pipe.load_seconds, pipe.site = r.refs, r.provenance, r.seconds, r.site
        return pipe

    def has(self, role: str) -> bool:
        return role in self.models

    @property
    def cls_size(self) -> int:
        return self.models["classifier"].size[0]

    @property
    def temperature(self) -> float:
        return float(self.models["classifier"].ckpt.get("temperature") or 1.0)

    def labels(self) -> dict[str, str]:
        return {role: m.label for role, m in self.models.items()}

    # ---- step: decode
    def decode(self, path: Path):
        c = self.cfg
        return read_image(path, max_side=c.max_side, max_pixels=c.max_pixels, min_side=c.min_side,
                          max_decode_mb=c.max_decode_mb)

    # ---- step: quality (measures; needs the cervix step's mask and crop box)
    def quality(self, rgb: np.ndarray, p: "Prepared | None" = None) -> dict:
        """Quality measures inside the cervix when one was found, else inside the crop box (the whole
        frame without ``p``); :func:`cervscan.pipeline.quality.measure`."""
        mask = p.cervix_mask if p is not None and p.cervix_found else None
        box = p.crop_box if p is not None else None
        return Q.measure(rgb, mask, box, side=self.cfg.gate.measure_side)

    # ---- step: gate
    def gate(self, q: dict, p: "Prepared | None" = None) -> list[str]:
        """Why the image is not eligible (empty list: eligible); :func:`cervscan.pipeline.quality.gate`. The cervix
        rules apply when a trained cervix finder ran, the stage rule when the stage model ran."""
        if p is None:
            return Q.gate(q, self.cfg.gate)
        ran_stage = self.has("stage") and bool(p.stage)
        return Q.gate(q, self.cfg.gate, stage=p.stage if ran_stage else "",
                      stage_confidence=p.stage_confidence if ran_stage else None,
                      cervix_found=p.cervix_found if self.trained_cervix_finder else None)

    @property
    def trained_cervix_finder(self) -> bool:
        """A cervix finder ran whose checkpoint records its training (every ``train-seg`` checkpoint does);
        only such a finder's verdict (no cervix, cervix too small) can make an image ineligible. A stand-in
        without one (random test or benchmark models) only crops."""
        m = self.models.get("cervix")
        return m is not None and self.cfg.crop == "cervix" and bool(m.ckpt.get("train_summary"))

    # ---- step: stage
    def stage(self, rgbs: list[np.ndarray]) -> list[tuple[str, float | None]]:
        if not self.has("stage"):
            return [("", None)] * len(rgbs)
        m = self.models["stage"]
        p = self.runners["stage"].probabilities(rgbs, activation="softmax")
        classes = list(m.ckpt["classes"])
        return [(classes[int(k)], float(pp[int(k)])) for pp, k in zip(p, p.argmax(1))]

    # ---- step: segmentation (cervix finder and lesion segmenter share it)
    def _segment(self, role: str, images: list[np.ndarray], threshold: float) -> list[np.ndarray]:
        """Binary masks (uint8 0/1) at each image's own size."""
        prob = self.runners[role].probabilities(images, activation="sigmoid")[:, 0]
        return [(cv2.resize(p, (im.shape[1], im.shape[0]), interpolation=cv2.INTER_LINEAR) > threshold).astype(np.uint8)
                for im, p in zip(images, prob)]

    # ---- step: cervix
    def cervix(self, rgbs: list[np.ndarray]) -> list[tuple[np.ndarray | None, tuple[int, int, int, int], bool | None, float | None]]:
        """(cervix mask, crop box, found, fraction) per image.

        ``cfg.crop``: ``cervix`` runs the finder (centre crop when it finds none); ``centre`` always
        takes the centre crop; ``frame`` keeps the whole image. The last two run no finder."""
        mode = self.cfg.crop
        if mode == "frame":
            return [(None, (0, 0, im.shape[1], im.shape[0]), None, None) for im in rgbs]
        if mode == "centre":
            return [(None, centre_box(im.shape[1], im.shape[0], self.cfg.centre_crop), None, None) for im in rgbs]
        if not self.has("cervix"):
            raise CervscanError("crop 'cervix' needs a cervix finder model (or use crop 'centre' or 'frame')")
        thr = float(self.models["cervix"].ckpt.get("mask_threshold") or 0.5)
        out = []
        for im, m in zip(rgbs, self._segment("cervix", rgbs, thr)):
            m = largest_component(m)
            box, found, frac = cervix_box(m, self.cfg)
            out.append((m, box, found, frac))
        return out

    # ---- step: lesion
    def lesion(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        return self._segment("segmenter", crops, self.cfg.voting.mask_threshold)

    # ---- everything before 'classify'
    def prepare(self, rgbs: list[np.ndarray], size: int | None = None) -> list[Prepared]:
        """Stage, cervix, crop, lesion and the classifier's two input images (at ``size``, default the classifier's)."""
        S = int(size or self.cls_size)
        stages = self.stage(rgbs)
        cervices = self.cervix(rgbs)
        crops = [crop_to_box(im, box) for im, (_, box, _, _) in zip(rgbs, cervices)]
        lesions = self.lesion(crops)
        out = []
        for im, (st, conf), (cmask, box, found, cfrac), crop, lm in zip(rgbs, stages, cervices, crops, lesions):
            original, segmented, reg = classifier_views(im, crop, lm, S, self.cfg.voting, self.cfg.classify_view)
            area = float(crop_to_box(cmask, box).sum()) if found else float(lm.size)
            frac = min(1.0, float(lm.sum()) / area) if area else 0.0
            h, w = im.shape[:2]
            out.append(Prepared(original=original, segmented=segmented, empty_mask=reg.empty, lesion_fraction=frac,
                                stage=st, stage_confidence=conf, cervix_found=found, cervix_fraction=cfrac, crop_box=box,
                                lesion_mask=paste_box(lm, box, h, w), cervix_mask=cmask))
        return out

    # ---- steps: variants, classify, score
    def variants(self, p: Prepared) -> dict[str, np.ndarray]:
        return make_variants(p.original, p.segmented, self.cfg.voting)

    def classify(self, images: list[np.ndarray]) -> np.ndarray:
        """P(severe) (temperature-scaled) of each image, in forward passes of ``cfg.classify_batch`` images
        on a CPU (bounds peak memory), all at once on a GPU."""
        m = self.models["classifier"]
        if self.device.type != "cpu":
            n = max(1, len(images))
        elif self.cfg.classify_batch:
            n = max(1, int(self.cfg.classify_batch))
        else:  # bound the pixels per pass: six inputs at 160 px, one at 384 px
            n = max(1, (6 * 160 * 160) // (m.size[0] * m.size[1]))
        out = []
        runner = self.runners["classifier"]
        for i in range(0, len(images), n):
            out.append(runner.probabilities(images[i:i + n], activation="softmax", temperature=self.temperature)[:, 1])
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def score(self, p_severe: dict[str, float]) -> float:
        return weighted_score(p_severe, self.cfg.voting)

    # ---- one batch of decoded images, all steps
    def process(self, decoded: list[dict]) -> list[ImageResult]:
        """``decoded``: dicts with patient_id, path, rgb, width, height (from :meth:`iter_decoded`)."""
        rgbs = [d["rgb"] for d in decoded]
        prepared = self.prepare(rgbs)
        measures = [self.quality(im, p) for im, p in zip(rgbs, prepared)]
        reasons = [self.gate(q, p) for q, p in zip(measures, prepared)]
        all_vars, spans = [], []
        for p, why in zip(prepared, reasons):
            if why:  # not eligible: kept with its measures, not classified
                spans.append((len(all_vars), []))
                continue
            vs = self.variants(p)
            spans.append((len(all_vars), list(vs)))
            all_vars.extend(vs.values())
        probs = self.classify(all_vars) if all_vars else np.zeros(0, np.float32)
        thr = self.cfg.threshold
        out = []
        for d, p, (start, names), q, why in zip(decoded, prepared, spans, measures, reasons):
            pv = {n: float(probs[start + k]) for k, n in enumerate(names)}
            s = self.score(pv) if names else None
            rec = {
                "patient_id": d["patient_id"], "image": Path(d["path"]).name, "path": str(Path(d["path"]).resolve()),
                "status": "ok", "error": "", "width": d["width"], "height": d["height"],
                "stage": p.stage, "stage_confidence": p.stage_confidence,
                "cervix_found": p.cervix_found, "cervix_fraction": p.cervix_fraction, "crop_box": format_box(p.crop_box),
                "lesion_fraction": p.lesion_fraction, "empty_mask": p.empty_mask,
                **{f"p_v{i + 1}": pv.get(n) for i, n in enumerate(VARIANT_NAMES)},
                "score": s, "threshold": thr, "decision": decide(s, thr) if s is not None else "ineligible",
                "eligible": not why, "reason": ";".join(why),
                "sharpness": q["sharpness"], "brightness": q["brightness"], "overexposed": q["overexposed"],
                "glare": q["glare"], "cervix_px": q["cervix_px"],
                "quality_flags": ";".join(Q.problems(q, self.cfg.gate)),
            }
            out.append(ImageResult(rec, d["rgb"], p))
        return out

    @staticmethod
    def failed(d: dict, threshold: float) -> ImageResult:
        return ImageResult({"patient_id": d["patient_id"], "image": Path(d["path"]).name,
                            "path": str(Path(d["path"]).resolve()), "status": "error", "error": d["error"],
                            "threshold": threshold, "decision": "error"})

    # ---- many images: decode ahead, process in batches, results in input order
    def run(self, items: list[tuple[str, Path]]) -> Iterator[ImageResult]:
        """Yield one :class:`ImageResult` per (patient_id, path), in order; a bad file yields a failed record."""
        pending: list[dict] = []
        for d in iter_decoded(items, self.cfg, self.decode):
            if "error" in d:
                # keep order: finish what is pending first
                yield from self._flush(pending)
                yield self.failed(d, self.cfg.threshold)
                continue
            pending.append(d)
            if len(pending) >= self.cfg.batch_images:
                yield from self._flush(pending)
        yield from self._flush(pending)

    def _flush(self, pending: list[dict]) -> Iterator[ImageResult]:
        if not pending:
            return
        batch = list(pending)
        pending.clear()
        try:
            results = self.process(batch)
        except Exception:  # noqa: BLE001 - one image's failure must not end the run
            # again one by one, so that only the image that cannot be processed fails, with its reason
            results = []
            for d in batch:
                try:
                    results += self.process([d])
                except Exception as e:  # noqa: BLE001
                    log.exception("%s: processing failed", d["path"])
                    why = f"{Path(d['path'])}: processing failed ({type(e).__name__}: {e})"
                    results.append(self.failed({**d, "error": why}, self.cfg.threshold))
        yield from results

    # ---- per patient
    def aggregate(self, patient_id: str, results: list[dict], visit_error: str = "") -> dict:
        """Patient row from its image records: mean of the eligible images' scores against the threshold;
        ``inadequate`` (no score, a retake instruction in ``reason``) when images were screened but none is
        eligible; ``error`` when none could be screened."""
        thr = self.cfg.threshold
        ok = [r for r in results if r["status"] == "ok"]
        failed = [r for r in results if r["status"] != "ok"]
        eligible = [r for r in ok if is_eligible(r)]
        left_out = [r.get("reason") or "" for r in ok if not is_eligible(r)]
        score, decision = aggregate_patient([r["score"] for r in eligible], thr, self.cfg.voting.pooling)
        reason = Q.excluded_note(left_out)
        if ok and not eligible:
            decision, score = "inadequate", None
            reason = Q.patient_reason(left_out, self.cfg.gate.decision_stages)
        err = visit_error
        if not err and not ok:
            err = f"all {len(results)} image(s) failed: " + "; ".join(r["error"] for r in failed[:3])
        flags: dict[str, int] = {}
        for r in ok:
            for f in filter(None, (r.get("quality_flags") or "").split(";")):
                flags[f] = flags.get(f, 0) + 1
        stages: dict[str, int] = {}
        for r in ok:
            if r.get("stage"):
                stages[r["stage"]] = stages.get(r["stage"], 0) + 1
        quality = "ok" if not flags else ";".join(f"{k}:{n}/{len(ok)}" for k, n in sorted(flags.items()))
        labels = self.labels()
        return {
            "patient_id": patient_id, "decision": decision if not visit_error else "error", "score": score,
            "threshold": thr, "n_images": len(results), "n_used": len(ok), "n_eligible": len(eligible),
            "n_failed": len(failed),
            "n_empty_mask": sum(bool(r.get("empty_mask")) for r in ok),
            "n_no_cervix": sum(r.get("cervix_found") is False for r in ok),
            "stages": ";".join(f"{k}:{n}" for k, n in sorted(stages.items())),
            "quality": quality if ok else "", "reason": reason if not visit_error else "", "error": err,
            "stage_model": labels.get("stage", ""), "cervix_model": labels.get("cervix", ""),
            "seg_model": labels.get("segmenter", ""), "cls_model": labels.get("classifier", ""),
            "cervscan_version": __version__,
        }


def is_eligible(rec: dict) -> bool:
    """An image record counts towards the score unless the gate marked it ineligible (older records,
    without the column, count)."""
    v = rec.get("eligible")
    return not (v is False or str(v).strip().lower() in ("false", "0"))


# --------------------------------------------------------------------------- decoding ahead of the models

def iter_decoded(items: list[tuple[str, Path]], cfg: ScreenConfig, decode) -> Iterator[dict]:
    """Decoded images in input order, decoded ahead of the models.

    ``cfg.num_workers == 0`` (default): one background thread decodes up to 8
    images ahead (PIL and OpenCV release the GIL). ``> 0``: a torch DataLoader
    with that many worker processes.
    """
    if not items:
        return iter(())
    ds = _Decoder(items, decode)
    if cfg.num_workers > 0 and len(items) > 1:
        import torch  # lazy: torch, out of the model commands (api imports this module)

        dl = torch.utils.data.DataLoader(ds, batch_size=1, shuffle=False, num_workers=cfg.num_workers,
                                         collate_fn=_first, prefetch_factor=4, persistent_workers=False)
        return iter(dl)
    return _threaded(ds, lookahead=8)


def _first(batch):
    return batch[0]


class _Decoder:
    """(patient_id, path) -> decoded image dict or the error; never raises."""

    def __init__(self, items, decode):
        self.items = items
        self.decode = decode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        pid, path = self.items[i]
        rec = {"index": i, "patient_id": pid, "path": path}
        try:
            d = self.decode(path)
            rec.update(rgb=d.rgb, width=d.width, height=d.height, scale=d.scale)
        except ImageError as e:
            rec["error"] = str(e)
        except Exception as e:  # noqa: BLE001 - never let one file stop the batch
            rec["error"] = f"{path}: unexpected decoding error ({type(e).__name__}: {e})"
        return rec


def _threaded(ds: _Decoder, lookahead: int) -> Iterator[dict]:
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cervscan-decode") as ex:
        pending: deque = deque()
        nxt = 0
        while nxt < len(ds) or pending:
            while nxt < len(ds) and len(pending) < lookahead:
                pending.append(ex.submit(ds.__getitem__, nxt))
                nxt += 1
            yield pending.popleft().result()
