"""``cervscan models``: list, install, verify, roll back and pick installed models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cervscan import printout
from cervscan.cli.common import _api, app
from cervscan.errors import EXIT_ERROR, EXIT_OK
from cervscan.printout import console, err_console

models_app = typer.Typer(help="List, install, verify and roll back models.", no_args_is_help=True,
                         context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(models_app, name="models")

# --------------------------------------------------------------------------- models

@models_app.command("list")
def models_list() -> None:
    """Installed and shipped models, and which ones 'screen' uses now."""
    printout.models_table(_api("models_list"))


@models_app.command("install")
def models_install(
    runs: Annotated[list[Path], typer.Argument(help="train-seg / train-cls / adapt run folders (or model.pt files).")],
    name: Annotated[Optional[str], typer.Option(help="Tag prefix.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Also install a classifier whose recorded validation failed "
                                        "(no better than chance) or that records none, or an adapt run that "
                                        "records installable: false (recorded in the manifest).")] = False,
) -> None:
    """Install retrained model(s) as the default for 'screen' (user data dir, sha256 recorded).

    Each checkpoint is loaded fully first; a classifier must record a passed validation (better than chance
    on held-out patients), unless --force. An adapt run (RUN with model.pt and site.toml) installs its classifier
    and its site settings together; refused when RUN records installable: false, unless --force."""
    res = _api("models_install", runs, name=name, force=force)
    for role, info in res.items():
        what = "site settings" if role == "settings" else role
        console.print(f"installed {what}: {info['folder']} (sha256 {info['sha256'][:12]})")
        if info.get("forced"):
            err_console.print(f"[bold red]warning: {role} installed because of --force although {info['forced']}; "
                              f"'cervscan models rollback --role {role}' returns to the shipped one[/bold red]")


@models_app.command("rollback")
def models_rollback(
    role: Annotated[Optional[str], typer.Option(help="stage | cervix | segmenter | classifier (default all).")] = None,
) -> None:
    """Go back to the shipped models (installed files are kept); site settings installed with a classifier go
    with it."""
    _api("models_rollback", role)
    console.print("screen now uses the shipped model(s)" + (f" for {role}" if role else "")
                  + (" and no site settings" if role in (None, "classifier") else ""))


@models_app.command("use")
def models_use(role: str, tag: str) -> None:
    """Make an installed model (by tag, see 'models list') the default again."""
    _api("models_use", role, tag)
    console.print(f"{role}: now {tag}")


@models_app.command("verify")
def models_verify() -> None:
    """Check the sha256 of every shipped and installed model."""
    checked = _api("models_verify")
    for r, problem in checked:
        if problem is None:
            console.print(f"[green]ok[/green] {r['role']} {r['tag']} {r['file']}")
        else:
            err_console.print(f"[red]FAIL[/red] {problem}")
    raise typer.Exit(EXIT_ERROR if any(problem for _, problem in checked) else EXIT_OK)


