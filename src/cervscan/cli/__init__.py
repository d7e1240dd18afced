"""The ``cervscan`` command line: a thin Typer layer over :mod:`cervscan.api`. Each command parses its
options, calls one api function and prints; exit codes live in :mod:`cervscan.errors`.

- :mod:`cervscan.cli.common`: the app, shared options (declared once), logging, failing;
- :mod:`cervscan.cli.screening`: screen, evaluate, batch, report;
- :mod:`cervscan.cli.training`: train-seg, train-cls, train-stage;
- :mod:`cervscan.cli.site`: adapt (a site's own decision from its labelled visits);
- :mod:`cervscan.cli.models`: models list / install / use / rollback / verify.

Torch, timm and smp are imported by :mod:`cervscan.api` only, which a command imports when it runs
(``# lazy: torch``), so ``cervscan --help`` answers at once.
"""

from cervscan.cli import models, screening, site, training  # noqa: F401 - each registers its commands on ``app``
from cervscan.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    app()
