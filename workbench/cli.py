"""The ``workbench`` command: one sub-command per stage.

Every failure prints one line (``error: ...``) and exits non-zero; ``WORKBENCH_DEBUG=1`` shows
the traceback. Ctrl-C stops cleanly: ingest, training (``--resume``) and predict pick up where
they stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.config import (
    DEFAULT_MAX_PIXEL_MB,
    Settings,
    child_environment,
    debug_enabled,
    environment_value,
    environment_values,
    get_settings,
)
from workbench.errors import NotFoundError, UsageError, WorkbenchError
from workbench.train.config import (
    ARCHITECTURES,
    DEFAULTS,
    LITERAL_FIELDS,
    NOT_ON_COMMAND_LINE,
    TrainConfig,
)

if TYPE_CHECKING:
    from workbench.catalog.ingest import CohortItem
    from workbench.dicom.dicomweb import Credentials
    from workbench.model.bundle import Bundle
    from workbench.model.contract import ModelContract

DEMO_COHORT = "demo"
DEMO_MODEL = "chest-xray"
DEMO_USER = "demo"
DEMO_TIME_BUDGET = 240.0  # seconds of training: the demo finishes in minutes on 2 CPU cores
# The demo's network: the compact DenseNet takes about three times the steps of DenseNet121 in
# the same seconds on a CPU (nets.py), so the demo's model converges within its budget.
DEMO_ARCHITECTURE = "densenet-small"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _train_option_defaults() -> dict[str, object]:
    """`train`'s option defaults, taken from :class:`TrainConfig` (precision and device: None,
    which :func:`_train_config` reads as the environment's setting)."""
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    skip = NOT_ON_COMMAND_LINE | {"cohort", "name", "precision", "device"}
    return {name: getattr(DEFAULTS, name) for name in fields if name not in skip}


