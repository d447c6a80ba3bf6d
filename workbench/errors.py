"""The one base of every error a user can act on.

``workbench.cli.main`` prints a :class:`WorkbenchError` as one line and exits 1; any other
exception is a bug in the workbench and is shown with its traceback and a line asking for a
report. Raise a subclass (or one of the two generic ones below) for bad input, bad settings and
missing things; let a broken invariant raise whatever it raises.

This module imports nothing, so every layer may use it.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """An error in the input, the settings or the environment that the user can act on."""


class UsageError(WorkbenchError, ValueError):
    """A bad argument, option or setting (a ``ValueError`` too, for callers that catch that)."""


class NotFoundError(WorkbenchError, LookupError):
    """A study, cohort, model or record named by the user does not exist."""
