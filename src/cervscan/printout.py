"""What the commands print on the console: the run summary of ``screen``, the metrics of ``evaluate``, the
models of ``models list``; names (patient ids, paths) always shown as valid text, never read as markup.
No torch import."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cervscan.files import clean_text
from cervscan.training.validation import label_check_lines

#: What the console shows under every screening result.
DISCLAIMER = "cervscan assists a clinician; it does not diagnose."

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line, also in cron mail and logs


def shown(x) -> str:
    """Text from names (patient ids, paths, messages naming files) for the console: valid UTF-8 and never
    read as rich markup."""
    return escape(clean_text(str(x)))


def screen_summary(res) -> None:
    t = Table(title=f"cervscan screen -> {shown(res.out)}", caption=DISCLAIMER)
    t.add_column("patient", no_wrap=True, min_width=8)
    t.add_column("decision", no_wrap=True)
    for c in ("score", "threshold", "images decided on", "failed", "quality", "note"):
        t.add_column(c, overflow="fold")
    style = {"severe": "bold red", "mildly_normal": "green", "error": "yellow", "inadequate": "yellow"}
    order = {"severe": 0, "inadequate": 1, "error": 2}
    for p in sorted(res.patients, key=lambda p: (order.get(p["decision"], 3), p["patient_id"])):
        t.add_row(shown(p["patient_id"]), f"[{style.get(p['decision'], '')}]{p['decision']}[/]",
                  "" if p["score"] is None else f"{p['score']:.3f}", f"{p['threshold']:.3f}",
                  f"{p.get('n_eligible', p['n_used'])}/{p['n_images']}", str(p["n_failed"]), p.get("quality") or "",
                  shown("; ".join(x for x in (p.get("reason"), p.get("error")) if x)))
    console.print(t)
    m = res.run["models"]
    c = res.run["counts"]
    console.print("models: " + ", ".join(f"{role} {info['label']}" for role, info in m.items()) + "; "
                  f"{c['images']} images in {res.run['timings']['screen_s']:.1f}s "
                  f"({res.run['timings']['images_per_s']:.2f} img/s) on {res.run['device']}")
    if c["images_failed"] or c["skipped_files"]:
        console.print(f"[yellow]{c['images_failed']} image(s) failed, {c['skipped_files']} file(s) skipped: "
                      f"see images.csv and skipped.csv[/yellow]")
    if c.get("inadequate"):
        console.print(f"[yellow]{c['inadequate']} patient(s) inadequate (no eligible image): retake, see the "
                      f"reason column of patients.csv[/yellow]")
    if not res.run.get("quality_gate", True):
        console.print("[yellow]quality gate off (--no-quality-gate): every image was scored[/yellow]")


def metrics(m: dict) -> None:
    t = Table(title="patient-level metrics")
    for c in ("subset", "patients", "severe", "AUC [95% CI]", "sens", "spec", "acc"):
        t.add_column(c)

    def row(name, d):
        ci = d.get("ci95", {}).get("auc")
        auc = "n/a" if d.get("auc") is None else f"{d['auc']:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        t.add_row(name, str(d["patients"]), str(d["severe"]), auc, f"{d['sensitivity']:.3f}" if d.get("sensitivity") is not None else "n/a",
                  f"{d['specificity']:.3f}" if d.get("specificity") is not None else "n/a", f"{d['accuracy']:.3f}")

    row("all", m)
    for s, d in (m.get("by_source") or {}).items():
        row(s, d)
    console.print(t)
    console.print(f"threshold {m['threshold']:.3f}")
    if m.get("patients_inadequate"):
        console.print(f"[yellow]{m['patients_inadequate']} patient(s) inadequate (no eligible image), left out of "
                      "the metrics; see metrics.json 'inadequate'[/yellow]")
    labels_check(m.get("labels_check"))
    if m.get("not_in_cv_run"):
        console.print(f"[yellow]{len(m['not_in_cv_run'])} visit folder(s) are not in the --cv-run's folds.csv and "
                      f"were not evaluated: see metrics.json 'not_in_cv_run'[/yellow]")
    if (m.get("in_sample") or {}).get("note"):
        console.print(f"[yellow]in-sample: {m['in_sample']['note']}[/yellow]")


def labels_check(rec: dict | None) -> None:
    """Where the labels' findings (duplicates, labelled patients without a folder, folders without a label),
    named in the log above, are recorded."""
    n = len(label_check_lines(rec))
    if n:
        console.print(f"[yellow]labels: {n} finding(s), named above; recorded in metrics.json 'labels_check'[/yellow]")


def models_table(listing: dict) -> None:
    """``models list``: every shipped and installed model, and per role the one screening uses now."""
    t = Table(title="cervscan models")
    for c in ("role", "tag", "name", "version", "arch", "sha256", "in use"):
        t.add_column(c, no_wrap=c in ("role", "tag", "sha256", "in use"), overflow="fold")  # a tag is copied whole
    for r in listing["rows"]:
        t.add_row(r["role"], r["tag"], str(r.get("name", "")), str(r.get("version", "")), str(r.get("arch", "")),
                  r.get("sha256", "")[:12], "yes" if r["in_use"] else "")
    console.print(t)
    for role, (folder, src) in listing["active"].items():
        console.print(f"{role}: {src} {folder}")


class screen_progress:
    """``screen``'s progress bar on stderr (images done, images per second); ``with screen_progress() as cb``
    gives the callback ``api.screen`` calls."""

    def __enter__(self):
        self.prog = Progress(TextColumn("screening"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err_console,
                             transient=True)
        self.prog.__enter__()
        self.task = self.prog.add_task("images", total=None, rate="")
        self.t0 = time.time()
        return self.cb

    def cb(self, kind: str, done: int, total: int) -> None:
        el = time.time() - self.t0
        self.prog.update(self.task, completed=done, total=total,
                         rate=f"{done / el:.1f} img/s" if el > 0 and done else "")

    def __exit__(self, *a):
        return self.prog.__exit__(*a)
