"""Apply the selection rule of docs/model-selection.md to cross-validated train-cls runs.

    python scripts/select_classifier.py runs/cls-repvgg runs/cls-lite0 runs/cls-lite0-160e12 \
        runs/cls-lite0-224e6 runs/cls-lite0-head [--margin 0.01]

Score: pooled out-of-fold patient AUC (metrics.json, held_out.auc). Candidates are visited from the
cheapest to the dearest (input size, then epochs); a dearer one replaces the current choice only if
it beats it by more than --margin; candidates of equal cost compete on AUC alone. Prints a table and
the chosen run (last line: the run folder).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cervscan.training.selection import choose_by_cost as choose  # the rule of docs/model-selection.md


def load(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    c = json.loads((run / "run.json").read_text())["config"]
    if m.get("evaluation") != "cross-validation":
        raise SystemExit(f"{run}: not a cross-validation run ({m.get('evaluation')})")
    return {"run": run, "auc": m["held_out"]["auc"], "ci": m["held_out"]["ci95"]["auc"],
            "cost": (c["input_size"], c["epochs"]), "arch": c["arch"], "head_std": c.get("head_std", 0.0),
            "spec": m["operating_point"]["specificity"], "folds": c["folds"], "seed": c["seed"],
            "by_source": {k: v.get("auc") for k, v in m["held_out"].get("by_source", {}).items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--margin", type=float, default=0.01)
    a = ap.parse_args()
    cands = [load(r) for r in a.runs]
    if len({(c["folds"], c["seed"]) for c in cands}) > 1:
        raise SystemExit("the runs do not share their folds (--folds and --seed differ)")
    for c in sorted(cands, key=lambda d: d["cost"]):
        src = ", ".join(f"{k} {v:.3f}" for k, v in c["by_source"].items() if v is not None)
        print(f"{c['run'].name:22s} {c['arch']:22s} {c['cost'][0]:4d} px {c['cost'][1]:3d} ep  head_std {c['head_std']:<5g} "
              f"AUC {c['auc']:.3f} ({c['ci'][0]:.2f}-{c['ci'][1]:.2f})  spec@op {c['spec']:.2f}  {src}")
    best, why = choose(cands, a.margin)
    for w in why:
        print("-", w)
    print(best["run"])


if __name__ == "__main__":
    main()
