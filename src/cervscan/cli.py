"""The ``cervscan`` command line: a thin Typer layer over ``cervscan.api``.

Heavy modules (torch, timm, smp) are imported inside command bodies only, so
``cervscan --help`` answers at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from cervscan import __version__
from cervscan.errors import CervscanError

EXIT_CODES = (
    "[b]Exit codes:[/b] 0 all screened and decided; 3 finished but some images or patients failed; "
    "5 finished, nothing failed, but some patients are inadequate (no eligible image: retake); "
    "3 wins over 5 when both apply; 1 error (no model, unwritable output, bad config, ...); 2 usage error."
)
DISCLAIMER = "cervscan assists a clinician; it does not diagnose."

app = typer.Typer(
    name="cervscan",
    help=f"Colposcopy screening decision support: per-patient 'severe' / 'mildly normal' with evidence. {DISCLAIMER}",
    epilog=EXIT_CODES,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
)
models_app = typer.Typer(help="List, install, verify and roll back models.", no_args_is_help=True,
                         context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(models_app, name="models")

console = Console()
err_console = Console(stderr=True)

GLIBC_TUNE = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"


def _version(value: bool) -> None:
    if value:
        console.print(f"cervscan {__version__}")
        raise typer.Exit()


def _setup_logging(verbose: bool, quiet: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)],
                        force=True)
    logging.getLogger("cervscan").setLevel(logging.DEBUG if verbose else (logging.ERROR if quiet else logging.INFO))


def _shown(x) -> str:
    """Text from names (patient ids, paths, messages naming files) for the console: valid UTF-8 and never
    read as rich markup."""
    from rich.markup import escape

    from cervscan.files import clean_text

    return escape(clean_text(str(x)))


def _fail(e: Exception) -> None:
    err_console.print(f"[red]error:[/red] {_shown(e)}")
    raise typer.Exit(1) from None


def _fast_malloc_reexec() -> None:
    """Keep glibc from unmapping and re-mapping large activation buffers every training
    step; the setting must be in the environment before the process starts, so re-exec once."""
    if sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ and not os.environ.get("CERVSCAN_NO_REEXEC"):
        env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNE, CERVSCAN_NO_REEXEC="1")
        try:
            os.execve(sys.executable, [sys.executable, "-m", "cervscan", *sys.argv[1:]], env)
        except OSError:
            pass


@app.callback()
def main_callback(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Show the version and exit.")] = None,
) -> None:
    """cervscan: colposcopy screening decision support."""


# --------------------------------------------------------------------------- screen

def _overrides(threshold, weights, brightness, brightness_from_flipped, variants, crop=None,
               no_quality_gate: bool = False) -> dict:
    from cervscan.config import CROP_MODES, parse_variants, parse_weights

    o: dict = {}
    if no_quality_gate:
        o["quality_gate"] = False
    if crop is not None:
        if crop not in CROP_MODES:
            raise CervscanError(f"--crop must be one of {', '.join(CROP_MODES)}, not {crop!r}")
        o["crop"] = crop
    if threshold is not None:
        o["threshold"] = threshold
    if weights:
        o["weights"] = parse_weights(weights)
    if brightness is not None:
        o["brightness"] = brightness
    if brightness_from_flipped is not None:
        o["brightness_from_flipped"] = brightness_from_flipped
    if variants:
        o["variants"] = parse_variants(variants)
    return o


def _pipeline_kwargs(seg_model, cls_model, cervix_model, stage_model, no_stage, config, device, overrides) -> dict:
    """The model, configuration and device arguments that screen, evaluate and batch pass to ``api`` alike."""
    return {"seg_model": seg_model, "cls_model": cls_model, "cervix_model": cervix_model, "stage_model": stage_model,
            "use_stage": not no_stage, "config_file": config, "overrides": overrides, "device": device}


SegOpt = Annotated[Optional[str], typer.Option("--seg-model", envvar="CERVSCAN_SEG_MODEL",
                                               help="Segmenter checkpoint (file or run folder).")]
ClsOpt = Annotated[Optional[str], typer.Option("--cls-model", envvar="CERVSCAN_CLS_MODEL",
                                               help="Classifier checkpoint (file or run folder).")]
CervixOpt = Annotated[Optional[str], typer.Option("--cervix-model", envvar="CERVSCAN_CERVIX_MODEL",
                                                  help="Cervix finder checkpoint (file or run folder).")]
StageOpt = Annotated[Optional[str], typer.Option("--stage-model", envvar="CERVSCAN_STAGE_MODEL",
                                                 help="Exam-stage model checkpoint (file or run folder).")]
CropOpt = Annotated[Optional[str], typer.Option("--crop", help="What the models look at: cervix (cervix finder; centre crop when none is found) | centre | frame. Default: what the classifier was trained on.")]
NoStageOpt = Annotated[bool, typer.Option("--no-stage", help="Do not run the exam-stage model.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", envvar="CERVSCAN_DEVICE", help="auto | cpu | cuda | cuda:N (default auto)")]
ThresholdOpt = Annotated[Optional[float], typer.Option("--threshold", help="Decision threshold on the score (default: the classifier's operating point).")]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", help="Six voting weights v1..v6, comma-separated.")]
BrightOpt = Annotated[Optional[float], typer.Option("--brightness", help="Brightness factor of variants 5 and 6.")]
BrightFlipOpt = Annotated[Optional[bool], typer.Option("--brightness-from-flipped/--brightness-from-unflipped",
                                                       help="Build variants 5/6 from the flipped images.")]
VariantsOpt = Annotated[Optional[str], typer.Option("--variants", help="all | original | original+segmented | comma list of variant names.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="JSON or TOML file with screening settings.")]
NoGateOpt = Annotated[bool, typer.Option("--no-quality-gate", help="Score every image, also blurred, badly exposed, "
                                         "wrong-stage or cervix-less ones (research; recorded in run.json).")]


@app.command(epilog=EXIT_CODES)
def screen(
    paths: Annotated[list[Path], typer.Argument(help="Visit folder(s), or folder(s) of visit folders.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")] = Path("cervscan-out"),
    seg_model: SegOpt = None,
    cls_model: ClsOpt = None,
    cervix_model: CervixOpt = None,
    stage_model: StageOpt = None,
    crop: CropOpt = None,
    no_stage: NoStageOpt = False,
    device: DeviceOpt = None,
    threshold: ThresholdOpt = None,
    weights: WeightsOpt = None,
    brightness: BrightOpt = None,
    brightness_from_flipped: BrightFlipOpt = None,
    variants: VariantsOpt = None,
    config: ConfigOpt = None,
    no_quality_gate: NoGateOpt = False,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Image-decoding worker processes (default 0: one decoding thread, no extra process).")] = None,
    no_masks: Annotated[bool, typer.Option("--no-masks", help="Do not write masks/ and overlays/.")] = False,
    report: Annotated[bool, typer.Option("--report", help="Also write PDF reports (cervscan report).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON on stdout.")] = False,
) -> None:
    """Screen visit folders: exam stage, cervix, lesion, six variants, vote, decide per patient.

    Writes OUT/patients.csv, OUT/images.csv, OUT/masks/, OUT/cervix/, OUT/overlays/, OUT/skipped.csv and OUT/run.json.
    """
    _setup_logging(verbose, quiet or as_json)
    from cervscan import api

    try:
        ov = _overrides(threshold, weights, brightness, brightness_from_flipped, variants, crop, no_quality_gate)
    except CervscanError as e:  # a malformed --variants / --weights value is a usage error (exit 2)
        raise typer.BadParameter(str(e)) from None
    try:
        kw = dict(_pipeline_kwargs(seg_model, cls_model, cervix_model, stage_model, no_stage, config, device, ov),
                  num_workers=workers, write_masks=not no_masks, write_overlays=not no_masks)
        if quiet or as_json:
            res = api.screen(paths, out, **kw)
        else:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(TextColumn("screening"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err_console,
                          transient=True) as prog:
                task = prog.add_task("images", total=None, rate="")
                import time as _t

                t0 = _t.time()

                def cb(kind, done, total):
                    el = _t.time() - t0
                    prog.update(task, completed=done, total=total,
                                rate=f"{done / el:.1f} img/s" if el > 0 and done else "")

                res = api.screen(paths, out, **kw, progress=cb)
        if report:
            api.report(Path(out), config_file=config, clinic=os.environ.get("CERVSCAN_CLINIC"))
    except CervscanError as e:
        if as_json:  # the caller still gets a JSON answer
            sys.stdout.write(json.dumps({"out": str(out), "error": str(e), "exit_code": 1}) + "\n")
        _fail(e)
    except Exception as e:
        if as_json:
            sys.stdout.write(json.dumps({"out": str(out), "error": f"{type(e).__name__}: {e}", "exit_code": 1}) + "\n")
        raise
    if as_json:
        sys.stdout.write(json.dumps(res.summary(), indent=2, default=str) + "\n")
    elif not quiet:
        _print_summary(res)
    raise typer.Exit(res.exit_code)


def _print_summary(res) -> None:
    from rich.table import Table

    t = Table(title=f"cervscan screen -> {_shown(res.out)}", caption=DISCLAIMER)
    t.add_column("patient", no_wrap=True, min_width=8)
    t.add_column("decision", no_wrap=True)
    for c in ("score", "threshold", "images decided on", "failed", "quality", "note"):
        t.add_column(c, overflow="fold")
    style = {"severe": "bold red", "mildly_normal": "green", "error": "yellow", "inadequate": "yellow"}
    order = {"severe": 0, "inadequate": 1, "error": 2}
    for p in sorted(res.patients, key=lambda p: (order.get(p["decision"], 3), p["patient_id"])):
        t.add_row(_shown(p["patient_id"]), f"[{style.get(p['decision'], '')}]{p['decision']}[/]",
                  "" if p["score"] is None else f"{p['score']:.3f}", f"{p['threshold']:.3f}",
                  f"{p.get('n_eligible', p['n_used'])}/{p['n_images']}", str(p["n_failed"]), p.get("quality") or "",
                  _shown("; ".join(x for x in (p.get("reason"), p.get("error")) if x)))
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


# --------------------------------------------------------------------------- evaluate

@app.command(epilog=EXIT_CODES)
def evaluate(
    visits: Annotated[list[Path], typer.Argument(help="Folder(s) of visit folders.")],
    labels: Annotated[Path, typer.Option("--labels", help="CSV with patient_id,label (0/1), optional source.")],
    out: Annotated[Path, typer.Option("-o", "--out")] = Path("cervscan-eval"),
    seg_model: SegOpt = None,
    cls_model: ClsOpt = None,
    cervix_model: CervixOpt = None,
    stage_model: StageOpt = None,
    crop: CropOpt = None,
    no_stage: NoStageOpt = False,
    device: DeviceOpt = None,
    threshold: ThresholdOpt = None,
    weights: WeightsOpt = None,
    brightness: BrightOpt = None,
    brightness_from_flipped: BrightFlipOpt = None,
    variants: VariantsOpt = None,
    config: ConfigOpt = None,
    no_quality_gate: NoGateOpt = False,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 2000,
    cv_run: Annotated[Optional[Path], typer.Option("--cv-run", help="A 'train-cls --folds K' run: screen each patient with the fold model that did not see it (reproduces cross-validation).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Screen labelled visits and compare patient decisions with the labels (metrics.json, roc.png, ...)."""
    _setup_logging(False, quiet)
    from cervscan import api

    try:
        ov = _overrides(threshold, weights, brightness, brightness_from_flipped, variants, crop, no_quality_gate)
        m = api.evaluate(visits, labels, out, **_pipeline_kwargs(seg_model, cls_model, cervix_model, stage_model,
                                                                   no_stage, config, device, ov),
                         n_bootstrap=bootstrap, seed=seed, cv_run=cv_run)
    except CervscanError as e:
        _fail(e)
    if not quiet:
        _print_metrics(m)


