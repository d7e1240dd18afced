"""What ``cervscan adapt`` writes for people and for ``screen``: the site model card (``RUN/adapt.md``) and the
site's config file (``RUN/site.toml``), both from the run's numbers (:mod:`cervscan.training.adapt`)."""

from __future__ import annotations

import json
import time

from cervscan import __version__
from cervscan.pipeline import quality

_GATE_FIELDS = [f for _, f, _, _ in quality.THRESHOLD_RULES]


def json_of(value) -> dict:
    """A JSON text stored in an npz (a 0-d string array) as a dict."""
    return json.loads(str(value))


def site_toml(cfg, gate, threshold: float, metrics: dict) -> str:
    """``site.toml``: the settings of :data:`cervscan.settings.SETTINGS` that make screening the site's (gate
    thresholds, decision stages, threshold), for ``screen --site RUN``."""
    lines = [f"# cervscan site settings, written by 'cervscan adapt' (cervscan {__version__}) on "
             f"{time.strftime('%Y-%m-%d %H:%M')}",
             f"# from {cfg.visits} ({metrics['patients']} patients with an eligible image), labels {cfg.labels}.",
             "# The threshold belongs to the adapted classifier of this folder: screen with both,",
             "#   cervscan screen VISITS -o OUT --site RUN  (or: cervscan models install RUN)",
             f"# Candidate {metrics['candidate']} (adapt.md, Candidates). Quality gate thresholds: "
             + ("re-derived from the site's own images (the shipped rule)" if metrics["gate"]["chosen"] == "site"
                else "the installed ones") + "; stage policy:",
             f"#   {metrics['stage_policy']['why']}", ""]
    lines += [f"{f} = {float(getattr(gate, f))!r}" for f in _GATE_FIELDS]
    lines += [f"decision_stages = {json.dumps(list(gate.decision_stages))}", f"threshold = {float(threshold)!r}", ""]
    return "\n".join(lines)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f} %"


def _share(x) -> str:
    """A share of patients to one decimal (5.5 %, not 5 %: the targets are in whole percents)."""
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _ci(lo_hi) -> str:
    return "" if not lo_hi else f" {lo_hi[0]:.2f}–{lo_hi[1]:.2f}"


def _patients(m: dict) -> list[str]:
    c = m["counts"]
    rows = ["| source | mildly normal (0) | severe (1) |", "|---|---|---|"]
    rows += [f"| {s} | {n['mildly_normal']} | {n['severe']} |" for s, n in c["by_source"].items()]
    rows.append(f"| **all** | **{c['mildly_normal']}** | **{c['severe']}** |")
    return ["## Patients", "", f"Labelled patients with images under `{m['config']['visits']}` "
            f"(labels `{m['config']['labels']}`):", "", *rows, "",
            f"{m['patients']} of them have an eligible image under the site's settings and make the decision; "
            f"{len(m['inadequate_patients'])} have none (inadequate).", ""]


