"""How many local patients are enough? AUC at a new site against the number of its labelled patients (issue 18).

    python benchmarks/site_curve.py [--data ../shared/data] [--cache-dir runs/cache] [--threads 1]
                                    [--sizes 10,20,40] [--draws 20] [--out runs/site-curve] [--no-write]

Each new site goes through ``cervscan adapt`` itself (:func:`cervscan.training.adapt.adapt` with its defaults:
every candidate setting measured on the site's repeated folds, one chosen by the selection rule, the nested
estimate of that choice) and its learning curve (``adapt``'s own): for each size n, ``--draws`` draws of n of
the site's decided patients (stratified: classes in the site's proportion, at least 2 each), the chosen
setting's regression fitted on them (local only, or pooled with the site's pool of other patients) and scored on
the site's patients not drawn; "all" is the chosen setting's 5-fold x 3 cross-validated AUC (optimistic by the
choice among the candidates; the nested AUC beside it is not).

- ``via-visits``: the 91 naked-eye VIA patients; pool = the shipped training patients' features
  (``weights/classifier-training-features.npz``: the 199 patients of ``visits/``, colposcopy). The shipped
  models never saw a VIA image.
- ``annocerv``: the AnnoCerv patients of ``visits/`` (their folders linked, so the cached features are read);
  pool = the IARC colposcopy bank patients of ``visits/`` only (``source`` of ``visits/labels.csv``), their mean
  features from the same cached extraction at the frozen recipe's settings, written as a training-features file
  by :func:`cervscan.training.classifier.write_training_features` (as the shipped one). The decision never saw
  an AnnoCerv patient; the stage model and lesion segmenter that made the features did see AnnoCerv images,
  and the installed 2.0.0 decision adapt compares with was trained on these patients (its comparison is not
  meaningful here).

Features come from the frozen recipe's cache (``--cache-dir``: nothing is extracted when it is warm). Writes
``site_curve.json`` and each site's adapt run under ``--out``, ``benchmarks/site_curve.png`` and the
``site-curve`` block of ``benchmarks/RESULTS.md`` (``--no-write``: neither of the last two).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cervscan.files import read_labels  # noqa: E402
from cervscan.training.adapt import adapt  # noqa: E402
from cervscan.training.classifier import write_training_features  # noqa: E402
from cervscan.training.configs import AdaptConfig, DecisionTrainConfig  # noqa: E402
from cervscan.training.validation import ValidationFailed  # noqa: E402
from results_md import replace_block  # noqa: E402

START, END = "<!-- site-curve:start -->", "<!-- site-curve:end -->"
PNG = ROOT / "benchmarks" / "site_curve.png"


def split_site(name: str, visits: Path, labels: Path, site_source: str, pool_source: str, work: Path,
               cache_dir: str | None) -> dict:
    """A site of the patients of ``site_source`` (their visit folders linked under ``work``: the feature cache is
    keyed by the images' real paths) with a pool of the patients of ``pool_source`` (a training-features file)."""
    rows, _ = read_labels(labels)
    site = [r for r in rows if r["source"] == site_source and (visits / r["patient_id"]).is_dir()]
    root = work / name / "visits"
    root.mkdir(parents=True, exist_ok=True)
    for r in site:
        link = root / r["patient_id"]
        if not link.exists():
            link.symlink_to((visits / r["patient_id"]).resolve(), target_is_directory=True)
    lab = work / name / "labels.csv"
    with open(lab, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "label", "source"])
        w.writerows([(r["patient_id"], r["label"], r["source"]) for r in site])
    pool = work / name / "pool-features.npz"
    cfg = DecisionTrainConfig(visits=str(visits), labels=str(labels), out=str(work), cache_dir=cache_dir)
    meta, pats = write_training_features(cfg, pool, data=f"{visits} ({labels.name}), source {pool_source}",
                                         keep=lambda pid, src: src == pool_source)
    return {"name": name, "visits": str(root), "labels": str(lab), "training_features": str(pool),
            "pool": f"{meta['patients']} {pool_source} patients of {visits.name}/ ({int(pats.y.sum())} severe)"}


def run_site(site: dict, out: Path, *, sizes, draws: int, **given) -> dict:
    """``adapt`` on the site (its defaults, learning curve at ``sizes`` with ``draws`` draws; ``given``: other
    AdaptConfig settings) and what the curve needs of its metrics."""
    cfg = AdaptConfig(visits=site["visits"], labels=site["labels"], out=str(out / site["name"]),
                      training_features=site.get("training_features"), curve_sizes=tuple(sizes), curve_draws=draws,
                      **given)
    t0 = time.time()
    try:
        m = adapt(cfg)
    except ValidationFailed as e:  # the curve is there all the same
        m = e.metrics
    c = m["counts"]
    return {"site": site["name"], "pool": site["pool"], "patients": c["mildly_normal"] + c["severe"],
            "severe": c["severe"], "decided": m["patients"], "candidate": m["candidate"], "nested": m["nested"],
            "cv_auc": m["validation"]["auc"], "curve": m["learning_curve"], "seconds": time.time() - t0}


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    if "auc_p10" in row:
        return f"{row['auc_mean']:.3f} ({row['auc_p10']:.2f}–{row['auc_p90']:.2f})"
    return f"{row['auc_mean']:.3f} (CV)"