def _print_metrics(m: dict) -> None:
    from rich.table import Table

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
    _print_labels_check(m.get("labels_check"))
    if m.get("not_in_cv_run"):
        console.print(f"[yellow]{len(m['not_in_cv_run'])} visit folder(s) are not in the --cv-run's folds.csv and "
                      f"were not evaluated: see metrics.json 'not_in_cv_run'[/yellow]")
    if (m.get("in_sample") or {}).get("note"):
        console.print(f"[yellow]in-sample: {m['in_sample']['note']}[/yellow]")


def _print_labels_check(rec: dict | None) -> None:
    """Where the labels' findings (duplicates, labelled patients without a folder, folders without a label),
    named in the log above, are recorded."""
    from cervscan.training.validation import label_check_lines

    n = len(label_check_lines(rec))
    if n:
        console.print(f"[yellow]labels: {n} finding(s), named above; recorded in metrics.json 'labels_check'[/yellow]")


TRAIN_EXIT_CODES = (
    "[b]Exit codes:[/b] 0 trained, and the classifier is better than chance on held-out patients (or --force "
    "kept one that is not); 6 the classifier failed its validation (the 95% CI of its held-out patient AUC "
    "includes 0.5 or lies below it): no model.pt written, metrics.json says why; 1 error; 2 usage error."
)
ForceTrainOpt = Annotated[bool, typer.Option("--force", help="Write model.pt even when the classifier is no better "
                                             "than chance on held-out patients (recorded in it as forced; "
                                             "'models install' still refuses it without --force).")]


