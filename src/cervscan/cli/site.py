"""A site's own decision: ``cervscan adapt VISITS --labels CSV -o RUN`` (parse, call :func:`cervscan.api.adapt`,
print). Option defaults come from :class:`cervscan.training.configs.AdaptConfig`: an option left out keeps the
frozen classifier recipe's default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cervscan.cli.common import (
    CacheDirOpt,
    CervixOpt,
    ClsOpt,
    QuietOpt,
    SegOpt,
    StageOpt,
    ThreadsOpt,
    _fail,
    _fast_malloc_reexec,
    _setup_logging,
    app,
)
from cervscan.cli.training import _fail_validation, _given, _names
from cervscan.config import STAGES
from cervscan.errors import CervscanError
from cervscan.printout import console, err_console, screen_progress, shown
from cervscan.training.configs import AdaptConfig
from cervscan.training.configs import default as _D
from cervscan.training.validation import ValidationFailed

ADAPT_EXIT_CODES = (
    "[b]Exit codes:[/b] 0 adapted: RUN/ holds model.pt, site.toml, metrics.json, comparison.json and adapt.md "
    "(read adapt.md: 'installable' says whether the comparison with the installed decision allows installing it); "
    "6 the adapted decision is no better than chance (the 95% CI of its cross-validated AUC includes 0.5): no "
    "model.pt; 1 error (too few patients in a class, a labels problem, ...); 2 usage error."
)


@app.command("adapt", epilog=ADAPT_EXIT_CODES)
def adapt_cmd(
    visits: Annotated[Path, typer.Argument(help="The site's folder of visit folders (one per patient).")],
    labels: Annotated[Path, typer.Option("--labels", help="CSV patient_id,label[,source] (as for evaluate; ',' or ';', any line ends).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Run folder (RUN).")],
    seg_model: SegOpt = None,
    cervix_model: CervixOpt = None,
    stage_model: StageOpt = None,
    cls_model: ClsOpt = None,
    target_sensitivity: Annotated[Optional[float], typer.Option(help=f"Operating point. Default {_D(AdaptConfig, 'target_sensitivity')}.")] = None,
    stages: Annotated[Optional[str], typer.Option("--stages", help="Exam stages whose images decide (comma list). Default: chosen by the selection rule between the installed decision's stages and every stage (see adapt.md).")] = None,
    gate: Annotated[Optional[str], typer.Option("--gate", help="Quality gate thresholds: auto (chosen by the selection rule) | site (re-derived from the site's images) | installed. Default auto.")] = None,
    pool: Annotated[Optional[str], typer.Option("--pool", help="auto (chosen by the selection rule) | local | pooled (with the shipped training patients). Default auto.")] = None,
    max_inadequate: Annotated[Optional[float], typer.Option(help=f"Selection rule: a setting leaving more than this share of the local patients inadequate is not chosen (unless all do). Default {_D(AdaptConfig, 'max_inadequate')}.")] = None,
    folds: Annotated[Optional[int], typer.Option(help=f"Patient-wise cross-validation folds. Default {_D(AdaptConfig, 'folds')}.")] = None,
    repeats: Annotated[Optional[int], typer.Option(help=f"Repeats of the cross-validation. Default {_D(AdaptConfig, 'repeats')}.")] = None,
    seed: Annotated[Optional[int], typer.Option(help=f"Default {_D(AdaptConfig, 'seed')}.")] = None,
    cache_dir: CacheDirOpt = None,
    threads: ThreadsOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Go on with fewer than 10 patients in a class, and write model.pt although the adapted decision is no better than chance (both recorded; the card says so).")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Make the patient decision this site's own from its labelled visits: screen them with the installed models
    (cached), measure every candidate setting (stage policy x gate thresholds x local or pooled fit) on the same
    local folds and choose one by the selection rule (nested cross-validation estimates the choice), choose its
    operating point, compare it with the installed decision on the same patients, and write RUN/ with the site
    model card adapt.md."""
    _fast_malloc_reexec()
    _setup_logging(False, quiet)
    from cervscan import api  # lazy: keeps torch out of --help

    kw = _given(visits=str(visits), labels=str(labels), out=str(out), seg_model=seg_model, cervix_model=cervix_model,
                stage_model=stage_model, cls_model=cls_model, target_sensitivity=target_sensitivity,
                decision_stages=_names(stages, "--stages", STAGES), gate=gate, pool=pool, max_inadequate=max_inadequate,
                folds=folds, repeats=repeats, seed=seed, cache_dir=str(cache_dir) if cache_dir else None,
                threads=threads, force=force or None)
    try:
        with screen_progress() as cb:
            m = api.adapt(**kw, progress=lambda done, total: cb("images", done, total))
    except ValidationFailed as e:
        _fail_validation(e)
    except CervscanError as e:
        _fail(e)
    _print(m, out)


def _print(m: dict, out: Path) -> None:
    v, op, n = m["validation"], m["operating_point"], m["nested"]
    for w in m["warnings"]:
        err_console.print(f"[yellow]warning: {shown(w)}[/yellow]")
    est = (f"nested cross-validated AUC {n['auc']:.3f} (95% CI {n['ci_low']:.3f}-{n['ci_high']:.3f}; the estimate); "
           if "auc" in n else "")
    console.print(f"adapted decision ({m['chosen']}; candidate {m['candidate']}, chosen among "
                  f"{m['choice']['allowed']} by the rule): {est}the chosen setting's own cross-validated AUC "
                  f"{v['auc']:.3f} (95% CI {v['ci_low']:.3f}-{v['ci_high']:.3f}), threshold {op['threshold']:.3f}: "
                  f"sensitivity {m['sensitivity_mean_of_repeats']:.2f}, specificity "
                  f"{m['specificity_mean_of_repeats']:.2f} (in-sample); inadequate {len(m['inadequate_patients'])} of "
                  f"{m['patients'] + len(m['inadequate_patients'])}; stages {', '.join(m['stage_policy']['stages'])}")
    if m["installable"]:
        console.print(f"[green]installable: the comparison with the installed decision allows it -> {shown(out)}/adapt.md[/green]")
    else:
        err_console.print("[bold red]NOT installable: " + shown("; ".join(m["not_installable_because"]))
                          + f"[/bold red] (see {shown(out)}/adapt.md)")
