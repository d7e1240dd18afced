"""The technician's commands: one ``train-*`` command per model role (``train-seg``, ``train-cls``,
``train-stage``; ``train-decision`` is a hidden, deprecated alias of ``train-cls``). Option defaults come from
the training configs (:mod:`cervscan.training.configs`): an option left out keeps the shipped recipe."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from cervscan.cli.common import (
    CacheDirOpt,
    CervixOpt,
    DeviceOpt,
    SegOpt,
    ThreadsOpt,
    _fail,
    _fast_malloc_reexec,
    _setup_logging,
    app,
)
from cervscan.config import CROP_MODES, STAGES, VARIANT_NAMES, VARIANT_SETS
from cervscan.errors import EXIT_NOT_VALIDATED, CervscanError
from cervscan.printout import console, err_console
from cervscan.training.configs import (
    SEG_TARGET_DEFAULTS,
    ClsTrainConfig,
    DecisionTrainConfig,
    SegTrainConfig,
    StageTrainConfig,
)
from cervscan.training.configs import default as _D
from cervscan.training.validation import ValidationFailed, describe

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
    v = m.get("validation")
    if not v:
        return
    if v["passed"]:
        console.print(f"[green]validation: {describe(v)}[/green]")
    else:
        err_console.print(f"[bold red]validation FAILED, model kept because of --force: {describe(v)}. "
                          f"Do not use it to screen.[/bold red]")


def _fail_validation(e) -> None:
    err_console.print(f"[bold red]error: {e}[/bold red]")
    raise typer.Exit(EXIT_NOT_VALIDATED) from None


# --------------------------------------------------------------------------- training

def _seg_defaults(field: str) -> str:
    """Help text: a train-seg default per target (the shipped recipes differ)."""
    vals = {t: SEG_TARGET_DEFAULTS[t].get(field, _D(SegTrainConfig, field)) for t in SEG_TARGET_DEFAULTS}
    return ", ".join(f"{v} (--target {t})" for t, v in vals.items()) if len(set(vals.values())) > 1 else str(vals["lesion"])


def _given(**opts) -> dict:
    """The options given on the command line (None: left out, so the training config's default applies)."""
    return {k: v for k, v in opts.items() if v is not None}


def _names(value: str | None, what: str, allowed, sets: dict | None = None) -> tuple[str, ...] | None:
    """A comma list (or a named set) of variants / stages, checked against ``allowed``."""
    if value is None:
        return None
    names = (sets or {}).get(value) or tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in names if v not in allowed]
    if bad or not names:
        _fail(CervscanError(f"{what}: unknown or empty {bad or 'list'}; one or more of {', '.join(allowed)}"))
    return names


def _numbers(value: str | None, what: str, kind=int) -> tuple | None:
    if value is None:
        return None
    try:
        return tuple(sorted({kind(x) for x in value.split(",") if x.strip()})) if kind is int else \
            tuple(kind(x) for x in value.split(","))
    except ValueError:
        _fail(CervscanError(f"{what} must be comma-separated numbers, not {value!r}"))


