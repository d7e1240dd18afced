"""Package trained runs as the shipped default weights (weights/ + manifest.json).

    python scripts/package_weights.py --stage runs/stage --cervix runs/cervix-192 --seg runs/lesion-256 \
        --cls runs/cls-crop --version 1.2.0 [--seg-comparison docs/training-runs/lesion-comparison.json] \
        [--cls-compare docs/training-runs/cls-lite0-160e12] [--fp16]

Copies each run's model.pt (optionally stored in float16; the script checks that
screen scores on the example visits stay within 1e-3 of float32), and writes
weights/manifest.json with sha256, architecture, input size, training data,
cross-validated metrics (95 % CI, per source), operating point, licence and
attribution.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

ATTRIBUTION = ("Trained on AnnoCerv (Minciuna et al., github.com/iclx/AnnoCerv, CC BY 4.0), Jhpiego VIA training flash cards (cervix and lesion polygons, for research and education) and the IARC Colposcopy "
               "Image Bank (International Agency for Research on Cancer, screening.iarc.fr, published for education "
               "and research).")


def main() -> None:

    from cervscan.models.networks import read_checkpoint, save_checkpoint
    from cervscan.models.registry import sha256_file

    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=Path, help="train-stage run folder (exam-stage model)")
    ap.add_argument("--cervix", type=Path, help="train-seg --target cervix run folder (cervix finder)")
    ap.add_argument("--seg-comparison", type=Path, help="scripts/compare_lesion_seg.py output (JSON) for the card")
    ap.add_argument("--seg", type=Path, help="train-seg run folder (lesion segmenter)")
    ap.add_argument("--cls", type=Path, help="train-cls or train-decision run folder (classifier)")
    ap.add_argument("--seg-compare", type=Path)
    ap.add_argument("--cls-compare", type=Path, action="append", default=[])
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--version", required=True, help="Version of the shipped weights, e.g. 1.1.0.")
    ap.add_argument("--seg-version", help="Version of the segmenter file when it is unchanged (default: --version).")
    ap.add_argument("--why", help="Why the classifier is the default (one paragraph, for the model card).")
    ap.add_argument("--comparison-note", help="What the --cls-compare runs are (one sentence, for the model card).")
    ap.add_argument("--out", type=Path, default=ROOT / "weights")
    a = ap.parse_args()

    out = a.out
    out.mkdir(exist_ok=True)
    entries = []
    # a role without a run folder keeps its current file and manifest entry (same sha256, same version)
    old = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {"models": []}
    given = {"stage": a.stage, "cervix": a.cervix, "segmenter": a.seg, "classifier": a.cls}
    for e in old["models"]:
        if given.get(e["role"]) is None:
            if sha256_file(out / e["file"]) != e["sha256"]:
                sys.exit(f"{out / e['file']}: does not match its manifest sha256; give its run folder")
            entries.append(e)
    roles = [("stage", a.stage, "stage.pt"), ("cervix", a.cervix, "cervix.pt"),
             ("segmenter", a.seg, "segmenter.pt"), ("classifier", a.cls, "classifier.pt")]
    for role, run, fname in [r for r in roles if r[1] is not None]:
        ck = read_checkpoint(run / "model.pt")
        version = (a.seg_version or a.version) if role == "segmenter" else a.version
        ck["version"] = version
        if a.fp16:
            ck["state_dict"] = {k: (v.half() if v.is_floating_point() else v) for k, v in ck["state_dict"].items()}
            ck["dtype"] = "float16"
        save_checkpoint(ck, out / fname)
        metrics = json.loads((run / "metrics.json").read_text())
        e = {"role": role, "file": fname, "name": ck["name"], "version": version, "sha256": sha256_file(out / fname),
             "arch": ck["arch"], "arch_kwargs": ck["arch_kwargs"], "form": ck["form"], "dtype": ck.get("dtype"),
             "input_size": ck["input_size"], "mean": ck["mean"], "std": ck["std"], "classes": ck["classes"],
             "license": "Apache-2.0 (weights); training data: see attribution", "attribution": ATTRIBUTION,
             "train_summary": ck.get("train_summary"),
             "training": json.loads((run / "run.json").read_text()).get("config")}
        if role == "stage":
            e["training_data"] = ("../shared/data/visits: exam stage of every image from images.csv (IARC stage "
                                  "labels; AnnoCerv images are all after acetic acid)")
            e["metrics"] = {k: metrics.get(k) for k in ("evaluation", "accuracy", "balanced_accuracy", "per_class",
                                                        "accuracy_by_source", "confusion", "images", "patients")}
        elif role == "cervix":
            e["mask_threshold"] = ck.get("mask_threshold")
            e["target"] = "cervix"
            e["training_data"] = ("../shared/data/cervix-seg: 107 Jhpiego VIA flash cards with cervix polygons; "
                                  f"{metrics.get('split')}")
            e["metrics"] = {k: metrics.get(k) for k in ("val_mean_iou", "val_mean_dice", "val_iou_pooled",
                                                        "val_iou_quartiles", "best_epoch", "selection", "init",
                                                        "n_train", "n_val")}
        elif role == "segmenter":
            e["mask_threshold"] = ck.get("mask_threshold")
            e["target"] = ck.get("target", "lesion")
            e["crop"] = ck.get("crop")
            e["training_data"] = (f"{e['training']['data']}: filled lesion masks; {metrics.get('split')}"
                                  + ("; each image and mask cropped to the cervix by the cervix finder"
                                     if ck.get("crop") == "cervix" else ""))
            if a.seg_comparison:
                comp = json.loads(a.seg_comparison.read_text())
                e["comparison"] = {name: m["groups"] for name, m in comp["models"].items()}
                e["comparison_models"] = {name: {"segmenter": m["segmenter"], "cervix": m["cervix"]}
                                          for name, m in comp["models"].items()}
            e["metrics"] = {k: metrics.get(k) for k in ("val_mean_iou", "val_mean_dice", "val_mean_iou_lesion_images",
                                                        "val_iou_pooled", "val_iou_quartiles", "best_epoch", "selection", "init",
                                                        "n_train", "n_val")}
            if a.seg_compare:
                mc = json.loads((a.seg_compare / "metrics.json").read_text())
                e["metrics"]["comparison_" + a.seg_compare.name] = {k: mc.get(k) for k in (
                    "val_mean_iou", "val_mean_dice", "val_mean_iou_lesion_images", "val_iou_pooled", "init")}
        else:  # classifier: what both recipes record, then each recipe's own cross-validation
            for key in ("crop", "threshold", "operating_point", "temperature", "voting"):
                e[key] = ck.get(key)
        if role == "classifier" and ck.get("recipe") == "frozen-linear":
            e["classify_view"] = ck.get("classify_view")
            e["decision_stages"] = ck.get("decision_stages")
            e["recipe"] = "frozen-linear"
            e["training_data"] = ("../shared/data/visits: 203 patients / 798 images (IARC Colposcopy Image Bank 118, "
                                  "AnnoCerv 85), labels.csv; images the quality gate and the stage policy accept")
            e["cross_validation"] = {k: metrics.get(k) for k in (
                "evaluation", "patients", "images", "eligible_images", "inadequate_patients", "auc_mean_of_repeats",
                "auc_repeats", "by_source", "sensitivity_mean_of_repeats", "specificity_mean_of_repeats", "platt")}
            r0 = metrics.get("repeat0") or {}
            e["cross_validation"]["repeat0"] = {k: r0.get(k) for k in ("auc", "sensitivity", "specificity", "ci95",
                                                                        "by_source", "patients", "severe")}
            e["cross_validation"]["run"] = run.name
            e["cross_validation"]["seconds"] = metrics.get("seconds")
            e["selection"] = "benchmarks/decision.py (table in benchmarks/RESULTS.md, rule in docs/model-selection.md)"
        elif role == "classifier":
            e["training_data"] = ("../shared/data/visits: 203 patients / 798 images (IARC Colposcopy Image Bank 118, "
                                  "AnnoCerv 85), labels.csv")
            e["cross_validation"] = {"evaluation": metrics.get("evaluation"), "held_out": metrics.get("held_out"),
                                     "fold_summary": metrics.get("fold_summary"), "folds": metrics.get("folds"),
                                     "study_setting": metrics.get("study_setting"),
                                     "auc_original_only": metrics.get("auc_original_only"),
                                     "epoch_curve": metrics.get("epoch_curve"), "run": run.name,
                                     "seconds": metrics.get("seconds")}
            e["alternatives"] = {}
            for c in a.cls_compare:
                mc = json.loads((c / "metrics.json").read_text())
                tc = json.loads((c / "run.json").read_text()).get("config", {})
                e["alternatives"][c.name] = {"summary": mc.get("summary"), "fold_summary": mc.get("fold_summary"),
                                             "config": {k: tc.get(k) for k in ("arch", "pretrained", "input_size", "epochs",
                                                                               "lr", "batch_size", "samples", "seed")},
                                             "operating_point": mc.get("operating_point"),
                                             "epoch_curve": mc.get("epoch_curve"),
                                             "seconds": mc.get("seconds"),
                                             "held_out_auc": mc.get("held_out", {}).get("auc"),
                                             "held_out_ci95": mc.get("held_out", {}).get("ci95"),
                                             "by_source": {k: {kk: v.get(kk) for kk in ("auc", "sensitivity", "specificity", "ci95")}
                                                           for k, v in (mc.get("held_out", {}).get("by_source") or {}).items()}}
        entries.append(e)
    order = ["stage", "cervix", "segmenter", "classifier"]
    entries.sort(key=lambda e: order.index(e["role"]) if e["role"] in order else len(order))
    man = {"format": 1, "version": a.version, "models": entries}
    if a.why:
        man["why"] = a.why.strip()
    if a.comparison_note:
        man["comparison_note"] = a.comparison_note.strip()
    (out / "manifest.json").write_text(json.dumps(man, indent=2) + "\n")
    print(f"wrote {out}/manifest.json")

    if a.fp16:  # check fp16 storage against fp32 on the example visits
        from cervscan import api

        with tempfile.TemporaryDirectory() as td:
            kw16 = {f"{k}_model": str(out / f) for k, f in (("seg", "segmenter.pt"), ("cls", "classifier.pt"),
                                                              ("cervix", "cervix.pt"), ("stage", "stage.pt"))
                    if (out / f).is_file()}
            kw32 = {f"{k}_model": str(r / "model.pt") for k, r in (("seg", a.seg), ("cls", a.cls), ("cervix", a.cervix),
                                                                   ("stage", a.stage)) if r is not None}
            r16 = api.screen([ROOT / "examples" / "visits"], Path(td) / "a", device="cpu", **kw16)
            r32 = api.screen([ROOT / "examples" / "visits"], Path(td) / "b", device="cpu", **kw32)
            d = max(abs(x["score"] - y["score"]) for x, y in zip(r16.images, r32.images) if x["status"] == "ok")
            print(f"fp16 vs fp32 max image score difference on examples: {d:.2e}")
            if d > 1e-3:
                sys.exit("fp16 storage changes scores by more than 1e-3: package without --fp16")


if __name__ == "__main__":
    main()
