"""Render weights/README.md (the model card) from weights/manifest.json.

    python scripts/model_card.py [--dir weights]

Every number in the card comes from the manifest, which package_weights.py
filled from the training runs' metrics.json.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pct(x):
    return "n/a" if x is None else f"{100 * x:.0f} %"


def ci(c, scale=100, unit=" %"):
    return "" if not c else f" ({scale * c[0]:.0f}–{scale * c[1]:.0f}{unit})"


def ci_auc(c):
    return "" if not c else f" ({c[0]:.2f}–{c[1]:.2f})"


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=ROOT / "weights", help="Folder with manifest.json; README.md is written there.")
    wdir = ap.parse_args().dir
    man = json.loads((wdir / "manifest.json").read_text())
    seg = next(m for m in man["models"] if m["role"] == "segmenter")
    cls = next(m for m in man["models"] if m["role"] == "classifier")
    stage = next((m for m in man["models"] if m["role"] == "stage"), None)
    cervix = next((m for m in man["models"] if m["role"] == "cervix"), None)
    cv = cls["cross_validation"]
    frozen = cls.get("recipe") == "frozen-linear"
    ho = cv.get("held_out") or {}
    op = cls["operating_point"]
    sm = seg["metrics"]
    lines = [
        f"# Model card: cervscan shipped weights {man['version']}",
        "",
        "**Intended use.** Decision support for colposcopy screening: the models flag visits whose images look like",
        "those of patients who needed referral or treatment (\"severe\"), and show where the segmenter found",
        "acetowhite lesion area. They do not diagnose. A clinician decides; a low score does not rule out disease.",
        "",
        "## Files",
        "",
        "| role | file | name | architecture | input | storage | sha256 |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in [x for x in (stage, cervix, seg, cls) if x]:
        lines.append(f"| {m['role']} | `{m['file']}` | {m['name']} {m['version']} | {m['arch']} ({m['form']}) | "
                     f"{m['input_size'][0]} px | {m['dtype']} | `{m['sha256'][:16]}…` |")
    lines += [
        "",
        "`manifest.json` holds the full sha256, normalisation, training summary and every metric below;",
        "`cervscan models verify` checks the hashes.",
        "",
        "## Training data",
        "",
        *([f"- Exam-stage model: {stage['training_data']}."] if stage else []),
        *([f"- Cervix finder: {cervix['training_data']}."] if cervix else []),
        f"- Lesion segmenter: {seg['training_data']}.",
        f"- Classifier: {cls['training_data']}.",
        f"- {cls['attribution']}",
        "",
    ]
    if stage:
        sm_ = stage["metrics"]
        pc = sm_["per_class"]
        lines += [
            "## Exam-stage model",
            "",
            f"{stage['train_summary'].get('backbone')} features of the whole frame at {stage['input_size'][0]} px and a "
            f"{stage['train_summary'].get('head')} (folded into the network's last layer). Classes: "
            + ", ".join(stage["classes"]) + ". "
            f"Accuracy by {sm_['evaluation']} on {sm_['images']} images of {sm_['patients']} patients: "
            f"{sm_['accuracy']:.3f} (balanced accuracy {sm_['balanced_accuracy']:.3f}).",
            "",
            "| stage | images | recall | precision |",
            "|---|---|---|---|",
            *[f"| {k} | {v['n']} | {v['recall']:.2f} | {v['precision']:.2f} |" for k, v in pc.items()],
            "",
            "Accuracy per source: " + ", ".join(f"{k} {v:.3f}" for k, v in sm_["accuracy_by_source"].items())
            + ". Saline and 'other' views are often confused with each other and with acetic acid; green-filter "
              "views with acetic acid. The stage is reported per image; it decides eligibility only when the "
              "`decision_stages` setting excludes a stage (by default every stage decides).",
            "",
        ]
    if cervix:
        cm = cervix["metrics"]
        lines += [
            "## Cervix finder (U-Net++)",
            "",
            f"{cm.get('init')}; {cervix['input_size'][0]} px; strong colour augmentation (the flash cards are prints "
            f"with shifted colours); {cm.get('selection')}: epoch {cm.get('best_epoch')}. Validation on "
            f"{cm.get('n_val')} flash cards held out from its training ({cm.get('n_train')} trained on): mean IoU "
            f"{cm['val_mean_iou']:.3f}, Dice {cm['val_mean_dice']:.3f}, pooled IoU {cm['val_iou_pooled']:.3f}.",
            "",
            "Its largest connected component is the cervix; the crop is the square around it with a 10 % margin "
            "(clipped to the image). A cervix covering under 3 % of the frame counts as not found and the centred "
            "square of 80 % of the shorter side is used instead (`cervix_found` = False in images.csv). On colposcopy "
            "frames it was checked by eye (`docs/cervix-contact-sheet.png`); it was never trained on them.",
            "",
        ]
    lines += [
        "## Lesion segmenter (U-Net++)",
        "",
        f"Initialisation: {sm.get('init')}. Trained with Dice + BCE, Adam (lr {seg['training']['lr']}, cosine schedule planned for",
        f"{seg['training']['epochs']} epochs, stopped after epoch {seg['training'].get('stop_after') or seg['training']['epochs']}), "
        f"{seg['input_size'][0]} px, batch {seg['training']['batch_size']}; "
        f"{sm.get('selection')}: epoch {sm.get('best_epoch')}; mask threshold {seg.get('mask_threshold')}.",
        "",
        f"| validation ({sm.get('n_val', 43)} held-out images) | value |",
        "|---|---|",
        f"| mean per-image IoU (an empty prediction on an empty mask counts 1) | {sm['val_mean_iou']:.3f} |",
        f"| mean per-image Dice | {sm['val_mean_dice']:.3f} |",
        f"| mean IoU over images with a marked lesion | {sm['val_mean_iou_lesion_images']:.3f} |",
        f"| pooled IoU (all pixels of all images) | {sm['val_iou_pooled']:.3f} |",
    ]
    for k, v in sm.items():
        if k.startswith("comparison_") and v:
            lines.append(f"| same model from scratch (`{k[11:]}`): mean IoU / Dice / pooled IoU | "
                         f"{v['val_mean_iou']:.3f} / {v['val_mean_dice']:.3f} / {v['val_iou_pooled']:.3f} |")
    comp = seg.get("comparison")
    if comp:
        names = list(comp)
        keys = [k for k in comp[names[0]] if not k.startswith("all/") or k == "all/all"]
        lines += ["", "Compared on the same held-out images in the coordinates of the whole frame "
                  "(`scripts/compare_lesion_seg.py`): mean IoU / mean Dice / pooled IoU; on images without a "
                  "marked lesion, the mean predicted area (fraction of the frame, lower is better).", "",
                  "| images | n | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|---|" + "---|" * len(names)]
        for k in keys:
            g0 = comp[names[0]][k]
            if k.endswith("no_lesion"):
                cells = [f"area {comp[n][k]['mean_pred_area']:.3f}" for n in names]
            else:
                cells = [f"{comp[n][k]['mean_iou']:.3f} / {comp[n][k]['mean_dice']:.3f} / {comp[n][k]['pooled_iou']:.3f}"
                         for n in names]
            lines.append(f"| {k} | {g0['n']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Treat the lesion overlays as a pointer, not as a delineation.",
        "",
    ]
    if frozen:
        lines += frozen_section(cls)
    else:
        lines += finetuned_section(cls, man, cv, ho, op)
    if man.get("why"):
        lines += ["", "**Why this default.** " + man["why"]]
    lines += [
        "",
        "Reproduce the cross-validated numbers with the fold models (each patient screened by the model that did",
        "not train on it), from a checkout with the training runs:",
        "",
        "```bash",
        "cervscan evaluate ../shared/data/visits --labels ../shared/data/visits/labels.csv \\",
        *([f"    --cv-run runs/{cv.get('run')} -o runs/eval-cv"] if frozen else [
        f"    --seg-model runs/{seg['training'].get('out', 'runs/seg').split('/')[-1]}/model.pt "
        f"{'--cervix-model runs/' + cervix['training'].get('out', 'runs/cervix').split('/')[-1] + '/model.pt ' if cervix else ''}"
        f"--cv-run runs/{cv.get('run', 'cls-lite0')} -o runs/eval-cv"]),
        "```",
        "",
        "and retrain everything with `scripts/train_shipped.sh`. The runs' metrics, per-patient predictions and",
        "plots are kept in `docs/training-runs/`.",
        "",
        "## Known limits",
        "",
        "- Small training set: 203 patients from two public sources; confidence intervals are wide.",
        "- AnnoCerv labels come from the Swede score (a colposcopic impression), IARC labels from histopathology where",
        "  done, else the colposcopic impression. Both sources are represented in unequal proportions and differ in",
        "  camera, size and aspect ratio; performance differs by source (table above).",
        "- Images from other devices, clinics and populations were not seen in training; expect lower performance",
        "  and check locally with `cervscan evaluate` before use. Fitted on one source and scored on the other, the",
        "  candidates reach only 0.53–0.65 AUC (`benchmarks/RESULTS.md`, block *Patient decision*, \"From one source",
        "  to the other\"): the cross-validated numbers above hold for these two sources, not for a new camera.",
        "- The image quality gate (README, Screen) keeps blurred, badly exposed or glaring images and images without",
        "  a cervix out of the decision; the exam stage is reported and decides only under `decision_stages`.",
        "- The cervix finder learned from 107 printed flash cards; on some colposcopy frames it leaves out red",
        "  columnar epithelium or blood at the os, and then the crop may cut part of the transformation zone.",
        "- The study this method comes from reported 83 % patient accuracy on private data; these numbers are not",
        "  comparable to it.",
        "",
        "## Licence and attribution",
        "",
        f"Weights: {cls['license']}. {cls['attribution']}",
        "",
    ]
    (wdir / "README.md").write_text("\n".join(lines))
    print(f"wrote {wdir / 'README.md'}")


def finetuned_section(cls, man, cv, ho, op) -> list[str]:
    """The classifier section of a fine-tuned (train-cls) classifier."""
    lines = [
        "## Classifier",
        "",
        f"{cls['arch']}, trained on original and segmented images of every patient"
        f"{' (the original being the cervix crop of the pipeline, the segmented image the lesion region of that crop)' if cls.get('crop') == 'cervix' else ''} "
        f"({cls['train_summary'].get('samples')} samples), {cls['train_summary'].get('epochs')} epochs, "
        f"lr {cls['train_summary'].get('lr')}, input {cls['input_size'][0]} px, ImageNet-pretrained: "
        f"{cls['train_summary'].get('pretrained')}. Final model: {cls['train_summary'].get('final_model')}.",
        "",
        f"Six-variant voting weights {cls['voting']['weights']}, brightness x{cls['voting']['brightness']} "
        f"(from the unflipped images), temperature {cls['temperature']:.3f}.",
        "",
        f"### Cross-validated performance ({cv['evaluation']}, 5 folds split by patient, stratified by label and source)",
        "",
        f"Operating point: threshold **{op['threshold']:.3f}** on the patient score, chosen on the out-of-fold",
        f"scores for a target sensitivity of {pct(op['target_sensitivity'])}.",
        "",
        "| patients | n | severe | AUC (95 % CI) | sensitivity (95 % CI) | specificity (95 % CI) |",
        "|---|---|---|---|---|---|",
        f"| all | {ho['patients']} | {ho['severe']} | {ho['auc']:.3f}{ci_auc(ho['ci95']['auc'])} | "
        f"{pct(ho['sensitivity'])}{ci(ho['ci95']['sensitivity'])} | {pct(ho['specificity'])}{ci(ho['ci95']['specificity'])} |",
    ]
    for s, d in (ho.get("by_source") or {}).items():
        if "auc" in d:
            lines.append(f"| {s} | {d['patients']} | {d['severe']} | {d['auc']:.3f}{ci_auc(d['ci95']['auc'])} | "
                         f"{pct(d['sensitivity'])}{ci(d['ci95']['sensitivity'])} | {pct(d['specificity'])}{ci(d['ci95']['specificity'])} |")
    fs = cv.get("fold_summary") or {}
    if "auc" in fs:
        lines += ["", f"AUC per fold: mean {fs['auc']['mean']:.3f}, standard deviation {fs['auc']['std']:.3f} "
                  f"({', '.join(format(r['auc'], '.3f') for r in cv['folds'] if r.get('auc') is not None)})."]
    st = cv.get("study_setting")
    if st:
        lines += [f"The study's own setting (no temperature, threshold 0.5): accuracy {pct(st['accuracy'])}, "
                  f"sensitivity {pct(st['sensitivity'])}, specificity {pct(st['specificity'])}. "
                  f"Original image only, no voting: AUC {cv.get('auc_original_only', float('nan')):.3f}."]
    # ---- the candidates compared for the choice of this classifier (same folds, same data)
    rows = [("shipped: `" + cv.get("run", "") + "`", cls["training"], ho, op)]
    for name, alt in (cls.get("alternatives") or {}).items():
        ho_alt = {"auc": alt["held_out_auc"], "ci95": alt.get("held_out_ci95") or {}, "by_source": alt["by_source"]}
        rows.append((f"`{name}`", alt.get("config") or alt["summary"], ho_alt, alt.get("operating_point") or {}))
    if len(rows) > 1:
        srcs = sorted(ho.get("by_source") or {})
        lines += ["", "### Compared with other classifiers on the same folds", "",
                  "Every run below was cross-validated on the same five patient-wise folds (seed 0, stratified by label "
                  "and source). " + (man.get("comparison_note") or "The rule for the choice is in `docs/model-selection.md`."), "",
                  "| run | architecture | init | input | epochs | AUC (95 % CI) | " + " | ".join(f"AUC {s}" for s in srcs)
                  + " | specificity at 90 % sensitivity |",
                  "|---|---|---|---|---|---|" + "---|" * len(srcs) + "---|"]
        for name, c, h, o in rows:
            bys = h.get("by_source") or {}
            lines.append(f"| {name} | {c.get('arch')} | {'ImageNet' if c.get('pretrained') else 'scratch'} | "
                         f"{c.get('input_size')} px | {c.get('epochs')} | {h['auc']:.3f}{ci_auc((h.get('ci95') or {}).get('auc'))} | "
                         + " | ".join("n/a" if (bys.get(s) or {}).get("auc") is None else f"{bys[s]['auc']:.3f}" for s in srcs)
                         + f" | {pct(o.get('specificity'))} |")
        curves = [(name, alt["epoch_curve"]) for name, alt in (cls.get("alternatives") or {}).items() if alt.get("epoch_curve")]
        if cv.get("epoch_curve"):
            curves.insert(0, ("shipped", cv["epoch_curve"]))
        for name, curve in curves:
            lines += ["", f"Learning curve of {name} (held-out patients scored after these epochs of the same schedule; "
                      "reported, not used for the choice):", "",
                      "| epoch | AUC | " + " | ".join(f"AUC {s}" for s in srcs) + " | specificity at 90 % sensitivity |",
                      "|---|---|" + "---|" * len(srcs) + "---|"]
            for r in curve:
                lines.append(f"| {r['epoch']} | {r['auc']:.3f} | "
                             + " | ".join("n/a" if r.get(f"auc[{s}]") is None else f"{r[f'auc[{s}]']:.3f}" for s in srcs)
                             + f" | {pct(r.get('specificity_at_op'))} |")
    return lines


def frozen_section(cls) -> list[str]:
    """The classifier section of a train-decision classifier (frozen features + logistic regression)."""
    cv = cls["cross_validation"]
    op = cls["operating_point"]
    ts = cls["train_summary"]
    vote = cls["voting"]
    r0 = cv.get("repeat0") or {}
    view = "the whole frame" if cls.get("classify_view") == "frame" else "the cervix crop"
    lines = [
        "## Classifier (the patient decision)",
        "",
        f"{ts.get('backbone')} features ({cls['arch']}, {cls['input_size'][0]} px) of {view} (variants "
        f"{', '.join(v for v in vote['variants'] if v.startswith('original'))}) and of the segmented image, i.e. the "
        f"lesion region of the cervix crop (variants {', '.join(v for v in vote['variants'] if v.startswith('segmented'))}). "
        f"Head: {ts.get('head')}, folded into the network's last layer. Images: those of the stages "
        f"{', '.join(cls.get('decision_stages') or [])} that the quality gate accepts. Image score: the weighted vote "
        f"of the variants' log-odds (weights {vote['weights']} over the variants in use); patient score: the mean of "
        f"the images' log-odds, which for this linear head equals its score of the patient's mean feature.",
        "",
        f"### Cross-validated performance ({cv['evaluation']})",
        "",
        f"Operating point: threshold **{op['threshold']:.3f}** on the calibrated patient score, chosen on the pooled "
        f"out-of-fold scores of all repeats for a target sensitivity of {pct(op['target_sensitivity'])}.",
        "",
        f"Patient AUC, mean of the repeats: **{cv['auc_mean_of_repeats']:.3f}** (repeats "
        + ", ".join(f"{a:.3f}" for a in cv["auc_repeats"]) + f"); at the threshold: sensitivity "
        f"{pct(cv['sensitivity_mean_of_repeats'])}, specificity {pct(cv['specificity_mean_of_repeats'])}.",
        "",
        "| patients (repeat 0) | n | severe | AUC (95 % CI) | sensitivity (95 % CI) | specificity (95 % CI) |",
        "|---|---|---|---|---|---|",
    ]
    if r0:
        c = r0.get("ci95") or {}
        lines.append(f"| all | {r0.get('patients')} | {r0.get('severe')} | {r0['auc']:.3f}{ci_auc(c.get('auc'))} | "
                     f"{pct(r0['sensitivity'])}{ci(c.get('sensitivity'))} | {pct(r0['specificity'])}{ci(c.get('specificity'))} |")
        for s_, d in (r0.get("by_source") or {}).items():
            if "auc" in d:
                dc = d.get("ci95") or {}
                lines.append(f"| {s_} | {d['patients']} | {d['severe']} | {d['auc']:.3f}{ci_auc(dc.get('auc'))} | "
                             f"{pct(d['sensitivity'])}{ci(dc.get('sensitivity'))} | {pct(d['specificity'])}{ci(dc.get('specificity'))} |")
    lines += ["", "Per source, mean of the repeats: " + "; ".join(
        f"{k}: AUC {v['auc']:.3f}, sensitivity {pct(v['sensitivity'])}, specificity {pct(v['specificity'])}"
        for k, v in (cv.get("by_source") or {}).items()) + ".",
        "", "How it was chosen among about forty candidates (inputs, images, backbones, variants, patient rules), "
        "winners and losers: `benchmarks/RESULTS.md` (block *Patient decision*), rule in `docs/model-selection.md`.",
        ""]
    return lines


if __name__ == "__main__":
    main()