def block(results: list[dict], command: str, wall: float, sizes, draws: int) -> str:
    """The ``site-curve`` block of RESULTS.md."""
    lines = [START, f"## How many local patients are enough? (`{command}`)", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPU cores ({platform.machine()}), "
             f"torch threads {torch.get_num_threads()}, features cached; wall time {wall:.0f} s. Each site through "
             f"`cervscan adapt` (defaults: the candidates, the selection rule, the nested estimate) and its learning "
             f"curve: {draws} stratified draws of n of the site's decided patients per size, the chosen setting "
             f"fitted on them (local only, or pooled) and scored on the site's patients not drawn; mean AUC "
             f"(10th–90th percentile of the draws). 'all': the chosen setting's 5-fold x 3 cross-validated AUC "
             f"(optimistic by the choice); the nested AUC counts the choice. Method: `benchmarks/site_curve.py`.", "",
             "| new site | patients (severe) | decided | pool | adapt's choice | nested AUC (95 % CI) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        n = r["nested"]
        est = f"{n['auc']:.3f} ({n['ci_low']:.2f}–{n['ci_high']:.2f})" if "auc" in n else "n/a"
        lines.append(f"| {r['site']} | {r['patients']} ({r['severe']}) | {r['decided']} | {r['pool']} | "
                     f"{r['candidate']} | {est} |")
    lines += ["", "| new site | fit | " + " | ".join(f"n = {s}" for s in sizes) + " | all |",
              "|---|---|" + "---|" * (len(sizes) + 1)]
    for r in results:
        for fit, rows in r["curve"].items():
            by = {x["train_patients"]: x for x in rows}
            allrow = next((x for x in rows if isinstance(x["train_patients"], str)), None)
            lines.append(f"| {r['site']} | {fit} | " + " | ".join(_cell(by.get(s)) for s in sizes)
                         + f" | {_cell(allrow)} |")
    lines += ["", "How new the sites are: the shipped models never saw a VIA image (`via-visits`); for `annocerv` the "
              "decision and its pool never saw an AnnoCerv patient, but the exam-stage model and the lesion segmenter "
              "that made the features were trained with AnnoCerv images, so it is less new than a real new site "
              "(and the installed decision adapt compares with was trained on these patients).", "",
              "![AUC against the site's labelled patients](site_curve.png)", "", END]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """One panel per site: mean AUC (and the draws' 10th–90th percentile) against the site's training patients."""
    import matplotlib  # lazy: matplotlib only for the picture

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        for fit, rows in r["curve"].items():
            xs = [row["train_patients"] if isinstance(row["train_patients"], int)
                  else int(row["train_patients"].split()[-1]) for row in rows]
            line, = ax.plot(xs, [row["auc_mean"] for row in rows], "o-", label=fit)
            drawn = [(n, row["auc_p10"], row["auc_p90"]) for n, row in zip(xs, rows) if "auc_p10" in row]
            if drawn:
                ax.fill_between([d[0] for d in drawn], [d[1] for d in drawn], [d[2] for d in drawn],
                                color=line.get_color(), alpha=0.15)
        if "auc" in r["nested"]:
            ax.axhline(r["nested"]["auc"], color="grey", ls="--", lw=1, label="nested AUC, all")
        ax.set(title=f"{r['site']} ({r['patients']} patients, {r['severe']} severe)",
               xlabel="site's training patients (last point: all, cross-validated)",
               ylabel="AUC on the site's other patients", ylim=(0.4, 1.0))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", default="10,20,40")
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "site-curve")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    sizes = [int(s) for s in a.sizes.split(",")]
    via = {"name": "via-visits", "visits": str(a.data / "via-visits"), "labels": str(a.data / "via-visits" / "labels.csv"),
           "training_features": None, "pool": "the shipped training patients (199 of visits/)"}
    anno = split_site("annocerv", a.data / "visits", a.data / "visits" / "labels.csv", "annocerv", "iarc-colpo-bank",
                      a.out / "sites", a.cache_dir)
    given = {"cache_dir": a.cache_dir, "threads": a.threads}
    results = [run_site(s, a.out, sizes=sizes, draws=a.draws, **given) for s in (via, anno)]
    wall = time.time() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "site_curve.json").write_text(json.dumps({"results": results, "seconds": wall}, indent=1, default=str))
    command = "python benchmarks/site_curve.py" + "".join(f" {x}" for x in (argv if argv is not None else sys.argv[1:]))
    print(block(results, command, wall, sizes, a.draws))
    if not a.no_write:
        plot(results, PNG)
        replace_block(START, END, block(results, command, wall, sizes, a.draws))
    return 0


if __name__ == "__main__":
    sys.exit(main())