def _metrics(m: dict) -> list[str]:
    v, r0, op, n = m["validation"], m["repeat0"], m["operating_point"], m["nested"]
    tf = m["training_features"]
    on = "the local patients and the shipped training patients (pooled)" if m["chosen"] == "pooled" else \
        "the local patients only"
    if "auc" in n:
        est = [f"**The estimate: nested cross-validated AUC {n['auc']:.3f} (95 % CI {n['ci_low']:.3f}–"
               f"{n['ci_high']:.3f})**, {_share(n['inadequate_rate'])} of the patients inadequate: the whole choice "
               f"among the {m['choice']['allowed']} candidates repeated inside every outer training fold "
               f"({n['method']}). Chosen in the outer folds: "
               + ", ".join(f"{k} {c}x" for k, c in n["chosen_in_outer_folds"].items()) + ".", "",
               f"The table below is the chosen candidate's own cross-validation; choosing the best of "
               f"{m['choice']['allowed']} on the same folds flatters it (optimistic by the choice), so the nested "
               f"AUC is the number to rely on.", ""]
    else:
        est = [f"No nested estimate: {n.get('skipped') or n.get('error')}.", ""]
    lines = ["## The adapted decision", "",
             f"Candidate **{m['candidate']}**: stages {', '.join(m['stage_policy']['stages'])}, "
             f"{m['gate']['chosen']} gate thresholds, fitted on {on}. Chosen by the selection rule (section "
             f"*Candidates*): {m['choice']['why']}."
             + ("" if tf.get("available") else f" Pooled not measured: {tf.get('why')}."), "", *est,
             "| cross-validated, per patient | value | 95 % CI |", "|---|---|---|",
             f"| AUC of the chosen candidate (mean of {len(m['auc_repeats'])} repeats) | {v['auc']:.3f} | "
             f"{v['ci_low']:.3f}–{v['ci_high']:.3f} |",
             f"| sensitivity at the threshold (repeat 0) | {_pct(r0['sensitivity'])} |{_ci(r0['ci95']['sensitivity'])} |",
             f"| specificity at the threshold (repeat 0) | {_pct(r0['specificity'])} |{_ci(r0['ci95']['specificity'])} |",
             f"| threshold (calibrated score) | {op['threshold']:.3f} | |", "",
             f"The threshold was chosen on these out-of-fold scores for {op['target_sensitivity']:.0%} sensitivity, so "
             f"the sensitivity and specificity at it are in-sample (optimistic). Validation against "
             f"chance: {'passed' if v['passed'] else 'FAILED'} (rule: {v['rule'].removeprefix('passed: ')})"
             + (", model written because of --force" if v.get("forced") else "") + ".", ""]
    if m.get("by_source") and len(m["by_source"]) > 1:
        lines += ["| source | AUC | sensitivity | specificity |", "|---|---|---|---|"]
        lines += [f"| {s} | {b['auc']:.3f} | {_pct(b['sensitivity'])} | {_pct(b['specificity'])} |"
                  for s, b in m["by_source"].items()] + [""]
    return lines


def _comparison(c: dict) -> list[str]:
    i, a = c["installed"], c["adapted"]
    lines = ["## Compared with the installed decision", "",
             f"Installed: `{i['model']}` (scores: {i['how']}), with its own gate and stage policy "
             f"({', '.join(i['decision_stages'])}). Same local patients, the adapted decision's out-of-fold scores.", ""]
    if c.get("paired"):
        p = c["paired"]
        lines += ["| on the patients both decide | installed | adapted |", "|---|---|---|",
                  f"| AUC | {i['auc']:.3f} | {a['auc']:.3f} |",
                  f"| sensitivity at its own threshold | {_pct(i['sensitivity'])} | {_pct(a['sensitivity'])} |",
                  f"| specificity at its own threshold | {_pct(i['specificity'])} | {_pct(a['specificity'])} |",
                  f"| threshold | {i['threshold']:.3f} | {a['threshold']:.3f} |",
                  f"| inadequate patients (of {c['patients']}), own settings | {c['inadequate']['installed']} "
                  f"({_share(c['inadequate_rate']['installed'])}) | {c['inadequate']['adapted']} "
                  f"({_share(c['inadequate_rate']['adapted'])}) |", "",
                  f"AUC difference (adapted − installed) {p['auc_delta']:+.3f}, 95 % CI {p['ci95'][0]:+.3f} to "
                  f"{p['ci95'][1]:+.3f} (paired bootstrap over the {p['patients']} patients both decide, "
                  f"{p['severe']} severe).", ""]
    else:
        lines += [c.get("note", ""), ""]
    lines.append("**Installable: yes.**" if c["installable"] else
                 "**Installable: NO** — " + "; ".join(c["not_installable_because"]) + ".")
    return lines + [""]


def _candidates(m: dict) -> list[str]:
    c = m["choice"]
    lines = ["## Candidates", "", f"Rule (written before any result was looked at): {c['rule']}", "",
             "| candidate | stages | gate | fit | CV AUC (mean of repeats) | inadequate | departures | may be chosen |",
             "|---|---|---|---|---|---|---|---|"]
    for r in c["candidates"]:
        auc = f"{r['auc']:.3f}" if r.get("auc") is not None else f"not measured ({r.get('error', '')})"
        inad = f"{r['inadequate']} ({_share(r['inadequate_rate'])})" if r.get("auc") is not None else ""
        name = f"**{r['key']}** (chosen)" if r.get("chosen") else r["key"]
        lines.append(f"| {name} | {', '.join(r['stages'])} | {r['gate']} | {r['pool']} | {auc} | {inad} | "
                     f"{r['departures']} | {'yes' if r['allowed'] else 'no (fixed by an option)'} |")
    return lines + ["", "Each candidate on the same folds; its inadequate patients have no eligible image under its "
                        "stages and gate (not decided, so not in its AUC).", ""]


