"""Which model is in use for a task, and the guarded step that changes it.

The registry is one small JSON file beside the bundles, ``models/promoted.json``::

    {"chest-xray": "chest-xray/v3"}        task -> NAME/VERSION

A file rather than a table so that no schema migration is needed and a models folder carries
its own choice with it. It is rewritten atomically (temporary file + ``os.replace``) under an
advisory lock, so a reader never sees half a file and two promotions do not lose each other.

Promotion rule (the guard). NEW replaces the task's current model OLD only if it is not worse
on macro AUROC beyond ``margin`` on the locked test split (see :mod:`workbench.evaluation.compare`):

    refuse when  NEW-OLD < -margin                       (the point difference)
            or   lower bound of the paired 95% CI < -margin

i.e. NEW must be shown, with the paired bootstrap, to lose at most ``margin``. When the interval
is undefined (too few resamples hold every class, e.g. a very small test split) the point
difference alone decides and the audit record says so; when AUROC itself is undefined the
promotion is refused. Both outcomes are audit events (``promote`` / ``promote_refused``).

This module imports nothing heavy: the app calls :func:`promoted_model` on every page.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.config import Settings
from workbench.errors import WorkbenchError

REGISTRY = "promoted.json"
DEFAULT_MARGIN = 0.02


class PromotionError(WorkbenchError):
    """A promotion that cannot be done (unknown model, no task...)."""


class PromotionRefused(PromotionError):
    """NEW is worse than the current model beyond the margin; recorded in the audit trail."""

    def __init__(self, message: str, comparison: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.comparison = comparison


@dataclass(frozen=True)
class PromotionDecision:
    task: str
    model: str  # NAME/VERSION of the candidate
    previous: str | None  # the model it was compared against (None: first promotion)
    promoted: bool
    message: str
    comparison: dict[str, Any] | None


def registry_path(settings: Settings) -> Path:
    return settings.models_dir / REGISTRY


def read_registry(settings: Settings) -> dict[str, str]:
    """task -> NAME/VERSION; empty when nothing was promoted yet."""
    path = registry_path(settings)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise PromotionError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise PromotionError(f"{path} must hold an object task -> NAME/VERSION")
    return {str(k): str(v) for k, v in data.items()}


def promoted_model(settings: Settings, task: str | None = None) -> str | None:
    """The promoted ``NAME/VERSION`` of ``task``; without a task, the only promoted model
    (None when there are none, PromotionError when several tasks make it ambiguous)."""
    reg = read_registry(settings)
    if task is not None:
        return reg.get(task)
    if len(reg) > 1:
        raise PromotionError(
            f"models are promoted for several tasks ({', '.join(sorted(reg))}): name one"
        )
    return next(iter(reg.values()), None)


@contextlib.contextmanager
def _locked(settings: Settings) -> Iterator[None]:
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    lock = settings.models_dir / ".promoted.lock"
    with lock.open("a") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows: the atomic rename still holds
            pass
        yield


def _write_registry(settings: Settings, reg: dict[str, str]) -> None:
    path = registry_path(settings)
    fd, tmp = tempfile.mkstemp(prefix=".promoted.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(reg, indent=2, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def guard(comparison: dict[str, Any], margin: float) -> tuple[bool, str]:
    """(allowed, why) under the module's rule."""
    a = comparison["auroc"]
    diff, lo = a["diff"], a["diff_ci"][0]
    if diff is None:
        return False, "macro AUROC is undefined on the test split (a class is missing)"
    if diff < -margin:
        return False, (
            f"macro AUROC drops by {-diff:.3f} ({a['old']:.3f} -> {a['new']:.3f}), "
            f"more than the margin {margin:.3f}"
        )
    if lo is None:
        return True, (
            f"macro AUROC {a['old']:.3f} -> {a['new']:.3f} (diff {diff:+.3f}); paired CI "
            f"undefined on this small split, the point difference decided"
        )
    if lo < -margin:
        return False, (
            f"the paired 95% CI of the macro AUROC difference reaches {lo:+.3f}, below "
            f"-{margin:.3f} ({a['old']:.3f} -> {a['new']:.3f})"
        )
    return (
        True,
        f"macro AUROC {a['old']:.3f} -> {a['new']:.3f} (diff {diff:+.3f}, CI low {lo:+.3f})",
    )


def promote(
    settings: Settings,
    model: str,
    task: str | None = None,
    against: str | None = None,
    margin: float = DEFAULT_MARGIN,
    reason: str = "",
    cohort: str | None = None,
    actor: str | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> PromotionDecision:
    """Compare ``model`` with the task's promoted model (or ``against``) and promote it if the
    guard allows; either way an audit event is written. Raises :class:`PromotionRefused`
    (after auditing) when refused.

    Args:
        task: registry key; default the model's name.
        cohort: whose test split to compare on; default the candidate's training cohort.
    """
    import getpass

    from workbench.db.store import record_audit, session_scope
    from workbench.model.bundle_info import BundleError, read_bundle_info

    try:
        info = read_bundle_info(settings.models_dir, model)
        task = task or info.name
        current = against or promoted_model(settings, task)
        old_info = read_bundle_info(settings.models_dir, current) if current else None
    except BundleError as err:
        raise PromotionError(str(err).splitlines()[0]) from err
    ref = info.ref
    cohort = cohort or info.contract.cohort
    comparison: dict[str, Any] | None = None
    if old_info is None:
        allowed, why = True, "no model was promoted for this task before"
    else:
        from workbench.evaluation.compare import compare_bundles

        if not cohort:
            raise PromotionError(f"{ref} records no training cohort: pass --cohort")
        comparison = compare_bundles(
            settings, old_info.ref, ref, cohort, n_resamples=n_resamples, seed=seed
        )
        allowed, why = guard(comparison, margin)
    auroc = (comparison or {}).get("auroc", {})
    old_value = (
        {
            "model": old_info.ref,
            "bundle_hash": old_info.bundle_hash,
            "auroc_macro": auroc.get("old"),
        }
        if old_info
        else None
    )
    new_value = {
        "model": ref,
        "bundle_hash": info.bundle_hash,
        "auroc_macro": auroc.get("new"),
        "auroc_diff": auroc.get("diff"),
        "auroc_diff_ci": auroc.get("diff_ci"),
        "flip_rate": (comparison or {}).get("flip_rate"),
        "margin": margin,
        "cohort": cohort,
        "decision": why,
    }
    action = "promote" if allowed else "promote_refused"
    with _locked(settings), session_scope(settings.database_url) as session:
        record_audit(
            session,
            actor or getpass.getuser(),
            action,
            "model_task",
            task[:64],
            old_value=old_value,
            new_value=new_value,
            reason=reason,
        )
        # Inside the transaction: if the registry cannot be written, the audit event
        # rolls back with it, so the trail never claims a promotion that did not happen.
        if allowed:
            reg = read_registry(settings)
            reg[task] = ref
            _write_registry(settings, reg)
    prev = old_info.ref if old_info else None
    if not allowed:
        raise PromotionRefused(
            f"refused to promote {ref} over {prev} for task {task}: {why}", comparison
        )
    return PromotionDecision(
        task, ref, prev, True, f"promoted {ref} for task {task}: {why}", comparison
    )