def _validation_result(m: dict) -> None:
    """After a training run that wrote its model: the validation, in red when it failed and was forced."""
    from cervscan.training.validation import describe

    v = m.get("validation")
    if not v:
        return
    if v["passed"]:
        console.print(f"[green]validation: {describe(v)}[/green]")
    else:
        err_console.print(f"[bold red]validation FAILED, model kept because of --force: {describe(v)}. "
                          f"Do not use it to screen.[/bold red]")


def _fail_validation(e) -> None:
    from cervscan.errors import EXIT_NOT_VALIDATED

    err_console.print(f"[bold red]error: {e}[/bold red]")
    raise typer.Exit(EXIT_NOT_VALIDATED) from None


# --------------------------------------------------------------------------- training

@app.command("train-seg")
def train_seg_cmd(
    data: Annotated[Path, typer.Argument(help="Folder with images/ and masks/ (optionally train/ and val/).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Run folder.")],
    encoder: Annotated[str, typer.Option(help="smp encoder name.")] = "tu-tf_efficientnet_lite0",
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="ImageNet EfficientNet-Lite0 encoder weights (offline package).")] = True,
    init: Annotated[Optional[Path], typer.Option("--init", help="Fine-tune from this segmenter checkpoint.")] = None,
    epochs: Annotated[int, typer.Option()] = 30,
    batch_size: Annotated[int, typer.Option()] = 8,
    lr: Annotated[float, typer.Option()] = 1e-3,
    input_size: Annotated[int, typer.Option()] = 256,
    val_fraction: Annotated[float, typer.Option()] = 0.2,
    group_regex: Annotated[str, typer.Option(help="Regex whose group 1 is the patient id in a file stem.")] = r"^(C\d+)",
    seed: Annotated[int, typer.Option()] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in OUT.")] = False,
    compare: Annotated[Optional[Path], typer.Option("--compare", help="Another train-seg run folder to draw in iou.png.")] = None,
    stop_after: Annotated[int, typer.Option("--stop-after", help="Stop after this epoch (schedule still planned for --epochs); continue later with --resume.")] = 0,
    model_name: Annotated[str, typer.Option("--model-name", help="Name recorded in the checkpoint.")] = "cervscan-seg",
    model_version: Annotated[str, typer.Option("--model-version", help="Version recorded in the checkpoint.")] = "0.0.0-local",
    target: Annotated[str, typer.Option("--target", help="lesion (acetowhite lesion masks) or cervix (cervix outline masks: the cervix finder).")] = "lesion",
    color_jitter: Annotated[Optional[float], typer.Option("--color-jitter", help="Colour augmentation strength (default 0.25; 0.4 for --target cervix, whose flash-card training images have shifted colours).")] = None,
    images_csv: Annotated[Optional[Path], typer.Option("--images-csv", help="CSV with image,split[,kind,source]: rows with split train/val are used as given; 'open' rows are left out (default DATA/images.csv when present).")] = None,
    crop_cervix: Annotated[Optional[Path], typer.Option("--crop-cervix", help="Cervix finder checkpoint: train and validate on the cervix crop of each image, as screening does.")] = None,
    threads: Annotated[int, typer.Option("--threads", help="Torch threads (0 = torch's default).")] = 0,
    max_steps: Annotated[int, typer.Option(hidden=True)] = 0,
) -> None:
    """Train a U-Net++ segmenter: the lesion segmenter, or with --target cervix the cervix finder (Dice + BCE, Adam, validation IoU/Dice per epoch)."""
    _fast_malloc_reexec()
    _setup_logging(False, False)
    from cervscan import api

    cfg = dict(data=str(data), out=str(out), encoder=encoder, pretrained=pretrained and init is None,
                         init=str(init) if init else None, epochs=epochs, batch_size=batch_size, lr=lr,
                         input_size=input_size, val_fraction=val_fraction, group_regex=group_regex, seed=seed,
                         resume=resume, max_steps_per_epoch=max_steps, name=model_name, version=model_version,
                         stop_after=stop_after, target=target, threads=threads,
                         color_jitter=color_jitter if color_jitter is not None else (0.4 if target == "cervix" else 0.25),
                         images_csv=str(images_csv) if images_csv else None,
                         crop_cervix=str(crop_cervix) if crop_cervix else None)
    try:
        with _train_progress() as cb:
            m = api.train_seg(**cfg, progress=cb)
        if compare:
            import pandas as pd

            from cervscan.training.segmenter import plot_iou

            plot_iou([(out.name, pd.read_csv(out / "val_iou.csv").to_dict("records")),
                      (compare.name, pd.read_csv(compare / "val_iou.csv").to_dict("records"))], out / "iou.png")
    except CervscanError as e:
        _fail(e)
    console.print(f"best epoch {m['best_epoch']}: val IoU {m['val_mean_iou']:.4f}, Dice {m['val_mean_dice']:.4f} -> {out}/model.pt")