@app.command("train-seg")
def train_seg_cmd(
    data: Annotated[Path, typer.Argument(help="Folder with images/ and masks/ (optionally train/ and val/).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Run folder.")],
    target: Annotated[Optional[str], typer.Option("--target", help=f"lesion (acetowhite lesion masks) or cervix (cervix outline masks: the cervix finder). Default {_D(SegTrainConfig, 'target')}.")] = None,
    encoder: Annotated[Optional[str], typer.Option(help=f"smp encoder name. Default {_D(SegTrainConfig, 'encoder')}.")] = None,
    pretrained: Annotated[Optional[bool], typer.Option("--pretrained/--no-pretrained", help="ImageNet EfficientNet-Lite0 encoder weights (offline package; default on unless --init).")] = None,
    init: Annotated[Optional[Path], typer.Option("--init", help="Fine-tune from this segmenter checkpoint.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help=f"Default {_seg_defaults('epochs')}.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=f"Default {_D(SegTrainConfig, 'batch_size')}.")] = None,
    lr: Annotated[Optional[float], typer.Option(help=f"Default {_D(SegTrainConfig, 'lr')}.")] = None,
    input_size: Annotated[Optional[int], typer.Option(help=f"Default {_seg_defaults('input_size')}.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help=f"Default {_D(SegTrainConfig, 'val_fraction')}.")] = None,
    group_regex: Annotated[Optional[str], typer.Option(help=f"Regex whose group 1 is the patient id in a file stem. Default {_D(SegTrainConfig, 'group_regex')}.")] = None,
    seed: Annotated[Optional[int], typer.Option(help=f"Default {_D(SegTrainConfig, 'seed')}.")] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue an interrupted run in OUT.")] = None,
    compare: Annotated[Optional[Path], typer.Option("--compare", help="Another train-seg run folder to draw in iou.png.")] = None,
    stop_after: Annotated[Optional[int], typer.Option("--stop-after", help="Stop after this epoch (schedule still planned for --epochs); continue later with --resume.")] = None,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help=f"Name recorded in the checkpoint. Default {_seg_defaults('name')}.")] = None,
    model_version: Annotated[Optional[str], typer.Option("--model-version", help=f"Version recorded in the checkpoint. Default {_D(SegTrainConfig, 'version')}.")] = None,
    color_jitter: Annotated[Optional[float], typer.Option("--color-jitter", help=f"Colour augmentation strength. Default {_seg_defaults('color_jitter')}.")] = None,
    images_csv: Annotated[Optional[Path], typer.Option("--images-csv", help="CSV with image,split[,kind,source]: rows with split train/val are used as given; 'open' rows are left out (default DATA/images.csv when present).")] = None,
    crop_cervix: Annotated[Optional[Path], typer.Option("--crop-cervix", help="Cervix finder checkpoint: train and validate on the cervix crop of each image, as screening does.")] = None,
    threads: ThreadsOpt = None,
    max_steps: Annotated[Optional[int], typer.Option(hidden=True)] = None,
) -> None:
    """Train a U-Net++ segmenter: the lesion segmenter, or with --target cervix the cervix finder (Dice + BCE, Adam, validation IoU/Dice per epoch). Defaults: the shipped recipe of the target."""
    _fast_malloc_reexec()
    _setup_logging(False, False)
    from cervscan import api  # lazy: keeps cv2, PIL and reportlab out of --help

    cfg = _given(data=str(data), out=str(out), target=target, encoder=encoder,
                 pretrained=False if init is not None else pretrained, init=str(init) if init else None,
                 epochs=epochs, batch_size=batch_size, lr=lr, input_size=input_size, val_fraction=val_fraction,
                 group_regex=group_regex, seed=seed, resume=resume, max_steps_per_epoch=max_steps, name=model_name,
                 version=model_version, stop_after=stop_after, threads=threads, color_jitter=color_jitter,
                 images_csv=str(images_csv) if images_csv else None, crop_cervix=str(crop_cervix) if crop_cervix else None)
    try:
        with _train_progress() as cb:
            m = api.train_seg(**cfg, progress=cb)
        if compare:
            import pandas as pd  # lazy: pandas

            from cervscan.training.segmenter import plot_iou  # lazy: torch

            plot_iou([(out.name, pd.read_csv(out / "val_iou.csv").to_dict("records")),
                      (compare.name, pd.read_csv(compare / "val_iou.csv").to_dict("records"))], out / "iou.png")
    except CervscanError as e:
        _fail(e)
    console.print(f"best epoch {m['best_epoch']}: val IoU {m['val_mean_iou']:.4f}, Dice {m['val_mean_dice']:.4f} -> {out}/model.pt")


class _train_progress:
    def __enter__(self):
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


def _both(field: str) -> str:
    """Help text: a setting's default under each recipe."""
    f, t = _D(DecisionTrainConfig, field), _D(ClsTrainConfig, field)
    return f"Default {f}." if f == t else f"Default {f} (--recipe finetune: {t})."


_FROZEN = "[--recipe frozen] "
_TUNE = "[--recipe finetune] "


_TRAIN_CLS_HELP = ("Train the classifier. Default recipe (frozen, the shipped classifier's): frozen EfficientNet-Lite features of the screened inputs, a logistic regression over each patient's mean feature, repeated patient-wise cross-validation, calibration and the operating point. --recipe finetune fine-tunes a network end to end. Writes model.pt (install with 'cervscan models install') and the fold models.")


