"""Commands that predict and hand results back: ``predict``, ``send``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.catalog.cohorts import CohortItem, cohort_items, items_for_studies
from workbench.catalog.ingest import ingest
from workbench.cli.common import add_qido_filters, credentials, pull_studies
from workbench.config import Settings, get_settings
from workbench.errors import NotFoundError, UsageError, WorkbenchError
from workbench.pacs.send import send_results
from workbench.predict.results import latest_predictions

if TYPE_CHECKING:  # imports torch: only the handlers that need it do (see the package docs)
    from workbench.model.bundle import Bundle


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this group's commands to the parser."""
    s = sub.add_parser(
        "predict",
        help="predict studies with a trained model",
        usage="workbench predict [MODEL] (--cohort NAME | SRC) [options]",
        description="MODEL (a name, NAME/VERSION or a bundle folder; or --model) defaults to "
        "the model promoted for --task (see `workbench promote`). SRC is a folder of DICOM "
        "files: it is ingested first. An interrupted run continues where it stopped.",
    )
    s.add_argument("targets", nargs="*", metavar="MODEL SRC", help=argparse.SUPPRESS)
    s.add_argument("--model", dest="model_opt", help="model (instead of the first argument)")
    s.add_argument("--task", help="without a model: use the model promoted for this task")
    s.add_argument("--cohort")
    s.add_argument("--split", choices=["train", "calibration", "test"])
    s.add_argument("--explain", choices=["gradcam", "ig", "occlusion", "none"], default="gradcam")
    s.add_argument("--out", type=Path, help="write a CSV of the predictions here")
    s.add_argument("--force", action="store_true", help="predict again studies already done")
    s.add_argument(
        "--dicomweb",
        metavar="URL",
        help="pull the studies that match --patient / --study / --modality / --from / --to "
        "from this DICOMweb service (as `ingest --dicomweb`: credentials from the environment) "
        "and predict them",
    )
    add_qido_filters(s)
    s.add_argument(
        "--max", type=int, dest="max_studies", help="predict at most this many new studies"
    )

    s = sub.add_parser(
        "send",
        help="send predictions back to the PACS (DICOM SR + heat-map overlays, STOW-RS)",
        description="For the latest prediction of each selected study: a TID 1500 SR of the "
        "calibrated probabilities and a secondary capture of each heat-map overlay, in new "
        "series of the same study, marked unverified (not for diagnostic use until a clinician "
        "verifies them). Credentials as for ingest --dicomweb: WORKBENCH_DICOMWEB_USER and "
        "WORKBENCH_DICOMWEB_PASSWORD, or WORKBENCH_DICOMWEB_CREDENTIALS; never the command line.",
    )
    s.add_argument("--dicomweb", metavar="URL", required=True, help="a DICOMweb service root")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--study", metavar="KEY", nargs="+", help="study keys to send")
    g.add_argument("--all", action="store_true", help="every study with a stored prediction")
    s.add_argument("--model", help="only predictions of this model (NAME or NAME/VERSION)")


def predict_target(a: argparse.Namespace) -> tuple[str, Path | None]:
    """(model, src) from ``[MODEL] [SRC]``, ``--model`` and the promotion registry.

    One argument with --cohort is the model; without --cohort it is the source folder when
    a model comes from --model or the registry (``workbench predict incoming/``)."""
    from workbench.review.promotion import promoted_model

    targets = list(getattr(a, "targets", None) or [])
    model: str | None = getattr(a, "model_opt", None) or getattr(a, "model", None)
    src: Path | None = getattr(a, "src", None)
    if len(targets) > 2:
        raise UsageError("predict takes at most MODEL and SRC")
    if len(targets) == 2:
        model, src = targets[0], Path(targets[1])
    elif len(targets) == 1:
        t = targets[0]
        is_bundle = (Path(t) / "configs" / "metadata.json").exists()
        if a.cohort or (model is None and (is_bundle or not Path(t).exists())):
            model = t
        else:  # a lone folder: the model comes from --model or the promotion registry
            src = Path(t)
    sources = [bool(a.cohort), src is not None, bool(getattr(a, "dicomweb", None))]
    if sum(sources) != 1:
        raise UsageError("give one of --cohort NAME, a folder of DICOM files or --dicomweb URL")
    if model is None:
        model = promoted_model(get_settings(), getattr(a, "task", None))
        if model is None:
            raise NotFoundError("no model given and none promoted (see `workbench promote`)")
    return model, src


def cmd_predict(a: argparse.Namespace) -> None:
    from workbench.model.bundle import load_bundle
    from workbench.model.runtime import resolve_device

    settings = get_settings()
    model, src = predict_target(a)
    bundle = load_bundle(settings.models_dir, model, resolve_device(settings.device))
    if a.cohort:
        items = cohort_items(settings, a.cohort, a.split)
    elif getattr(a, "dicomweb", None):
        pulled = pull_studies(settings, a)
        print(pulled.line())
        items = items_for_studies(settings, pulled.ingest.study_ids)
    else:
        assert src is not None
        summary = ingest(settings, src)
        print(summary.line())
        items = items_for_studies(settings, summary.study_ids)
    predict_and_report(
        settings, bundle, items, a.explain, a.out, a.force, getattr(a, "max_studies", None)
    )


def predict_and_report(
    settings: Settings,
    bundle: Bundle,
    items: Sequence[CohortItem],
    explain: str,
    out: Path | None,
    force: bool = False,
    limit: int | None = None,
) -> None:
    from workbench.predict.inference import predict_items, write_csv

    new = predict_items(
        settings, bundle, items, explain, settings.precision, force=force, limit=limit
    )
    rows = latest_predictions(settings, bundle.bundle_hash, [i.study_id for i in items])
    if out:
        write_csv(out, bundle, [rows[i.study_id] for i in items if i.study_id in rows])
    left = sum(1 for i in items if i.study_id not in rows and i.images)
    print(
        f"predicted {len(new)} studies with {bundle.name}/{bundle.version} "
        f"({len(rows) - len(new)} already done"
        + (f", {left} left: run again to continue" if left else "")
        + ")"
        + (f"; CSV in {out}" if out else "")
    )


def cmd_send(a: argparse.Namespace) -> None:
    summary = send_results(
        get_settings(),
        a.dicomweb,
        credentials(),
        study_keys=None if a.all else a.study,
        model=a.model,
    )
    print(summary.line())
    if summary.failed:
        for failure in summary.failed:
            print(f"  not sent: {failure}", file=sys.stderr)
        raise WorkbenchError(f"{len(summary.failed)} studies were not sent")


COMMANDS = {"predict": cmd_predict, "send": cmd_send}
