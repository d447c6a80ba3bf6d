"""The ``workbench`` command: one sub-command per stage, one module per command group.

``catalog`` (synth, ingest, export, quarantine, cohort), ``models`` (models, train, weights),
``predict`` (predict, send), ``evaluation`` (report, compare, promote), ``labelling``
(suggest), ``accounts`` (users, audit), ``app`` and ``demo``; ``common`` holds what several
share. Each group module has a ``register`` that adds its options and a ``COMMANDS`` table of
its handlers.

The group modules import the light stages at the top. The stages that import torch, MONAI,
Captum or statsmodels (training, inference, reports, model bundles, reader agreement) are
imported inside the handlers that use them, because importing them takes seconds:
``workbench users list``, ``audit verify`` or ``--help`` must not pay for them
(``tests/test_cli.py`` checks it).

Every failure the user can act on prints one line (``error: ...``) and exits 1; a bug prints its
traceback and :data:`BUG_LINE`, and exits :data:`EXIT_BUG`; ``WORKBENCH_DEBUG=1`` shows the
traceback of every error. Ctrl-C stops cleanly: ingest, training (``--resume``) and predict pick
up where they stopped.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

from sqlalchemy.exc import OperationalError

from workbench.cli import accounts, app, catalog, demo, evaluation, labelling, models, predict
from workbench.config import debug_enabled
from workbench.errors import WorkbenchError

#: The command groups, in the order ``workbench --help`` lists their commands.
GROUPS = (catalog, models, predict, evaluation, labelling, accounts, app, demo)

#: Every command's handler, by command name.
COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    name: handler for group in GROUPS for name, handler in group.COMMANDS.items()
}

#: The exit status of a bug (sysexits' EX_SOFTWARE), apart from the user's errors' 1.
EXIT_BUG = 70
BUG_LINE = (
    "this is a bug in the workbench, not a problem with your input: please report it with "
    "the traceback above (remove any patient identifiers in file names before you share it)"
)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every group's commands under one parser."""
    p = argparse.ArgumentParser(
        prog="workbench",
        description="Medical imaging classification workbench: DICOM in, calibrated and "
        "explained predictions out.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status: 0, 1 for the user's error, 130 on Ctrl-C, 70 a bug."""
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - sorted below: the user's error or a bug
        if debug_enabled():
            raise
        if not _users_error(err):
            traceback.print_exc()
            print(f"error: {BUG_LINE}", file=sys.stderr)
            return EXIT_BUG
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
    return 0


def _users_error(err: BaseException) -> bool:
    """An error the user can act on: the workbench's own, or the environment's (a missing or
    unwritable file, a full disk, a database that cannot be reached)."""
    return isinstance(err, WorkbenchError | OSError | OperationalError)