@app.command("train-cls", epilog=TRAIN_EXIT_CODES, help=_TRAIN_CLS_HELP)
def train_cls_cmd(
    visits: Annotated[Path, typer.Argument(help="Folder of visit folders.")],
    labels: Annotated[Path, typer.Option("--labels", help="CSV patient_id,label[,source].")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Run folder.")],
    recipe: Annotated[str, typer.Option("--recipe", help="frozen: frozen ImageNet EfficientNet-Lite features and a logistic regression per patient (the shipped classifier's recipe); finetune: fine-tune a timm network end to end.")] = "frozen",
    seg_model: SegOpt = None,
    cervix_model: CervixOpt = None,
    input_size: Annotated[Optional[int], typer.Option(help=f"Classifier input size (px). {_both('input_size')}")] = None,
    folds: Annotated[Optional[int], typer.Option(help=f"Patient-wise cross-validation folds (finetune: 0 = one validation split). {_both('folds')}")] = None,
    seed: Annotated[Optional[int], typer.Option(help=f"{_both('seed')}")] = None,
    target_sensitivity: Annotated[Optional[float], typer.Option(help=f"Operating point. {_both('target_sensitivity')}")] = None,
    cache_dir: CacheDirOpt = None,
    threads: ThreadsOpt = None,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help=f"Name recorded in the checkpoint. {_both('name')}")] = None,
    model_version: Annotated[Optional[str], typer.Option("--model-version", help=f"Version recorded in the checkpoint. {_both('version')}")] = None,
    force: ForceTrainOpt = False,
    backbone: Annotated[Optional[str], typer.Option(help=f"{_FROZEN}Frozen ImageNet backbone: lite0 | lite1 | lite2. Default {_D(DecisionTrainConfig, 'backbone')}.")] = None,
    classify_view: Annotated[Optional[str], typer.Option("--classify-view", help=f"{_FROZEN}The original views show the cervix crop (crop) or the whole image (frame); segmented views always come from the crop. Default {_D(DecisionTrainConfig, 'classify_view')}.")] = None,
    variants: Annotated[Optional[str], typer.Option(help=f"{_FROZEN}Screened variants: all | original | original+segmented, or a comma list. Default {'+'.join(_D(DecisionTrainConfig, 'variants'))}.")] = None,
    weights: Annotated[Optional[str], typer.Option(help=f"{_FROZEN}Six voting weights, comma-separated (default: the study's).")] = None,
    train_variants: Annotated[Optional[str], typer.Option("--train-variants", help=f"{_FROZEN}Variants whose patient features are training rows (comma list). Default {','.join(_D(DecisionTrainConfig, 'train_variants'))}.")] = None,
    stages: Annotated[Optional[str], typer.Option("--stages", help=f"{_FROZEN}Exam stages whose images decide (comma list). Default {','.join(_D(DecisionTrainConfig, 'decision_stages'))}.")] = None,
    quality_gate: Annotated[Optional[bool], typer.Option("--quality-gate/--no-quality-gate", help=f"{_FROZEN}Train and cross-validate on the images the quality gate accepts (default), or on every image (to measure the gate's effect).")] = None,
    c: Annotated[Optional[float], typer.Option("--C", help=f"{_FROZEN}Inverse regularisation strength of the logistic regression. Default {_D(DecisionTrainConfig, 'C')}.")] = None,
    repeats: Annotated[Optional[int], typer.Option(help=f"{_FROZEN}Repeats of the cross-validation (seeds seed, seed+1, ...). Default {_D(DecisionTrainConfig, 'repeats')}.")] = None,
    images_csv: Annotated[Optional[Path], typer.Option("--images-csv", help=f"{_TUNE}CSV patient_id,image,stage.")] = None,
    arch: Annotated[Optional[str], typer.Option(help=f"{_TUNE}timm architecture. Default {_D(ClsTrainConfig, 'arch')}.")] = None,
    pretrained: Annotated[Optional[bool], typer.Option("--pretrained/--no-pretrained", help=f"{_TUNE}ImageNet weights (tf_efficientnet_lite0 only, offline; default off).")] = None,
    samples: Annotated[Optional[str], typer.Option(help=f"{_TUNE}both | original | segmented: which images are training samples. Default {_D(ClsTrainConfig, 'samples')}.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help=f"{_TUNE}Default {_D(ClsTrainConfig, 'epochs')}.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=f"{_TUNE}Default {_D(ClsTrainConfig, 'batch_size')}.")] = None,
    lr: Annotated[Optional[float], typer.Option(help=f"{_TUNE}Default {_D(ClsTrainConfig, 'lr')}.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help=f"{_TUNE}Validation patients when --folds is 0. Default {_D(ClsTrainConfig, 'val_fraction')}.")] = None,
    full: Annotated[Optional[bool], typer.Option("--full", help=f"{_TUNE}After validation, train the final model on all patients.")] = None,
    tune_votes: Annotated[Optional[bool], typer.Option("--tune-votes", help=f"{_TUNE}Grid-search the six voting weights for patient AUC.")] = None,
    device: DeviceOpt = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help=f"{_TUNE}Continue an interrupted run in OUT.")] = None,
    head_std: Annotated[Optional[float], typer.Option("--head-std", help=f"{_TUNE}Re-initialise the classification head with this standard deviation (0: the architecture's own init).")] = None,
    crop: Annotated[Optional[str], typer.Option("--crop", help=f"{_TUNE}What the classifier sees, as screening will: cervix (cervix finder crop) | centre | frame. Default {_D(ClsTrainConfig, 'crop')}.")] = None,
    only_folds: Annotated[Optional[str], typer.Option("--only-folds", help=f"{_TUNE}Train only these folds (comma list, 1-based; 0 = the all-patient model), e.g. to run folds in parallel processes; then run again with --resume for the metrics.")] = None,
    eval_epochs: Annotated[Optional[str], typer.Option("--eval-epochs", help=f"{_TUNE}Comma-separated epochs after which the held-out patients are also scored (a learning curve in metrics.json).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(hidden=True)] = None,
) -> None:
    """``cervscan train-cls`` (help: :data:`_TRAIN_CLS_HELP`).

    Long: the Typer signature declares both recipes' options, one line each."""
    _fast_malloc_reexec()
    _setup_logging(False, False)
    from cervscan import api  # lazy: keeps cv2, PIL and reportlab out of --help

    w = _numbers(weights, "--weights", float)
    if w is not None and len(w) != 6:
        _fail(CervscanError(f"--weights needs 6 values, got {len(w)}"))
    curve = _numbers(eval_epochs, "--eval-epochs")
    if curve and any(e < 1 or e > (epochs or _D(ClsTrainConfig, "epochs")) for e in curve):
        _fail(CervscanError(f"--eval-epochs must lie between 1 and --epochs, not {eval_epochs!r}"))
    kw = _given(visits=str(visits), labels=str(labels), out=str(out), seg_model=seg_model, cervix_model=cervix_model,
                input_size=input_size, folds=folds, seed=seed, target_sensitivity=target_sensitivity,
                cache_dir=str(cache_dir) if cache_dir else None, threads=threads, name=model_name,
                version=model_version, force=force or None, backbone=backbone, classify_view=classify_view,
                variants=_names(variants, "--variants", VARIANT_NAMES, VARIANT_SETS), weights=w,
                train_variants=_names(train_variants, "--train-variants", VARIANT_NAMES),
                decision_stages=_names(stages, "--stages", STAGES), quality_gate=quality_gate, C=c, repeats=repeats,
                images_csv=str(images_csv) if images_csv else None, arch=arch, pretrained=pretrained,
                samples=samples, epochs=epochs, batch_size=batch_size, lr=lr, val_fraction=val_fraction, full=full,
                tune_votes=tune_votes, device=device, resume=resume, head_std=head_std, crop=crop,
                only_folds=_numbers(only_folds, "--only-folds"), eval_epochs=curve, max_steps_per_epoch=max_steps)
    _check_choice("--classify-view", classify_view, ("crop", "frame"))
    _check_choice("--crop", crop, CROP_MODES)
    try:
        if recipe == "finetune":
            with _train_progress() as cb:
                m = api.train_cls(recipe, **kw, progress=cb)
            console.print_json(json.dumps(m.get("summary", {}), default=str))
        else:
            m = api.train_cls(recipe, **kw)
            _print_frozen(m, out)
    except ValidationFailed as e:
        _fail_validation(e)
    except CervscanError as e:
        _fail(e)
    _validation_result(m)


def _check_choice(option: str, value, choices) -> None:
    if value is not None and value not in choices:
        _fail(CervscanError(f"{option} must be one of {', '.join(choices)}, not {value!r}"))


def _print_frozen(m: dict, out: Path) -> None:
    op = m["operating_point"]
    v = m["validation"]
    console.print(f"cross-validated patient AUC {m['auc_mean_of_repeats']:.3f} (95% CI {v['ci_low']:.3f}-"
                  f"{v['ci_high']:.3f}; repeats " + ", ".join(f"{a:.3f}" for a in m["auc_repeats"])
                  + f"); threshold {op['threshold']:.3f}, chosen on these out-of-fold scores (in-sample): "
                  f"sensitivity {m['sensitivity_mean_of_repeats']:.2f}, specificity {m['specificity_mean_of_repeats']:.2f}"
                  f" -> {out}/model.pt")


@app.command("train-decision", epilog=TRAIN_EXIT_CODES, hidden=True,
             help="Deprecated, to be removed: use 'cervscan train-cls' (the same command; --recipe frozen is its "
                  "default). " + _TRAIN_CLS_HELP)
@functools.wraps(train_cls_cmd)
def train_decision_cmd(**kwargs) -> None:
    """Deprecated: 'cervscan train-cls' (its default recipe, frozen)."""
    _fast_malloc_reexec()  # before the warning: the re-executed process prints it once
    err_console.print("[yellow]warning: 'train-decision' is deprecated and will be removed; use 'cervscan train-cls' "
                      "(--recipe frozen is its default)[/yellow]")
    train_cls_cmd(**{**kwargs, "recipe": "frozen"})


@app.command("train-stage")
def train_stage_cmd(
    visits: Annotated[Path, typer.Argument(help="Folder of visit folders with images.csv (patient_id,image,stage).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Run folder.")],
    images_csv: Annotated[Optional[Path], typer.Option("--images-csv", help="Stage table (default VISITS/images.csv).")] = None,
    folds: Annotated[Optional[int], typer.Option(help=f"Patient-wise cross-validation folds for the accuracy report. Default {_D(StageTrainConfig, 'folds')}.")] = None,
    c: Annotated[Optional[float], typer.Option("--C", help=f"Inverse regularisation strength of the logistic regression. Default {_D(StageTrainConfig, 'C')}.")] = None,
    seed: Annotated[Optional[int], typer.Option(help=f"Default {_D(StageTrainConfig, 'seed')}.")] = None,
    cache_dir: CacheDirOpt = None,
    threads: ThreadsOpt = None,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help=f"Name recorded in the checkpoint. Default {_D(StageTrainConfig, 'name')}.")] = None,
    model_version: Annotated[Optional[str], typer.Option("--model-version", help=f"Version recorded in the checkpoint. Default {_D(StageTrainConfig, 'version')}.")] = None,
) -> None:
    """Train the exam-stage model (acetic, lugol, green, saline, other): frozen EfficientNet-Lite0 features + logistic regression."""
    _setup_logging(False, False)
    from cervscan import api  # lazy: keeps cv2, PIL and reportlab out of --help

    try:
        m = api.train_stage(**_given(visits=str(visits), out=str(out), images_csv=str(images_csv) if images_csv else None,
                                     folds=folds, C=c, seed=seed, cache_dir=str(cache_dir) if cache_dir else None,
                                     threads=threads, name=model_name, version=model_version))
    except CervscanError as e:
        _fail(e)
    console.print(f"cross-validated accuracy {m['accuracy']:.3f} (balanced {m['balanced_accuracy']:.3f}); "
                  + ", ".join(f"{k} {v['recall']:.2f}" for k, v in m["per_class"].items() if v["recall"] is not None)
                  + f" -> {out}/model.pt")


