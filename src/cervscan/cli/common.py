"""What every command of the ``cervscan`` command line shares: the Typer app, the options declared once as
``Annotated`` aliases (:data:`SCREENING_OPTIONS` for screen, evaluate and batch), logging, the one way a
command calls :mod:`cervscan.api` and fails. No torch import: ``cervscan --help`` answers at once."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.logging import RichHandler

from cervscan import __version__
from cervscan.config import parse_set, parse_variants, parse_weights
from cervscan.errors import EXIT_ERROR, CervscanError
from cervscan.printout import DISCLAIMER, console, err_console
from cervscan.printout import shown as _shown

EXIT_CODES = (
    "[b]Exit codes:[/b] 0 all screened and decided; 3 finished but some images or patients failed; "
    "5 finished, nothing failed, but some patients are inadequate (no eligible image: retake); "
    "3 wins over 5 when both apply; 1 error (no model, unwritable output, bad config, ...); 2 usage error; "
    "4 (batch) another run holds OUT's lock; 6 (train-cls, adapt) the classifier is no better than chance."
)

app = typer.Typer(
    name="cervscan",
    help=f"Colposcopy screening decision support: per-patient 'severe' / 'mildly normal' with evidence. {DISCLAIMER}",
    epilog=EXIT_CODES,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
)

GLIBC_TUNE = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"


def _version(value: bool) -> None:
    if value:
        console.print(f"cervscan {__version__}")
        raise typer.Exit()


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)],
                        force=True)
    logging.getLogger("cervscan").setLevel(logging.DEBUG if verbose else (logging.ERROR if quiet else logging.INFO))


def _fail(e: Exception) -> None:
    err_console.print(f"[red]error:[/red] {_shown(e)}")
    raise typer.Exit(EXIT_ERROR) from None


def _api(function: str, /, *args, **kwargs):
    """``api.<function>(*args, **kwargs)``; a CervscanError ends the command with its message (exit 1)."""
    from cervscan import api  # lazy: keeps cv2, PIL and reportlab out of --help

    try:
        return getattr(api, function)(*args, **kwargs)
    except CervscanError as e:
        _fail(e)


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
SiteOpt = Annotated[Optional[Path], typer.Option(
    "--site", help="A 'cervscan adapt' run folder (RUN): screen with its model.pt as the classifier and its site.toml "
    "as the site settings (gate thresholds, decision stages, threshold; --config, --set and the named options go "
    "over them). Not with --cls-model.")]
NoGateOpt = Annotated[bool, typer.Option("--no-quality-gate", help="Score every image, also blurred, badly exposed, "
                                         "wrong-stage or cervix-less ones (research; recorded in run.json).")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", help="Any screening setting of a config file, e.g. --set min_sharpness=0.4 "
    "--set max_side=1024 (repeatable; checked as in the file; wins over --config; see the README's settings).")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", help="Image-decoding worker processes (default 0: one decoding thread, no extra process).")]
NoMasksOpt = Annotated[bool, typer.Option("--no-masks", help="Do not write masks/ and overlays/.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="Torch threads (default: torch's).")]
CacheDirOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help="Where image features and prepared images are "
                                                    "cached (default: the user cache folder).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v")]

#: The model, configuration and device options that screen, evaluate and batch share: name -> (type, default).
SCREENING_OPTIONS = {
    "seg_model": (SegOpt, None), "cls_model": (ClsOpt, None), "cervix_model": (CervixOpt, None),
    "stage_model": (StageOpt, None), "crop": (CropOpt, None), "no_stage": (NoStageOpt, False),
    "device": (DeviceOpt, None), "threshold": (ThresholdOpt, None), "weights": (WeightsOpt, None),
    "brightness": (BrightOpt, None), "brightness_from_flipped": (BrightFlipOpt, None),
    "variants": (VariantsOpt, None), "config": (ConfigOpt, None), "no_quality_gate": (NoGateOpt, False),
    "settings": (SetOpt, None), "site": (SiteOpt, None),
}


def _screening_options(command):
    """Give ``command`` the options of :data:`SCREENING_OPTIONS`, declared once, where its parameter ``opts``
    stands; the command receives them as one dict ``opts``."""
    sig = inspect.signature(command, eval_str=True)
    params = []
    for prm in sig.parameters.values():
        if prm.name != "opts":
            params.append(prm)
            continue
        params += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=ann, default=dflt)
                   for name, (ann, dflt) in SCREENING_OPTIONS.items()]
        params.append(inspect.Parameter("screening_ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                        annotation=typer.Context, default=None))  # where each option came from

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        ctx = kwargs.pop("screening_ctx", None)
        opts = {name: kwargs.pop(name) for name in SCREENING_OPTIONS}
        opts["from_env"] = {name for name in SCREENING_OPTIONS
                            if ctx is not None and getattr(ctx.get_parameter_source(name), "name", "") == "ENVIRONMENT"}
        return command(*args, opts=opts, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return wrapper


def _screening_kwargs(opts: dict) -> dict:
    """The keyword arguments that screen, evaluate and batch pass to ``api`` alike: models, site, config file,
    device and the settings given as options (named ones and ``--set``). A malformed ``--weights``, ``--variants``
    or ``--set``, a setting given twice, or ``--site`` with ``--cls-model`` is a usage error (exit 2; ``--site``
    wins over ``$CERVSCAN_CLS_MODEL``); values are checked against the settings table by ``api`` (exit 1, naming
    the option), and so are the site's files."""
    try:
        return _parse_screening(opts)
    except CervscanError as e:
        raise typer.BadParameter(str(e)) from None


def _parse_screening(opts: dict) -> dict:
    cls_model = opts["cls_model"]
    if opts["site"] and cls_model:
        if "cls_model" not in opts.get("from_env", ()):
            raise CervscanError(f"--site {opts['site']} and --cls-model {cls_model}: give one (--site screens with "
                                f"{Path(opts['site']) / 'model.pt'}, the classifier its site.toml belongs to)")
        cls_model = None  # --site, an option, wins over $CERVSCAN_CLS_MODEL
    o: dict = parse_set(opts["settings"])
    named = {"quality_gate": False if opts["no_quality_gate"] else None, "crop": opts["crop"],
             "threshold": opts["threshold"], "weights": parse_weights(opts["weights"]) if opts["weights"] else None,
             "brightness": opts["brightness"], "brightness_from_flipped": opts["brightness_from_flipped"],
             "variants": parse_variants(opts["variants"]) if opts["variants"] else None}
    for key, value in named.items():
        if value is not None:
            if key in o:
                raise CervscanError(f"{key} given twice: by --set {key} and by its own option")
            o[key] = value
    return {"seg_model": opts["seg_model"], "cls_model": cls_model, "cervix_model": opts["cervix_model"],
            "stage_model": opts["stage_model"], "use_stage": not opts["no_stage"], "config_file": opts["config"],
            "overrides": o, "device": opts["device"], "site": opts["site"]}