class _train_progress:
    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err_console)
        self.prog.__enter__()
        self.task = self.prog.add_task("epoch", total=None, info="")
        return self.cb

    def cb(self, ev: dict) -> None:
        if ev.get("phase") == "train":
            self.prog.update(self.task, description=f"epoch {ev['epoch']}/{ev['epochs']}{' ' + ev['fold'] if ev.get('fold') else ''}",
                             completed=ev["step"], total=ev["steps"], info=f"loss {ev['loss']:.4f}")
        elif ev.get("phase") == "val":
            self.prog.console.print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in ev.items() if k != "phase"))

    def __exit__(self, *a):
        return self.prog.__exit__(*a)


@app.command("train-cls", epilog=TRAIN_EXIT_CODES)
def train_cls_cmd(
    visits: Annotated[Path, typer.Argument(help="Folder of visit folders.")],
    labels: Annotated[Path, typer.Option("--labels", help="CSV patient_id,label[,source].")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Run folder.")],
    seg_model: SegOpt = None,
    images_csv: Annotated[Optional[Path], typer.Option("--images-csv", help="CSV patient_id,image,stage.")] = None,
    arch: Annotated[str, typer.Option(help="timm architecture.")] = "repvgg_a0",
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="ImageNet weights (tf_efficientnet_lite0 only, offline).")] = False,
    samples: Annotated[str, typer.Option(help="both | original | segmented: which images are training samples.")] = "both",
    epochs: Annotated[int, typer.Option()] = 12,
    batch_size: Annotated[int, typer.Option()] = 16,
    lr: Annotated[float, typer.Option()] = 1e-3,
    input_size: Annotated[int, typer.Option()] = 224,
    val_fraction: Annotated[float, typer.Option()] = 0.2,
    folds: Annotated[int, typer.Option(help="K-fold patient-wise cross-validation (0 = single split).")] = 0,
    full: Annotated[bool, typer.Option("--full", help="After validation, train the final model on all patients.")] = False,
    target_sensitivity: Annotated[float, typer.Option()] = 0.90,
    tune_votes: Annotated[bool, typer.Option("--tune-votes", help="Grid-search the six voting weights for patient AUC.")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    device: DeviceOpt = None,
    resume: Annotated[bool, typer.Option("--resume")] = False,
    model_name: Annotated[str, typer.Option("--model-name", help="Name recorded in the checkpoint.")] = "cervscan-cls",
    model_version: Annotated[str, typer.Option("--model-version", help="Version recorded in the checkpoint.")] = "0.0.0-local",
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Where segmented training images are cached.")] = None,
    head_std: Annotated[float, typer.Option("--head-std", help="Re-initialise the classification head with this standard deviation (0: the architecture's own init).")] = 0.0,
    crop: Annotated[str, typer.Option("--crop", help="What the classifier sees, as screening will: cervix (cervix finder crop) | centre | frame.")] = "cervix",
    cervix_model: CervixOpt = None,
    only_folds: Annotated[Optional[str], typer.Option("--only-folds", help="Train only these folds (comma list, 1-based; 0 = the all-patient model), e.g. to run folds in parallel processes; then run again with --resume for the metrics.")] = None,
    threads: Annotated[int, typer.Option("--threads", help="Torch threads (0 = torch's default).")] = 0,
    eval_epochs: Annotated[Optional[str], typer.Option("--eval-epochs", help="Comma-separated epochs after which the held-out patients are also scored (a learning curve in metrics.json; needs --folds or a split).")] = None,
    force: ForceTrainOpt = False,
    max_steps: Annotated[int, typer.Option(hidden=True)] = 0,
) -> None:
    """Train the classifier on original + segmented images with a patient-wise split; calibrate the operating point."""
    _fast_malloc_reexec()
    _setup_logging(False, False)
    from cervscan import api

    try:
        curve = tuple(sorted({int(e) for e in eval_epochs.split(",") if e.strip()})) if eval_epochs else ()
    except ValueError:
        _fail(CervscanError(f"--eval-epochs must be comma-separated whole numbers, not {eval_epochs!r}"))
    if any(e < 1 or e > epochs for e in curve):
        _fail(CervscanError(f"--eval-epochs must lie between 1 and --epochs ({epochs}), not {eval_epochs!r}"))
    from cervscan.config import CROP_MODES

    if crop not in CROP_MODES:
        _fail(CervscanError(f"--crop must be one of {', '.join(CROP_MODES)}, not {crop!r}"))
    try:
        only = tuple(sorted({int(x) for x in only_folds.split(",") if x.strip()})) if only_folds else ()
    except ValueError:
        _fail(CervscanError(f"--only-folds must be comma-separated whole numbers, not {only_folds!r}"))
    cfg = dict(crop=crop, cervix_model=cervix_model, only_folds=only, threads=threads,
                         eval_epochs=curve, head_std=head_std, visits=str(visits), labels=str(labels), out=str(out), seg_model=seg_model,
                         images_csv=str(images_csv) if images_csv else None, arch=arch, pretrained=pretrained,
                         samples=samples, epochs=epochs, batch_size=batch_size, lr=lr, input_size=input_size,
                         val_fraction=val_fraction, folds=folds, full=full, target_sensitivity=target_sensitivity,
                         tune_votes=tune_votes, seed=seed, device=device or "auto", resume=resume, max_steps_per_epoch=max_steps,
                         name=model_name, version=model_version, cache_dir=str(cache_dir) if cache_dir else None,
                         force=force)
    from cervscan.training.validation import ValidationFailed

    try:
        with _train_progress() as cb:
            m = api.train_cls(**cfg, progress=cb)
    except ValidationFailed as e:
        _fail_validation(e)
    except CervscanError as e:
        _fail(e)
    console.print_json(json.dumps(m.get("summary", {}), default=str))
    _validation_result(m)


