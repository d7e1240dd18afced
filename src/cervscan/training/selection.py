"""The model-selection rules of docs/model-selection.md, for ``scripts/select_classifier.py``, ``benchmarks/decision.py``
and the tests.

- :func:`choose_by_cost` (fine-tuned ``train-cls`` runs): candidates from the cheapest to the dearest (input size,
  then epochs); a dearer one replaces the current choice only if it beats it by more than ``margin``; candidates of
  equal cost compete on AUC alone.
- :func:`choose` (the harness's rows): eligibility (each source's AUC >= 0.65, >= 3 images/s, no recorded stage),
  then from the cheapest up a dearer candidate replaces the choice only if its AUC is higher by more than
  ``max(0.005, 2 x noise)``, the noise being the standard error of the paired fold-AUC differences.
- :func:`structure` (rule 3): a part of the study's structure is added back unless it costs AUC.
"""

from __future__ import annotations

import numpy as np


def choose_by_cost(cands: list[dict], margin: float) -> tuple[dict, list[str]]:
    """Rows with ``run`` (a path), ``auc`` and ``cost`` (a sortable tuple): the chosen row and why."""
    order = sorted(cands, key=lambda d: d["cost"])
    best, why = order[0], []
    for c in order[1:]:
        if c["cost"] == best["cost"]:
            if c["auc"] > best["auc"]:
                why.append(f"{c['run'].name} replaces {best['run'].name} at equal cost ({c['auc']:.3f} > {best['auc']:.3f})")
                best = c
        elif c["auc"] > best["auc"] + margin:
            why.append(f"{c['run'].name} replaces {best['run'].name}: {c['auc']:.3f} beats {best['auc']:.3f} by more than {margin}")
            best = c
        else:
            why.append(f"{c['run'].name} ({c['auc']:.3f}) does not beat {best['run'].name} ({best['auc']:.3f}) by more than {margin}")
    return best, why


def noise(a: dict, b: dict) -> float:
    d = np.array(a["fold_auc"]) - np.array(b["fold_auc"])
    return float(d.std(ddof=1) / np.sqrt(len(d)))


def choose(rows: list[dict]) -> tuple[dict | None, list[str]]:
    """The rule of docs/model-selection.md (baselines compete too: they are candidates as well)."""
    elig = [r for r in rows if min(r["auc_iarc"], r["auc_annocerv"]) >= 0.65 and r["est_img_s"] >= 3.0
            and not r["recorded_stage"]]
    why = [f"not eligible: {r['name']} (" + ("recorded stage, which screening does not have; " if r["recorded_stage"]
                                             else "") + f"lowest source AUC {min(r['auc_iarc'], r['auc_annocerv']):.3f}, "
           f"{r['est_img_s']:.1f} img/s)" for r in rows if r not in elig]
    elig.sort(key=lambda r: (round(r["cost_ms_1thread"], 0), r["fit_seconds"]))
    best = None
    for r in elig:
        if best is None:
            best = r
            continue
        same_cost = abs(r["cost_ms_1thread"] - best["cost_ms_1thread"]) < 0.5
        margin = 0.0 if same_cost else max(0.005, 2 * noise(r, best))
        if r["auc"] > best["auc"] + margin:
            why.append(f"{r['name']} replaces {best['name']}: {r['auc']:.3f} > {best['auc']:.3f} + {margin:.3f}")
            best = r
        elif r["auc"] > best["auc"]:
            why.append(f"{r['name']} does not replace {best['name']}: {r['auc']:.3f} <= {best['auc']:.3f} + {margin:.3f}")
    return best, why


#: Rule 3: (candidate without a part of the study's structure, the same candidate with it, the part)
STRUCTURE = [("I1 ", "F1s ", "segmented images (study weights 0.20 : 0.25)"),
             ("I3 ", "M5 ", "segmented images"), ("F1s ", "F2 ", "six variants"), ("M5 ", "M4 ", "six variants")]


def structure(rows: list[dict], best: dict | None) -> tuple[dict | None, list[str]]:
    """Rule 3: a part of the study's structure is added back to the chosen candidate unless it lowers AUC by
    more than 2 x noise (or its candidate is not eligible); repeated while a pair applies."""
    if best is None:
        return None, []
    by = {r["name"]: r for r in rows}
    find = lambda prefix: next((r for n, r in by.items() if n.startswith(prefix)), None)  # noqa: E731
    why, shipped, changed = [], best, True
    while changed:
        changed = False
        for a, b, part in STRUCTURE:
            ra, rb = find(a), find(b)
            if ra is None or rb is None or ra["name"] != shipped["name"]:
                continue
            elig = min(rb["auc_iarc"], rb["auc_annocerv"]) >= 0.65 and rb["est_img_s"] >= 3.0
            lower = ra["auc"] - rb["auc"]
            if not elig:
                why.append(f"{part}: {rb['name']} is not eligible ({rb['est_img_s']:.1f} img/s, lowest source AUC "
                           f"{min(rb['auc_iarc'], rb['auc_annocerv']):.3f}); the part stays selectable, not default")
            elif lower > 2 * noise(ra, rb):
                why.append(f"{part}: lowers AUC by {lower:.3f} > 2 x noise {2 * noise(ra, rb):.3f}; left out of the default")
            else:
                why.append(f"{part}: kept ({rb['name']}: AUC {rb['auc']:.3f} against {ra['auc']:.3f}, "
                           f"2 x noise {2 * noise(ra, rb):.3f})")
                shipped, changed = rb, True
                break
    return shipped, why