def _gate(m: dict) -> list[str]:
    g, sp = m["gate"], m["stage_policy"]
    derived = g.get("derived") or {}
    lines = ["## Quality gate and stage policy", "",
             "| setting | installed | re-derived from this site's images | in use |", "|---|---|---|---|"]
    lines += [f"| `{f}` | {g['installed'][f]:g} | {derived[f]:g} | {g['site'][f]:g} |" if derived else
              f"| `{f}` | {g['installed'][f]:g} | | {g['site'][f]:g} |" for f in _GATE_FIELDS]
    lines += [f"| `decision_stages` | {', '.join(sp['installed'])} | | {', '.join(sp['stages'])} |", ""]
    if g.get("how"):
        lines.append(f"Re-derived thresholds: {g['rule']}; n = {g['how']['n']} local images, no-cervix rate "
                     f"{g['how']['no_cervix_rate']:.1%}, share per threshold {g['how']['share_per_threshold']:.2%}.")
    lines += [f"In use: the {g['chosen']} thresholds. Stage policy: {sp['why']}. Stages the stage model sees in the "
              f"local images: " + ", ".join(f"{s} {n}" for s, n in sp["predicted"].items() if n) + ".", ""]
    return lines


def _curve(m: dict) -> list[str]:
    lines = ["## Learning curve of the site's own data", "",
             "Local training patients drawn at random (classes in their local proportion), each fit scored on the "
             "local patients not drawn; mean AUC over the draws, 10th–90th percentile.", "",
             "| local training patients | " + " | ".join(m["learning_curve"]) + " |",
             "|---|" + "---|" * len(m["learning_curve"])]
    sizes = [r["train_patients"] for r in next(iter(m["learning_curve"].values()))]
    for n in sizes:
        cells = []
        for rows in m["learning_curve"].values():
            r = next((x for x in rows if x["train_patients"] == n), None)
            cells.append("" if r is None else f"{r['auc_mean']:.3f}" + (f" ({r['auc_p10']:.2f}–{r['auc_p90']:.2f})"
                                                                           if "auc_p10" in r else " (CV)"))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines + ["", "A curve still rising at the right end says more labelled patients would help.", ""]


def card(cfg, m: dict, c: dict) -> str:
    """``adapt.md``: the site model card."""
    head = [f"# Site model card: {cfg.visits}", "",
            f"Written by `cervscan adapt` (cervscan {__version__}) on {time.strftime('%Y-%m-%d %H:%M')}, "
            f"in {m['seconds']['total']:.0f} s.", ""]
    if cfg.force:
        head += ["**FORCED (--force):** " + ("; ".join(w for w in m["warnings"] if w.startswith("FORCED"))
                                            or "the run was allowed to go on past its refusals") + ".", ""]
    files = (["`model.pt` (the adapted classifier) and `site.toml` (its gate, stages and threshold): screen with "
              "`cervscan screen VISITS -o OUT --site RUN`, check with "
              "`cervscan evaluate` the same way on patients it has not seen."] if m.get("checkpoint") else
             ["No `model.pt` and no `site.toml`: the adapted decision failed its validation."])
    warn = ["## Warnings", ""] + ([f"- {w}" for w in m["warnings"]] or ["- none"]) + [""]
    limits = ["## What this cannot promise", "",
              "- The numbers come from this site's own labelled patients, cross-validated: they estimate how the "
              "decision does on more patients like them, with the CIs shown; a small sample gives wide CIs.",
              "- The labels bound what it learns: histology is best; an expert's colposcopic or VIA impression "
              "teaches that impression, errors included.",
              "- A new camera, light, clinic population or way of taking the pictures can change everything: "
              "adapt again, and evaluate on patients it has not seen before relying on it.",
              "- cervscan assists a clinician; it does not diagnose.", ""]
    return "\n".join(head + files + [""] + _patients(m) + _metrics(m) + _comparison(c) + _candidates(m) + _gate(m)
                     + _curve(m) + warn + limits)
