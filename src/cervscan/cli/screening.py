"""The clinic's commands: ``screen``, ``evaluate``, ``batch`` and ``report``; each parses, calls one
:mod:`cervscan.api` function and prints."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cervscan import printout
from cervscan.cli.common import (
    EXIT_CODES,
    ConfigOpt,
    NoMasksOpt,
    QuietOpt,
    VerboseOpt,
    WorkersOpt,
    _api,
    _fail,
    _screening_kwargs,
    _screening_options,
    _setup_logging,
    _shown,
    app,
)
from cervscan.errors import EXIT_ERROR, BatchLockedError, CervscanError
from cervscan.printout import console, err_console


@app.command(epilog=EXIT_CODES)
@_screening_options
def screen(
    paths: Annotated[list[Path], typer.Argument(help="Visit folder(s), or folder(s) of visit folders.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")] = Path("cervscan-out"),
    opts: dict = None,  # type: ignore[assignment] - SCREENING_OPTIONS
    workers: WorkersOpt = None,
    no_masks: NoMasksOpt = False,
    report: Annotated[bool, typer.Option("--report", help="Also write PDF reports (cervscan report).")] = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON on stdout.")] = False,
) -> None:
    """Screen visit folders: exam stage, cervix, lesion, six variants, vote, decide per patient.

    Writes OUT/patients.csv, OUT/images.csv, OUT/masks/, OUT/cervix/, OUT/overlays/, OUT/skipped.csv and OUT/run.json.
    """
    _setup_logging(verbose, quiet or as_json)
    from cervscan import api  # lazy: keeps cv2, PIL and reportlab out of --help

    kw = _screening_kwargs(opts)  # a malformed --variants / --weights / --set, or --site with --cls-model: exit 2
    kw |= {"num_workers": workers, "write_masks": not no_masks, "write_overlays": not no_masks}
    try:
        if quiet or as_json:
            res = api.screen(paths, out, **kw)
        else:
            with printout.screen_progress() as cb:
                res = api.screen(paths, out, **kw, progress=cb)
        if report:
            api.report(Path(out), config_file=opts["config"], clinic=os.environ.get("CERVSCAN_CLINIC"))
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
        printout.screen_summary(res)
    raise typer.Exit(res.exit_code)


# --------------------------------------------------------------------------- evaluate

@app.command(epilog=EXIT_CODES)
@_screening_options
def evaluate(
    visits: Annotated[list[Path], typer.Argument(help="Folder(s) of visit folders.")],
    labels: Annotated[Path, typer.Option("--labels", help="CSV with patient_id,label (0/1), optional source.")],
    out: Annotated[Path, typer.Option("-o", "--out")] = Path("cervscan-eval"),
    opts: dict = None,  # type: ignore[assignment] - SCREENING_OPTIONS
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 2000,
    cv_run: Annotated[Optional[Path], typer.Option("--cv-run", help="A 'train-cls --folds K' run: screen each patient with the fold model that did not see it (reproduces cross-validation).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    quiet: QuietOpt = False,
) -> None:
    """Screen labelled visits and compare patient decisions with the labels (metrics.json, roc.png, ...)."""
    _setup_logging(False, quiet)
    m = _api("evaluate", visits, labels, out, **_screening_kwargs(opts), n_bootstrap=bootstrap, seed=seed, cv_run=cv_run)
    if not quiet:
        printout.metrics(m)


# --------------------------------------------------------------------------- batch

@app.command(epilog=EXIT_CODES + " For batch they count the visits screened in this run; also: 4 another batch "
                                 "run holds OUT's lock (see --wait).")
@_screening_options
def batch(
    root: Annotated[Path, typer.Argument(help="Folder that receives one visit folder per patient (it may grow every day).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder; one per ROOT (the run journal lives in OUT/.cervscan/).")] = Path("cervscan-batch"),
    opts: dict = None,  # type: ignore[assignment] - SCREENING_OPTIONS
    workers: WorkersOpt = None,
    no_masks: NoMasksOpt = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for a run that holds OUT's lock instead of exiting with code 4.")] = False,
    wait_timeout: Annotated[Optional[float], typer.Option("--wait-timeout", help="Give up waiting (exit 4) after this many seconds; implies --wait.")] = None,
    report: Annotated[bool, typer.Option("--report", help="Also write PDF reports of the new or changed visits, and the summary.")] = False,
    log_file: Annotated[Optional[Path], typer.Option("--log-file", help="Append a timestamped log of the run to this file.")] = None,
    csv_every: Annotated[int, typer.Option("--csv-every", min=0, help="Rewrite the CSVs after every N screened visits during the run (0: only at the end).")] = 20,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as one line of JSON on stdout.")] = False,
) -> None:
    """Nightly batch: screen only the new or changed visits of ROOT into OUT; earlier results stay.

    Incremental (a visit is screened again when its images, the models or the configuration change), crash-safe
    (a journal in OUT/.cervscan/batch.sqlite; rerun after a crash), locked (one run per OUT). OUT/patients.csv and
    OUT/images.csv always hold every visit's latest result exactly once.
    """
    _setup_logging(verbose, quiet or as_json)
    from cervscan import api  # lazy: keeps cv2, PIL and reportlab out of --help

    kw = _screening_kwargs(opts)  # a malformed --variants / --weights / --set, or --site with --cls-model: exit 2

    def fail(e: Exception, code: int) -> None:
        if as_json:
            sys.stdout.write(json.dumps({"root": str(root), "out": str(out), "error": str(e), "exit_code": code}) + "\n")
        err_console.print(f"[red]error:[/red] {_shown(e)}")
        raise typer.Exit(code)

    console_level = logging.DEBUG if verbose else (logging.ERROR if quiet or as_json else logging.INFO)
    try:
        res = api.batch(root, out, **kw, num_workers=workers, write_masks=not no_masks,
                        write_overlays=not no_masks, wait=wait, wait_timeout=wait_timeout, report=report,
                        report_options={"clinic": os.environ.get("CERVSCAN_CLINIC"), "config_file": opts["config"]},
                        csv_every=csv_every, log_file=log_file, console_level=console_level)
    except BatchLockedError as e:
        fail(e, BatchLockedError.exit_code)
    except CervscanError as e:
        fail(e, EXIT_ERROR)
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
    exam_date: Annotated[Optional[str], typer.Option("--exam-date", help="Exam date, YYYY-MM-DD (default: the images' file date).")] = None,
    page_size: Annotated[str, typer.Option("--page-size", help="a4 | letter")] = "a4",
    config: ConfigOpt = None,
) -> None:
    """Write PDF referral reports: OUT/reports/<patient>.pdf and OUT/reports/summary.pdf."""
    _setup_logging(False, False)
    try:
        from cervscan import api  # lazy: keeps cv2, PIL and reportlab out of --help

        paths = api.report(out, patients=patient, clinic=clinic, exam_date=exam_date, page_size=page_size,
                              config_file=config)
    except CervscanError as e:
        _fail(e)
    except OSError as e:  # anything the report could not read or write, named, without a traceback
        _fail(CervscanError(f"{e.filename or out}: {e.strerror or e}"))
    for p in paths:
        console.print(str(p), markup=False, highlight=False, soft_wrap=True)