@app.command("train-decision", epilog=TRAIN_EXIT_CODES)
def train_decision_cmd(
    visits: Annotated[Path, typer.Argument(help="Folder of visit folders.")],
    labels: Annotated[Path, typer.Option("--labels", help="CSV patient_id,label[,source].")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Run folder.")],
    backbone: Annotated[str, typer.Option(help="Frozen ImageNet backbone: lite0 | lite1 | lite2.")] = "lite0",
    input_size: Annotated[int, typer.Option(help="Classifier input size (px).")] = 384,
    classify_view: Annotated[str, typer.Option("--classify-view", help="The original views show the cervix crop (crop) or the whole image (frame); segmented views always come from the crop.")] = "crop",
    variants: Annotated[str, typer.Option(help="Screened variants: all | original | original+segmented, or a comma list.")] = "all",
    weights: Annotated[Optional[str], typer.Option(help="Six voting weights, comma-separated (default: the study's).")] = None,
    train_variants: Annotated[str, typer.Option("--train-variants", help="Variants whose patient features are training rows (comma list).")] = "original,segmented",
    stages: Annotated[str, typer.Option("--stages", help="Exam stages whose images decide (comma list).")] = "acetic",
    quality_gate: Annotated[bool, typer.Option("--quality-gate/--no-quality-gate", help="Train and cross-validate on the images the quality gate accepts (default), or on every image (to measure the gate's effect).")] = True,
    c: Annotated[float, typer.Option("--C", help="Inverse regularisation strength of the logistic regression.")] = 0.01,
    folds: Annotated[int, typer.Option(help="Patient-wise cross-validation folds.")] = 5,
    repeats: Annotated[int, typer.Option(help="Repeats of the cross-validation (seeds seed, seed+1, ...).")] = 3,
    seed: Annotated[int, typer.Option()] = 0,
    target_sensitivity: Annotated[float, typer.Option()] = 0.90,
    seg_model: SegOpt = None,
    cervix_model: CervixOpt = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Where image features are cached.")] = None,
    threads: Annotated[int, typer.Option("--threads", help="Torch threads (0 = torch's default).")] = 0,
    model_name: Annotated[str, typer.Option("--model-name", help="Name recorded in the checkpoint.")] = "cervscan-decision-lite0",
    model_version: Annotated[str, typer.Option("--model-version", help="Version recorded in the checkpoint.")] = "0.0.0-local",
    force: ForceTrainOpt = False,
) -> None:
    """Train the classifier the 2.0.0 way: frozen EfficientNet-Lite features of the screened inputs, a logistic
    regression over each patient's mean feature, repeated patient-wise cross-validation, calibration and the
    operating point; writes model.pt (install with 'cervscan models install') and the fold models."""
    _fast_malloc_reexec()
    _setup_logging(False, False)
    from cervscan import api
    from cervscan.config import STAGES, VARIANT_NAMES, VARIANT_SETS

    vs = VARIANT_SETS.get(variants) or tuple(v.strip() for v in variants.split(",") if v.strip())
    tv = tuple(v.strip() for v in train_variants.split(",") if v.strip())
    st = tuple(s.strip() for s in stages.split(",") if s.strip())
    bad = [v for v in (*vs, *tv) if v not in VARIANT_NAMES] + [s for s in st if s not in STAGES]
    if bad or not vs or not tv or not st:
        _fail(CervscanError(f"unknown or empty variants/stages: {bad or 'empty list'}; variants: "
                            f"{', '.join(VARIANT_NAMES)}; stages: {', '.join(STAGES)}"))
    try:
        w = tuple(float(x) for x in weights.split(",")) if weights else None
    except ValueError:
        _fail(CervscanError(f"--weights must be six comma-separated numbers, not {weights!r}"))
    if w is not None and len(w) != 6:
        _fail(CervscanError(f"--weights needs 6 values, got {len(w)}"))
    if classify_view not in ("crop", "frame"):
        _fail(CervscanError(f"--classify-view must be crop or frame, not {classify_view!r}"))
    kw = dict(visits=str(visits), labels=str(labels), out=str(out), backbone=backbone, input_size=input_size,
              classify_view=classify_view, quality_gate=quality_gate,
              variants=vs, train_variants=tv, decision_stages=st, C=c, folds=folds, repeats=repeats, seed=seed,
              target_sensitivity=target_sensitivity, seg_model=seg_model, cervix_model=cervix_model,
              cache_dir=str(cache_dir) if cache_dir else None, threads=threads, name=model_name,
              version=model_version, force=force)
    if w is not None:
        kw["weights"] = w
    from cervscan.training.validation import ValidationFailed

    try:
        m = api.train_decision(**kw)
    except ValidationFailed as e:
        _fail_validation(e)
    except CervscanError as e:
        _fail(e)
    op = m["operating_point"]
    v = m["validation"]
    console.print(f"cross-validated patient AUC {m['auc_mean_of_repeats']:.3f} (95% CI {v['ci_low']:.3f}-"
                  f"{v['ci_high']:.3f}; repeats " + ", ".join(f"{a:.3f}" for a in m["auc_repeats"])
                  + f"); threshold {op['threshold']:.3f}, chosen on these out-of-fold scores (in-sample): "
                  f"sensitivity {m['sensitivity_mean_of_repeats']:.2f}, specificity {m['specificity_mean_of_repeats']:.2f}"
                  f" -> {out}/model.pt")
    _validation_result(m)


@app.command("train-stage")
def train_stage_cmd(
    visits: Annotated[Path, typer.Argument(help="Folder of visit folders with images.csv (patient_id,image,stage).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Run folder.")],
    images_csv: Annotated[Optional[Path], typer.Option("--images-csv", help="Stage table (default VISITS/images.csv).")] = None,
    folds: Annotated[int, typer.Option(help="Patient-wise cross-validation folds for the accuracy report.")] = 5,
    c: Annotated[float, typer.Option("--C", help="Inverse regularisation strength of the logistic regression.")] = 0.01,
    seed: Annotated[int, typer.Option()] = 0,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Where frozen image features are cached.")] = None,
    threads: Annotated[int, typer.Option("--threads", help="Torch threads (0 = torch's default).")] = 0,
    model_name: Annotated[str, typer.Option("--model-name", help="Name recorded in the checkpoint.")] = "cervscan-stage-lite0",
    model_version: Annotated[str, typer.Option("--model-version", help="Version recorded in the checkpoint.")] = "0.0.0-local",
) -> None:
    """Train the exam-stage model (acetic, lugol, green, saline, other): frozen EfficientNet-Lite0 features + logistic regression."""
    _setup_logging(False, False)
    from cervscan import api

    try:
        m = api.train_stage(visits=str(visits), out=str(out), images_csv=str(images_csv) if images_csv else None,
                            folds=folds, C=c, seed=seed, cache_dir=str(cache_dir) if cache_dir else None,
                            threads=threads, name=model_name, version=model_version)
    except CervscanError as e:
        _fail(e)
    console.print(f"cross-validated accuracy {m['accuracy']:.3f} (balanced {m['balanced_accuracy']:.3f}); "
                  + ", ".join(f"{k} {v['recall']:.2f}" for k, v in m["per_class"].items() if v["recall"] is not None)
                  + f" -> {out}/model.pt")


# --------------------------------------------------------------------------- batch

@app.command(epilog=EXIT_CODES + " For batch they count the visits screened in this run; also: 4 another batch "
                                 "run holds OUT's lock (see --wait).")
def batch(
    root: Annotated[Path, typer.Argument(help="Folder that receives one visit folder per patient (it may grow every day).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder; one per ROOT (the run journal lives in OUT/.cervscan/).")] = Path("cervscan-batch"),
    seg_model: SegOpt = None,
    cls_model: ClsOpt = None,
    cervix_model: CervixOpt = None,
    stage_model: StageOpt = None,
    crop: CropOpt = None,
    no_stage: NoStageOpt = False,
    device: DeviceOpt = None,
    threshold: ThresholdOpt = None,
    weights: WeightsOpt = None,
    brightness: BrightOpt = None,
    brightness_from_flipped: BrightFlipOpt = None,
    variants: VariantsOpt = None,
    config: ConfigOpt = None,
    no_quality_gate: NoGateOpt = False,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Image-decoding worker processes (default 0: one decoding thread).")] = None,
    no_masks: Annotated[bool, typer.Option("--no-masks", help="Do not write masks/ and overlays/.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for a run that holds OUT's lock instead of exiting with code 4.")] = False,
    wait_timeout: Annotated[Optional[float], typer.Option("--wait-timeout", help="Give up waiting (exit 4) after this many seconds; implies --wait.")] = None,
    report: Annotated[bool, typer.Option("--report", help="Also write PDF reports of the new or changed visits, and the summary.")] = False,
    log_file: Annotated[Optional[Path], typer.Option("--log-file", help="Append a timestamped log of the run to this file.")] = None,
    csv_every: Annotated[int, typer.Option("--csv-every", min=0, help="Rewrite the CSVs after every N screened visits during the run (0: only at the end).")] = 20,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as one line of JSON on stdout.")] = False,
) -> None:
    """Nightly batch: screen only the new or changed visits of ROOT into OUT; earlier results stay.

    Incremental (a visit is screened again when its images, the models or the configuration change), crash-safe
    (a journal in OUT/.cervscan/batch.sqlite; rerun after a crash), locked (one run per OUT). OUT/patients.csv and
    OUT/images.csv always hold every visit's latest result exactly once.
    """
    _setup_logging(verbose, quiet or as_json)
    from cervscan import api
    from cervscan.batch.nightly import BatchLockedError, log_to_file

    try:
        ov = _overrides(threshold, weights, brightness, brightness_from_flipped, variants, crop, no_quality_gate)
    except CervscanError as e:  # a malformed --variants / --weights value is a usage error (exit 2)
        raise typer.BadParameter(str(e)) from None

    def fail(e: Exception, code: int) -> None:
        if as_json:
            sys.stdout.write(json.dumps({"root": str(root), "out": str(out), "error": str(e), "exit_code": code}) + "\n")
        err_console.print(f"[red]error:[/red] {_shown(e)}")
        raise typer.Exit(code)

    console_level = logging.DEBUG if verbose else (logging.ERROR if quiet or as_json else logging.INFO)
    try:
        with log_to_file(log_file, console_level):
            res = api.batch(root, out, **_pipeline_kwargs(seg_model, cls_model, cervix_model, stage_model, no_stage,
                                                          config, device, ov),
                            num_workers=workers, write_masks=not no_masks,
                            write_overlays=not no_masks, wait=wait, wait_timeout=wait_timeout, report=report,
                            report_options={"clinic": os.environ.get("CERVSCAN_CLINIC"), "config_file": config},
                            csv_every=csv_every)
    except BatchLockedError as e:
        fail(e, BatchLockedError.exit_code)
    except CervscanError as e:
        fail(e, 1)
    except Exception as e:  # a bug: the JSON line still tells the caller the run stopped, then the traceback
        if as_json:
            sys.stdout.write(json.dumps({"root": str(root), "out": str(out), "error": f"{type(e).__name__}: {e}",
                                         "exit_code": 1}) + "\n")
        raise
    s = res.summary
    if s["failed"]:  # also with --quiet / --json: cron mails what reaches stderr
        err_console.print(f"[yellow]warning:[/yellow] {s['failed']} visit(s) failed "
                          f"({_shown(', '.join(s['failed_ids'][:20]))}{' ...' if s['failed'] > 20 else ''}); "
                          f"see {_shown(out / 'patients.csv')} and {_shown(out / 'images.csv')}")
    if as_json:
        sys.stdout.write(json.dumps(s, default=str) + "\n")
    elif not quiet:
        console.print(f"batch {_shown(root)} -> {_shown(out)}: {s['new']} new, {s['changed']} changed, "
                      f"{s['unchanged']} unchanged, "
                      f"{s['failed']} failed, {s['inadequate']} inadequate (retake), {s['removed']} removed (kept); "
                      f"{s['images']} image(s) in "
                      f"{s['duration_s']:.1f}s; {s['patients_total']} patient(s) in {_shown(out / 'patients.csv')}")
    raise typer.Exit(res.exit_code)


# --------------------------------------------------------------------------- report

@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="A 'cervscan screen' output folder.")],
    patient: Annotated[Optional[list[str]], typer.Option("--patient", help="Only this patient (repeatable).")] = None,
    clinic: Annotated[Optional[str], typer.Option("--clinic", envvar="CERVSCAN_CLINIC", help="Clinic name for the header.")] = None,
    exam_date: Annotated[Optional[str], typer.Option("--exam-date", help="Exam date (default: the images' file date).")] = None,
    page_size: Annotated[str, typer.Option("--page-size", help="a4 | letter")] = "a4",
    config: ConfigOpt = None,
) -> None:
    """Write PDF referral reports: OUT/reports/<patient>.pdf and OUT/reports/summary.pdf."""
    _setup_logging(False, False)
    try:
        from cervscan import api

        paths = api.report(out, patients=patient, clinic=clinic, exam_date=exam_date, page_size=page_size,
                              config_file=config)
    except CervscanError as e:
        _fail(e)
    except OSError as e:  # anything the report could not read or write, named, without a traceback
        _fail(CervscanError(f"{e.filename or out}: {e.strerror or e}"))
    for p in paths:
        console.print(str(p), markup=False, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- models

@models_app.command("list")
def models_list() -> None:
    """Installed and shipped models, and which ones 'screen' uses now."""
    from rich.table import Table

    from cervscan.models import registry as W

    try:
        rows = W.list_models()
        active = {}
        for role in W.ROLES:
            try:
                r = W.resolve(role)
                active[role] = (str(r.path.parent), r.source)
            except CervscanError as e:
                active[role] = ("", f"error: {e}")
    except CervscanError as e:
        _fail(e)
    t = Table(title="cervscan models")
    for c in ("role", "tag", "name", "version", "arch", "sha256", "in use"):
        t.add_column(c)
    for r in rows:
        use = active.get(r["role"], ("", ""))[0] == str(Path(r["folder"]))
        t.add_row(r["role"], r["tag"], str(r.get("name", "")), str(r.get("version", "")), str(r.get("arch", "")),
                  r.get("sha256", "")[:12], "yes" if use else "")
    console.print(t)
    for role, (folder, src) in active.items():
        console.print(f"{role}: {src} {folder}")


@models_app.command("install")
def models_install(
    runs: Annotated[list[Path], typer.Argument(help="train-seg / train-cls run folders (or model.pt files).")],
    name: Annotated[Optional[str], typer.Option(help="Tag prefix.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Also install a classifier whose recorded validation failed "
                                        "(no better than chance) or that records none.")] = False,
) -> None:
    """Install retrained model(s) as the default for 'screen' (user data dir, sha256 recorded).

    Each checkpoint is loaded fully first; a classifier must record a passed validation (better than chance
    on held-out patients), unless --force."""
    from cervscan.models import registry as W

    try:
        res = W.install(runs, name=name, force=force)
    except CervscanError as e:
        _fail(e)
    for role, info in res.items():
        console.print(f"installed {role}: {info['folder']} (sha256 {info['sha256'][:12]})")
        if info.get("forced"):
            err_console.print(f"[bold red]warning: {role} installed because of --force although {info['forced']}; "
                              f"'cervscan models rollback --role {role}' returns to the shipped one[/bold red]")


@models_app.command("rollback")
def models_rollback(
    role: Annotated[Optional[str], typer.Option(help="stage | cervix | segmenter | classifier (default all).")] = None,
) -> None:
    """Go back to the shipped models (installed files are kept)."""
    from cervscan.models import registry as W

    try:
        W.rollback(role)
    except CervscanError as e:
        _fail(e)
    console.print("screen now uses the shipped model(s)" + (f" for {role}" if role else ""))


@models_app.command("use")
def models_use(role: str, tag: str) -> None:
    """Make an installed model (by tag, see 'models list') the default again."""
    from cervscan.models import registry as W

    try:
        W.use(role, tag)
    except CervscanError as e:
        _fail(e)
    console.print(f"{role}: now {tag}")


@models_app.command("verify")
def models_verify() -> None:
    """Check the sha256 of every shipped and installed model."""
    from cervscan.models import registry as W

    bad = 0
    try:
        rows = W.list_models()
    except CervscanError as e:
        _fail(e)
    for r in rows:
        try:
            W.verify(Path(r["folder"]) / r["file"], r)
            console.print(f"[green]ok[/green] {r['role']} {r['tag']} {r['file']}")
        except CervscanError as e:
            bad += 1
            err_console.print(f"[red]FAIL[/red] {e}")
    raise typer.Exit(1 if bad else 0)


def main() -> None:
    app()