def _train_config(a: argparse.Namespace, settings: Settings) -> TrainConfig:
    """The training record from `train`'s options: every field the options name, the rest the
    dataclass's defaults. A flag wins for precision and device; otherwise WORKBENCH_PRECISION /
    WORKBENCH_DEVICE, as every command."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(a).items() if k in fields}
    values["precision"] = a.precision or settings.precision
    values["device"] = a.device or settings.device
    return TrainConfig(**values)


def _add_qido_filters(s: argparse.ArgumentParser) -> None:
    """The QIDO-RS filters of ``--dicomweb`` (ingest and predict; read by :func:`_pull`)."""
    s.add_argument("--patient", help="DICOMweb: PatientID to pull")
    s.add_argument("--study", help="DICOMweb: StudyInstanceUID to pull")
    s.add_argument("--modality", help="DICOMweb: modality, e.g. DX or CT")
    s.add_argument("--from", dest="date_from", metavar="YYYYMMDD", help="DICOMweb: first date")
    s.add_argument("--to", dest="date_to", metavar="YYYYMMDD", help="DICOMweb: last date")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="workbench",
        description="Medical imaging classification workbench: DICOM in, calibrated and "
        "explained predictions out.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("synth", help="write a synthetic DICOM cohort")
    s.add_argument("out", type=Path)
    s.add_argument("--studies", type=int, default=300)  # synth.DEMO_STUDIES
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--modality", choices=["DX", "CT"], default="DX")
    s.add_argument("--image-size", type=int, help="in-plane size (default 256 DX, 128 CT)")
    s.add_argument(
        "--multilabel",
        action="store_true",
        help="DX: some studies show both a nodule and an effusion (label 'effusion;nodule')",
    )

    s = sub.add_parser(
        "ingest",
        help="catalog a folder of DICOM files, or pull from a PACS over DICOMweb",
        description="Credentials for --dicomweb come from WORKBENCH_DICOMWEB_USER and "
        "WORKBENCH_DICOMWEB_PASSWORD, or a file named by WORKBENCH_DICOMWEB_CREDENTIALS "
        "(user:password, mode 600); never from the command line.",
    )
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("src", type=Path, nargs="?", help="a folder (or file) of DICOM")
    g.add_argument("--dicomweb", metavar="URL", help="a DICOMweb service root (QIDO / WADO)")
    _add_qido_filters(s)
    s.add_argument("--labels", type=Path, help="CSV with StudyInstanceUID,label")
    s.add_argument("--cohort", help="add the studies to this named cohort")
    s.add_argument("--workers", type=int, help="decoding processes (default: every core)")
    s.add_argument(
        "--max-pixel-mb",
        type=int,
        help=f"quarantine files declaring more pixel data than this (default "
        f"{DEFAULT_MAX_PIXEL_MB}, or WORKBENCH_MAX_PIXEL_MB)",
    )
    s.add_argument(
        "--allow-burned-in",
        action="store_true",
        help="accept images that may carry burned-in text (BurnedInAnnotation YES or missing "
        "for US, SC, OT...)",
    )
    s.add_argument(
        "--frames",
        metavar="volume|first|N",
        help="multi-frame files: every frame as one volume (default), the first frame, or "
        "frame N (0-based); or WORKBENCH_FRAMES",
    )

    s.add_argument(
        "--deid-to",
        type=Path,
        metavar="DIR",
        help="de-identify (PS3.15 Basic Profile) into DIR first and catalog those copies",
    )
    s.add_argument("--keep-dates", action="store_true", help="with --deid-to: shift dates")

    s = sub.add_parser(
        "export", help="export a cohort's DICOM de-identified (PS3.15 Basic Profile)"
    )
    s.add_argument("out", type=Path)
    s.add_argument("--cohort", required=True)
    s.add_argument(
        "--keep-dates", action="store_true", help="shift dates per patient instead of removing"
    )
    s.add_argument("--keep-device-identity", action="store_true")
    s.add_argument("--allow-burned-in", action="store_true")

    s = sub.add_parser("quarantine", help="list files that could not be ingested, with reasons")
    s.add_argument("--retry", action="store_true", help="try every quarantined file again")

    s = sub.add_parser("cohort", help="what a cohort is made of (modalities, sites, sizes...)")
    s.add_argument("name")
    sub.add_parser("models", help="list trained model bundles")

    s = sub.add_parser("train", help="train, calibrate and bundle a model on a cohort")
    s.add_argument("--cohort", required=True)
    s.add_argument("--name", required=True, help="model name (bundle folder under models/)")
    s.add_argument(
        "--epochs",
        type=int,
        help="a fixed number of epochs at most; default: a step budget (early stopping on "
        "held-out training patients, capped by --max-steps and --time-budget)",
    )
    s.add_argument(
        "--max-steps",
        type=int,
        help="cap on optimiser steps (default without --epochs: 2000 or 10 epochs, the larger)",
    )
    s.add_argument("--time-budget", type=float, metavar="SECONDS", help="stop training after")
    s.add_argument(
        "--patience-steps",
        type=int,
        help="steps without a better validation score before stopping (default: the larger "
        "of 400 and 3 epochs)",
    )
    s.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up")
    s.add_argument(
        "--validation-fraction",
        type=float,
        help="training patients held out for early stopping (never the calibration split)",
    )
    s.add_argument(
        "--flip",
        type=float,
        help="training augmentation: probability of mirroring each image axis (default "
        "%(default)s: "
        "left and right carry meaning in most anatomy; measure before turning it on)",
    )
    s.add_argument(
        "--rotate",
        type=float,
        metavar="DEGREES",
        help="training augmentation: largest rotation (default 8.6 in 2D, 5.7 about each axis "
        "in 3D)",
    )
    s.add_argument(
        "--scale",
        type=float,
        help="training augmentation: largest relative change of size (default 0.08)",
    )
    s.add_argument(
        "--translate",
        type=float,
        help="training augmentation: largest shift, as a fraction of the side (default 0.05)",
    )
    s.add_argument(
        "--ema-decay",
        type=float,
        help="validate and keep an exponential moving average of the weights over about the "
        "last 1/(1-d) steps, e.g. 0.995 (default %(default)s: the raw weights; on the recipe "
        "benchmark it did not raise AUROC, see BENCHMARKS.md)",
    )
    s.add_argument(
        "--architecture",
        choices=ARCHITECTURES,
        help="the network: MONAI's DenseNet121 (default; what imported weights fit) or "
        "densenet-small, the same design at 0.77 M parameters, about 3x faster a step on a CPU",
    )
    s.add_argument("--image-size", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument(
        "--precision",
        choices=LITERAL_FIELDS["precision"],
        help="default: WORKBENCH_PRECISION, else auto (a timed probe; never slower than fp32)",
    )
    s.add_argument(
        "--device", choices=LITERAL_FIELDS["device"], help="default: WORKBENCH_DEVICE, else auto"
    )
    s.add_argument(
        "--spatial-dims",
        choices=LITERAL_FIELDS["spatial_dims"],
        help="2D images or 3D volumes; auto: the cohort's one shape (a study is 3D when an "
        "input has at least 8 slices; a mixed cohort is refused with the counts)",
    )
    s.add_argument("--resume", action="store_true", help="continue an interrupted run")
    s.add_argument(
        "--checkpoint-every",
        type=int,
        help="optimiser steps between mid-epoch checkpoints (0: at epoch ends only)",
    )
    s.add_argument(
        "--init-from",
        metavar="MODEL_OR_FILE",
        help="start from a bundle (its head rebuilt for new classes), a weights file, e.g. "
        "an ImageNet DenseNet121 state dict in torchvision's layout (nothing is downloaded), "
        "or weights:NAME from `workbench weights import` (with their input normalization)",
    )
    s.add_argument("--freeze-blocks", type=int, help="freeze the first N dense blocks")
    s.add_argument("--backbone-lr-factor", type=float, help="backbone lr = lr x this")
    s.add_argument(
        "--problem",
        choices=LITERAL_FIELDS["problem"],
        help="auto: multilabel when a study has several labels ('a;b'), else multi-class",
    )
    s.add_argument(
        "--balance",
        choices=LITERAL_FIELDS["balance"],
        help="class imbalance: weighted loss, class-balanced sampling, or nothing",
    )
    s.add_argument("--folds", type=int, help="K >= 2: patient-level K-fold cross-validation")
    s.add_argument("--compile", action="store_true", help="torch.compile the network")
    s.add_argument(
        "--coverage",
        type=float,
        help="target coverage of the conformal prediction sets (default %(default)s)",
    )
    s.add_argument(
        "--label-randomization-epochs",
        type=int,
        help="epochs of the shuffled-label model for the saliency data-randomisation check "
        "(0: skip it)",
    )
    s.add_argument(
        "--sanity-images",
        type=int,
        help="test images for the saliency sanity checks stored with the bundle (0: skip)",
    )
    s.add_argument(
        "--calibrate-per-site",
        action="store_true",
        help="also fit a calibration map per site with enough calibration studies; the others "
        "(and unseen sites) use the global map",
    )
    s.add_argument(
        "--site-min-studies",
        type=int,
        help="calibration studies a site needs for a map of its own (default %(default)s)",
    )
    # One source of defaults: the dataclass (precision and device stay None here, meaning
    # WORKBENCH_PRECISION / WORKBENCH_DEVICE, then the dataclass's "auto").
    s.set_defaults(**_train_option_defaults())

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
    _add_qido_filters(s)
    s.add_argument(
        "--max", type=int, dest="max_studies", help="predict at most this many new studies"
    )

    s = sub.add_parser(
        "compare",
        help="compare two models on the locked test split of a cohort",
        description="Both models predict the cohort's test split; prints macro AUROC with the "
        "paired bootstrap CI of the difference, the top-1 flip rate, score and threshold "
        "shifts and the change per subgroup.",
    )
    s.add_argument("old", help="NAME or NAME/VERSION")
    s.add_argument("new", help="NAME or NAME/VERSION")
    s.add_argument("--cohort", required=True)
    s.add_argument("--out", type=Path, help="write the comparison JSON here")
    s.add_argument("--resamples", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)

    s = sub.add_parser(
        "promote",
        help="make a model the one in use for a task, if it is not worse than the current one",
        description="Compares NAME/VERSION with the model promoted for the task (or --against) "
        "on the test split of the candidate's training cohort (or --cohort) and refuses when "
        "macro AUROC drops by more than --margin, or the lower bound of the paired bootstrap "
        "95%% CI of NEW-OLD is below -margin. Either decision is an audit event.",
    )
    s.add_argument("model", help="NAME/VERSION (or NAME: its latest version)")
    s.add_argument("--task", help="registry key (default: the model's name)")
    s.add_argument("--against", help="compare with this model instead of the promoted one")
    s.add_argument("--margin", type=float, default=0.02)
    s.add_argument("--reason", default="", help="why, for the audit trail")
    s.add_argument("--cohort", help="whose test split to compare on")
    s.add_argument("--out", type=Path, help="write the comparison JSON here")
    s.add_argument("--resamples", type=int, default=1000)

    s = sub.add_parser("report", help="write the consistency report (HTML, PDF, JSON, CSV)")
    s.add_argument("model")
    s.add_argument("--cohort", required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument(
        "--retest",
        action="store_true",
        help="first compute test-retest consistency (forward passes: the same study twice, "
        "small intensity, noise and rotation changes) and keep it beside the bundle",
    )
    s.add_argument(
        "--retest-saliency",
        choices=["gradcam", "ig", "occlusion", "none"],
        default="gradcam",
        help="saliency method whose rank correlation --retest measures",
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

    s = sub.add_parser("app", help="start the review app (Streamlit)")
    s.add_argument("--port", type=int, default=8501)
    s.add_argument("--address", default="127.0.0.1")

    s = sub.add_parser(
        "users",
        help="app accounts: add, disable, reset-password, list",
        description="Passwords come from WORKBENCH_NEW_PASSWORD or are prompted for; never from "
        "the command line.",
    )
    us = s.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    u = us.add_parser("add", help="create an account")
    u.add_argument("name")
    u.add_argument("--role", required=True, choices=["clinician", "researcher", "auditor", "admin"])
    u = us.add_parser("disable", help="disable an account (it can no longer sign in)")
    u.add_argument("name")
    u = us.add_parser("reset-password", help="set a new password and lift a lockout")
    u.add_argument("name")
    us.add_parser("list", help="accounts with their role and state")

    s = sub.add_parser("audit", help="verify or export the hash-chained audit log")
    au = s.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    au.add_parser("verify", help="check the chain; name the first bad row and exit 1 if any")
    u = au.add_parser("export", help="every audit event as CSV or JSON")
    u.add_argument("--format", choices=["csv", "json"], default="csv")
    u.add_argument("--out", type=Path, help="write here (default: standard output)")

    s = sub.add_parser(
        "weights",
        help="import DenseNet121 weights downloaded elsewhere into the local store; list it",
        description="Offline: FILE was downloaded by hand. It is converted to the workbench's "
        "DenseNet121 layout (one input channel), stored under $WORKBENCH_HOME/weights/ with its "
        "sha256, and used with `train --init-from weights:NAME`. Nothing that could run code is "
        "unpickled.",
    )
    ws = s.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    w = ws.add_parser("import", help="convert a downloaded file into the store")
    w.add_argument("file", type=Path, help="the weights file (a folder or zip: monai-bundle)")
    w.add_argument(
        "--format",
        required=True,
        choices=["torchvision", "torchxrayvision", "timm", "monai-bundle"],  # weights.FORMATS
    )
    w.add_argument("--name", help="store name (default: from the file name)")
    licence = w.add_mutually_exclusive_group()
    licence.add_argument("--licence-file", type=Path, help="the weights' licence, recorded")
    licence.add_argument("--licence", help="the weights' licence as text, recorded")
    ws.add_parser("list", help="the store, one line per entry")

    s = sub.add_parser("demo", help="synth → ingest → train → predict → report → app")
    s.add_argument("--studies", type=int, default=300)
    s.add_argument("--epochs", type=int, help="default: the step budget, as `train`")
    s.add_argument(
        "--time-budget",
        type=float,
        default=DEMO_TIME_BUDGET,
        metavar="SECONDS",
        help=f"training time (default {DEMO_TIME_BUDGET:.0f} s)",
    )
    s.add_argument(
        "--architecture",
        choices=ARCHITECTURES,
        default=DEMO_ARCHITECTURE,
        help=f"the network (default {DEMO_ARCHITECTURE}: converges within the demo's budget "
        "on a CPU; densenet121 is `train`'s default)",
    )
    s.add_argument("--image-size", type=int, default=96)
    s.add_argument("--seed", type=int, default=0)  # synth.DEMO_SEED
    s.add_argument("--no-app", action="store_true", help="stop after the report")
    s.add_argument("--port", type=int, default=8501)
    return p


def _credentials() -> Credentials | None:
    from workbench.dicom.dicomweb import CREDENTIAL_ENV, load_credentials

    return load_credentials(environment_values(*CREDENTIAL_ENV))


def _settings() -> Settings:
    return get_settings()


def cmd_synth(a: argparse.Namespace) -> None:
    from workbench.dicom.synth import synthesize_cohort

    size = a.image_size or (128 if a.modality == "CT" else 256)
    s = synthesize_cohort(
        a.out, a.studies, a.seed, a.modality, size, progress=True, multilabel=a.multilabel
    )
    counts = ", ".join(f"{k} {v}" for k, v in sorted(s.class_counts.items()))
    print(
        f"wrote {s.n_files} files: {s.n_studies} studies of {s.n_patients} patients "
        f"({counts}) to {s.out}; labels in {s.labels_csv}"
    )


def _pull(
    settings: Any, a: argparse.Namespace, labels: Path | None = None, cohort: str | None = None
) -> Any:
    """``--dicomweb URL`` with its QIDO filters (ingest and predict): credentials from the
    environment or a file, never from the command line."""
    from workbench.pacs.pull import pull_dicomweb

    return pull_dicomweb(
        settings,
        a.dicomweb,
        _credentials(),
        patient_id=a.patient,
        study_uid=a.study,
        modality=a.modality,
        date_from=a.date_from,
        date_to=a.date_to,
        labels=labels,
        cohort=cohort,
    )


def cmd_ingest(a: argparse.Namespace) -> None:
    from workbench.catalog.ingest import ingest

    settings = _settings()
    if a.max_pixel_mb:
        settings = dataclasses.replace(settings, max_pixel_mb=a.max_pixel_mb)
    if a.frames:
        from workbench.config import check_frames

        settings = dataclasses.replace(settings, frames=check_frames(a.frames))
    if a.dicomweb:
        print(_pull(settings, a, a.labels, a.cohort).line())
        return
    src, labels = a.src, a.labels
    if a.deid_to:
        from workbench.catalog.ingest import SIDECAR_SUFFIXES, iter_files
        from workbench.config import pseudonym_key
        from workbench.dicom.deid import DeidConfig, export_deidentified

        if not src.exists():
            raise NotFoundError(f"no such file or folder: {src}")
        config = DeidConfig(
            key=pseudonym_key(settings),
            keep_dates=a.keep_dates,
            allow_burned_in=a.allow_burned_in,
        )
        files = (p for p in iter_files(src) if p.suffix.lower() not in SIDECAR_SUFFIXES)
        print("de-identify: " + export_deidentified(files, a.deid_to, config).line())
        if labels:
            labels = _remap_labels(labels, a.deid_to / "labels.csv", config.key)
        src = a.deid_to
    summary = ingest(
        settings, src, labels, a.cohort, workers=a.workers, allow_burned_in=a.allow_burned_in
    )
    print(summary.line())


def _remap_labels(src: Path, dst: Path, key: bytes) -> Path:
    """The labels CSV with StudyInstanceUIDs remapped as de-identification remapped them."""
    import csv

    from workbench.catalog.ingest import read_labels
    from workbench.dicom.deid import remap_uid

    rows = read_labels(src)
    with dst.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["StudyInstanceUID", "label"])
        for uid, label in rows.items():
            w.writerow([remap_uid(uid, key), label])
    return dst


def cmd_export(a: argparse.Namespace) -> None:
    import getpass

    from sqlalchemy import select

    from workbench.config import pseudonym_key
    from workbench.db.store import (
        Cohort,
        CohortMember,
        Instance,
        Series,
        record_audit,
        session_scope,
    )
    from workbench.dicom.deid import DeidConfig, export_deidentified

    settings = _settings()
    with session_scope(settings.database_url) as session:
        if session.get(Cohort, a.cohort) is None:
            raise NotFoundError(f"no cohort named {a.cohort!r}")
        paths = [
            Path(p)
            for p in session.scalars(
                select(Instance.path)
                .join(Series, Series.id == Instance.series_id)
                .join(CohortMember, CohortMember.study_id == Series.study_id)
                .where(CohortMember.cohort_name == a.cohort)
                .order_by(Instance.path)
            )
        ]
    config = DeidConfig(
        key=pseudonym_key(settings),
        keep_dates=a.keep_dates,
        keep_device_identity=a.keep_device_identity,
        allow_burned_in=a.allow_burned_in,
    )
    summary = export_deidentified(paths, a.out, config)
    with session_scope(settings.database_url) as session:
        record_audit(
            session,
            getpass.getuser(),
            "export.deidentified",
            "cohort",
            a.cohort,
            new_value={
                "written": summary.written,
                "refused": summary.refused,
                "keep_dates": a.keep_dates,
                "keep_device_identity": a.keep_device_identity,
                "allow_burned_in": a.allow_burned_in,
            },
        )
    print(f"export of {a.cohort} to {a.out}: {summary.line()}")


def cmd_quarantine(a: argparse.Namespace) -> None:
    from workbench.catalog.ingest import quarantine_report, retry_quarantine

    settings = _settings()
    if a.retry:
        print("retry: " + retry_quarantine(settings).line())
    files, series = quarantine_report(settings)
    for f in files:
        print(f"{f.reason:28s} {f.path}  ({f.detail})")
    print(f"{len(files)} quarantined files")
    for p in series:
        print(
            f"inconsistent_series          study {p.study_key} ({p.modality}): "
            + "; ".join(p.problems)
        )
    if series:
        print(f"{len(series)} series left out of the volumes")


def cmd_cohort(a: argparse.Namespace) -> None:
    from workbench.catalog.ingest import cohort_summary

    print("\n".join(cohort_summary(_settings(), a.name).lines()))


def cmd_models(a: argparse.Namespace) -> None:
    from workbench.model.bundle_info import list_bundles

    bundles = list_bundles(_settings().models_dir)
    for b in bundles:
        print(model_line(b.ref, b.contract))
    print(f"{len(bundles)} model bundles")


def _num(value: object, fmt: str = ".3f") -> str:
    return format(value, fmt) if isinstance(value, int | float) else "n/a"


def model_line(ref: str, wb: ModelContract) -> str:
    """One bundle's experiment record in a line: problem, test AUROC and ECE, epochs,
    duration, hardware."""
    test = wb.test_metrics
    tr = wb.training
    hw = tr.get("hardware") or {}
    where = hw.get("gpu") or hw.get("cpu") or tr.get("device", "?")
    if hw.get("processes", 1) > 1:
        where = f"{hw['processes']} x {where}"
    epochs = tr.get("epochs_run", len(tr.get("history", [])))
    choice = tr.get("precision_choice") or {}
    precision = tr.get("precision", "?") + (
        f" ({choice['reason']})" if choice.get("reason") else ""
    )
    return (
        f"{ref}  {wb.architecture}  {wb.problem}  "
        f"cohort {wb.cohort}  "
        f"classes {','.join(wb.classes)}  AUROC {_num(test.get('auroc_macro'))}  "
        f"ECE {_num(test.get('ece_after'))}  epochs {epochs}  "
        f"{_num(tr.get('seconds'), '.0f')} s  on {where}  precision {precision}  "
        f"created {wb.created}"
    )


def cmd_train(a: argparse.Namespace) -> None:
    settings = _settings()
    _train_and_report(settings, _train_config(a, settings))


def _train_and_report(settings: Settings, cfg: TrainConfig) -> None:
    from workbench.train.training import train

    # Under torchrun only rank 0 reports (every rank returns the same result).
    main_rank = (environment_value("RANK") or "0") == "0"
    res = train(settings, cfg, progress=main_rank)
    if not main_rank:
        return
    m = res.metrics
    print(
        f"bundle {res.bundle}: best epoch {res.best_epoch}, test accuracy {_num(m['accuracy'])}, "
        f"macro AUROC {_num(m['auroc_macro'])}, "
        f"ECE {_num(m['ece_before'])} → {_num(m['ece_after'])}"
        + (
            f" per site (global map alone: {_num(m['ece_after_global'])})"
            if "ece_after_global" in m
            else ""
        )
    )
    for label, auroc in (m.get("auroc_per_label") or {}).items():
        print(f"  {label}: AUROC {_num(auroc)}")
    if m.get("calibration_warning"):
        print(f"warning: {m['calibration_warning']}")
    if res.folds:
        f = res.folds
        for key in ("accuracy", "auroc_macro", "ece_after"):
            print(f"{f['folds']}-fold {key}: {_num(f[key]['mean'])} ± {_num(f[key]['sd'])}")
        print(f"cross-validation record: {f.get('path')}")


def _predict_target(a: argparse.Namespace) -> tuple[str, Path | None]:
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
        model = promoted_model(_settings(), getattr(a, "task", None))
        if model is None:
            raise NotFoundError("no model given and none promoted (see `workbench promote`)")
    return model, src


def cmd_predict(a: argparse.Namespace) -> None:
    from workbench.catalog.ingest import cohort_items, ingest, items_for_studies
    from workbench.model.bundle import load_bundle
    from workbench.model.runtime import resolve_device

    settings = _settings()
    model, src = _predict_target(a)
    bundle = load_bundle(settings.models_dir, model, resolve_device(settings.device))
    if a.cohort:
        items = cohort_items(settings, a.cohort, a.split)
    elif getattr(a, "dicomweb", None):
        pulled = _pull(settings, a)
        print(pulled.line())
        items = items_for_studies(settings, pulled.ingest.study_ids)
    else:
        assert src is not None
        summary = ingest(settings, src)
        print(summary.line())
        items = items_for_studies(settings, summary.study_ids)
    _predict_and_report(
        settings, bundle, items, a.explain, a.out, a.force, getattr(a, "max_studies", None)
    )


def _predict_and_report(
    settings: Settings,
    bundle: Bundle,
    items: Sequence[CohortItem],
    explain: str,
    out: Path | None,
    force: bool = False,
    limit: int | None = None,
) -> None:
    from workbench.predict.inference import predict_items, write_csv
    from workbench.predict.results import latest_predictions

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


def cmd_compare(a: argparse.Namespace) -> None:
    from workbench.evaluation.compare import compare_bundles, format_table
    from workbench.evaluation.jsonout import dump_json

    data = compare_bundles(_settings(), a.old, a.new, a.cohort, a.resamples, a.seed)
    print(format_table(data))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(dump_json(data), encoding="utf-8")
        print(f"comparison JSON in {a.out}")


def cmd_promote(a: argparse.Namespace) -> None:
    from workbench.evaluation.compare import format_table
    from workbench.evaluation.jsonout import dump_json
    from workbench.review.promotion import PromotionRefused, promote

    try:
        decision = promote(
            _settings(),
            a.model,
            task=a.task,
            against=a.against,
            margin=a.margin,
            reason=a.reason,
            cohort=a.cohort,
            n_resamples=a.resamples,
        )
    except PromotionRefused as err:
        if err.comparison is not None:
            print(format_table(err.comparison))
            if a.out:
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(dump_json(err.comparison), encoding="utf-8")
        raise
    if decision.comparison is not None:
        print(format_table(decision.comparison))
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(dump_json(decision.comparison), encoding="utf-8")
    print(decision.message)


def cmd_report(a: argparse.Namespace) -> None:
    from workbench.evaluation.report import build_report

    settings = _settings()
    if getattr(a, "retest", False):
        from workbench.evaluation.consistency import write_retest

        path = write_retest(settings, a.model, a.cohort, explain=a.retest_saliency)
        print(f"test-retest: {path}")
    paths = build_report(settings, a.model, a.cohort, a.out)
    print("report: " + ", ".join(str(p) for p in paths))


def cmd_send(a: argparse.Namespace) -> None:
    from workbench.pacs.send import send_results

    summary = send_results(
        _settings(),
        a.dicomweb,
        _credentials(),
        study_keys=None if a.all else a.study,
        model=a.model,
    )
    print(summary.line())
    if summary.failed:
        for failure in summary.failed:
            print(f"  not sent: {failure}", file=sys.stderr)
        raise WorkbenchError(f"{len(summary.failed)} studies were not sent")


def _streamlit_cmd(port: int, address: str) -> list[str]:
    app = Path(__file__).resolve().parent.parent / "streamlit_app.py"
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.port",
        str(port),
        "--server.address",
        address,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
    ]


def cmd_app(a: argparse.Namespace) -> None:
    from workbench.config import cookie_secret

    settings = _settings()
    if a.address not in LOOPBACK:
        print(
            f"warning: the app listens on {a.address}, reachable from other machines; put it "
            "behind TLS",
            file=sys.stderr,
        )
    # The cookie secret goes through the environment, not argv (argv is visible in `ps`).
    env = child_environment({"STREAMLIT_SERVER_COOKIE_SECRET": cookie_secret(settings)})
    print(f"review app on http://{a.address}:{a.port} (Ctrl-C to stop)")
    subprocess.run(_streamlit_cmd(a.port, a.address), check=False, env=env)


def _actor() -> str:
    """Who runs the command, for the audit log: the operating-system user."""
    import getpass

    return f"cli:{getpass.getuser()}"


def _new_password(username: str) -> str:
    """A new password from WORKBENCH_NEW_PASSWORD, or typed twice at a prompt (never argv)."""
    import getpass

    env = environment_value("WORKBENCH_NEW_PASSWORD")
    if env:
        return env
    first = getpass.getpass(f"New password for {username}: ")
    if getpass.getpass("Repeat it: ") != first:
        raise UsageError("the two passwords differ")
    return first


def cmd_users(a: argparse.Namespace) -> None:
    from workbench.review import users

    settings = _settings()
    if a.users_command == "add":
        acc = users.add_user(settings, _actor(), a.name, a.role, _new_password(a.name))
        print(f"added {acc.username} ({acc.role})")
    elif a.users_command == "disable":
        acc = users.disable_user(settings, _actor(), a.name)
        print(f"disabled {acc.username}")
    elif a.users_command == "reset-password":
        acc = users.reset_password(settings, _actor(), a.name, _new_password(a.name))
        print(f"new password set for {acc.username}; failed attempts and lock cleared")
    else:
        accounts = users.list_users(settings)
        for acc in accounts:
            state = "disabled" if acc.disabled else "locked" if acc.locked() else "active"
            print(f"{acc.username:24s} {acc.role:10s} {state:8s} created {acc.created_at:%Y-%m-%d}")
        print(f"{len(accounts)} users")


def cmd_audit(a: argparse.Namespace) -> None:
    from workbench.db import auditlog

    settings = _settings()
    if a.audit_command == "verify":
        result = auditlog.verify(settings)
        if result.bad_id is not None:
            raise WorkbenchError(
                f"audit chain broken at event {result.bad_id} ({result.bad_action}): the row "
                "was changed, or a row before it was inserted or deleted"
            )
        print(f"audit chain intact: {result.events} events")
        return
    n = auditlog.export(settings, a.format, a.out, actor=_actor())
    if a.out:
        print(f"exported {n} audit events to {a.out}")


def cmd_weights(a: argparse.Namespace) -> None:
    from workbench.model import weights

    settings = _settings()
    if a.weights_command == "import":
        e = weights.import_weights(
            settings, a.file, a.format, a.name, licence=a.licence, licence_file=a.licence_file
        )
        n = e.input_normalization
        norm = f"(x * {n.scale:g} - {n.mean:g}) / {n.std:g}" if n else "none"
        print(
            f"imported {e.name}: {e.tensors} tensors from {e.source_file} ({e.format}, source "
            f"sha256 {e.source_sha256[:16]}), stored sha256 {e.sha256[:16]}; first conv "
            f"{e.source_input['channels']} -> 1 channel; normalization {norm}; licence "
            f"{'recorded' if e.licence else 'none given'}; train with --init-from weights:{e.name}"
        )
        return
    entries = weights.list_weights(settings)
    for e in entries:
        print(e.line())
    print(f"{len(entries)} weights in {weights.weights_dir(settings)}")


def _demo_account(settings: Settings) -> None:
    """A demo clinician to sign in with: WORKBENCH_DEMO_PASSWORD, or a random password printed
    once (an existing demo account is left alone)."""
    import secrets

    from workbench.review import users

    if users.get_account(settings, DEMO_USER) is not None:
        print(f"[demo] sign in as {DEMO_USER!r} (its password was printed when it was created)")
        return
    given = environment_value("WORKBENCH_DEMO_PASSWORD")
    password = given or secrets.token_urlsafe(12)
    users.add_user(settings, _actor(), DEMO_USER, "clinician", password)
    shown = "from WORKBENCH_DEMO_PASSWORD" if given else password
    print(f"[demo] clinician account {DEMO_USER!r}, password {shown} (shown once)")


def cmd_demo(a: argparse.Namespace) -> None:
    from workbench.catalog.ingest import cohort_items, ingest
    from workbench.dicom.synth import DEMO_IMAGE_SIZE, synthesize_cohort
    from workbench.evaluation.report import build_report
    from workbench.model.bundle import load_bundle
    from workbench.model.runtime import resolve_device

    settings = _settings()
    t0 = time.time()
    out = settings.home / "studies" / "demo"
    if not (out / "labels.csv").exists():
        s = synthesize_cohort(out, a.studies, a.seed, "DX", DEMO_IMAGE_SIZE, progress=True)
        print(f"[demo] synthesised {s.n_studies} studies ({s.n_files} files) in {out}")
    print("[demo] " + ingest(settings, out, out / "labels.csv", DEMO_COHORT).line())
    _train_and_report(
        settings,
        TrainConfig(
            cohort=DEMO_COHORT,
            name=DEMO_MODEL,
            epochs=a.epochs,
            time_budget=a.time_budget,
            architecture=a.architecture,
            image_size=a.image_size,
            seed=a.seed,
            precision=settings.precision,
            device=settings.device,
        ),
    )
    bundle = load_bundle(settings.models_dir, DEMO_MODEL, resolve_device(settings.device))
    _predict_and_report(
        settings,
        bundle,
        cohort_items(settings, DEMO_COHORT, "test"),
        "gradcam",
        settings.home / "reports" / "demo" / "predictions.csv",
    )
    paths = build_report(settings, DEMO_MODEL, DEMO_COHORT, settings.home / "reports" / "demo")
    print(f"[demo] report: {paths[0]}")
    print(f"[demo] pipeline took {time.time() - t0:.0f} s")
    _demo_account(settings)
    if not a.no_app:
        cmd_app(argparse.Namespace(port=a.port, address="127.0.0.1"))


COMMANDS = {
    "synth": cmd_synth,
    "ingest": cmd_ingest,
    "quarantine": cmd_quarantine,
    "cohort": cmd_cohort,
    "export": cmd_export,
    "models": cmd_models,
    "train": cmd_train,
    "predict": cmd_predict,
    "report": cmd_report,
    "compare": cmd_compare,
    "promote": cmd_promote,
    "send": cmd_send,
    "app": cmd_app,
    "demo": cmd_demo,
    "users": cmd_users,
    "audit": cmd_audit,
    "weights": cmd_weights,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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


#: The exit status of a bug (sysexits' EX_SOFTWARE), apart from the user's errors' 1.
EXIT_BUG = 70
BUG_LINE = (
    "this is a bug in the workbench, not a problem with your input: please report it with "
    "the traceback above (remove any patient identifiers in file names before you share it)"
)


def _users_error(err: BaseException) -> bool:
    """An error the user can act on: the workbench's own, or the environment's (a missing or
    unwritable file, a full disk, a database that cannot be reached)."""
    from sqlalchemy.exc import OperationalError

    return isinstance(err, WorkbenchError | OSError | OperationalError)


if __name__ == "__main__":
    sys.exit(main())
