"""Commands that bring studies in and out: ``synth``, ``ingest``, ``export``, ``quarantine``,
``cohort``."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import getpass
from pathlib import Path

from workbench.catalog.cohorts import cohort_summary
from workbench.catalog.export import export_cohort
from workbench.catalog.ingest import (
    SIDECAR_SUFFIXES,
    ingest,
    iter_files,
    quarantine_report,
    read_labels,
    retry_quarantine,
)
from workbench.cli.common import actor, add_qido_filters, pull_studies
from workbench.config import DEFAULT_MAX_PIXEL_MB, check_frames, get_settings, pseudonym_key
from workbench.dicom.deid import DeidConfig, export_deidentified, remap_uid
from workbench.dicom.synth import synthesize_cohort
from workbench.errors import NotFoundError, UsageError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this group's commands to the parser."""
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
    add_qido_filters(s)
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

    s = sub.add_parser(
        "cohort",
        help="what a cohort is made of; or make one from clinicians' reads",
        usage="workbench cohort NAME\n       workbench cohort from-reads NAME [--source COHORT] "
        "[--adjudicated-only] [--min-readers N] [--reads-only]",
        description="`cohort NAME`: modalities, sites, views, sizes, transfer syntaxes and, for a "
        "cohort made from reads, the source of its labels. `cohort from-reads NAME`: a new "
        "labelled cohort from the reads of --source's studies (default: every study read): "
        "an adjudication wins, then readers who agree, then the labels file's label (unless "
        "--reads-only); conflicts are left out and counted, and the readers' agreement "
        "(Fleiss' and Cohen's kappa) is reported.",
    )
    s.add_argument("words", nargs="+", metavar="NAME", help=argparse.SUPPRESS)
    s.add_argument("--source", help="from-reads: the cohort whose studies are labelled")
    s.add_argument(
        "--adjudicated-only", action="store_true", help="from-reads: adjudicated studies only"
    )
    s.add_argument("--min-readers", type=int, default=1, help="from-reads: readers who must agree")
    s.add_argument(
        "--reads-only", action="store_true", help="from-reads: no labels from the labels file"
    )


def cmd_synth(a: argparse.Namespace) -> None:
    size = a.image_size or (128 if a.modality == "CT" else 256)
    s = synthesize_cohort(
        a.out, a.studies, a.seed, a.modality, size, progress=True, multilabel=a.multilabel
    )
    counts = ", ".join(f"{k} {v}" for k, v in sorted(s.class_counts.items()))
    print(
        f"wrote {s.n_files} files: {s.n_studies} studies of {s.n_patients} patients "
        f"({counts}) to {s.out}; labels in {s.labels_csv}"
    )


def cmd_ingest(a: argparse.Namespace) -> None:
    settings = get_settings()
    if a.max_pixel_mb:
        settings = dataclasses.replace(settings, max_pixel_mb=a.max_pixel_mb)
    if a.frames:
        settings = dataclasses.replace(settings, frames=check_frames(a.frames))
    if a.dicomweb:
        print(pull_studies(settings, a, a.labels, a.cohort).line())
        return
    src, labels = a.src, a.labels
    if a.deid_to:
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
            labels = remap_labels(labels, a.deid_to / "labels.csv", config.key)
        src = a.deid_to
    summary = ingest(
        settings, src, labels, a.cohort, workers=a.workers, allow_burned_in=a.allow_burned_in
    )
    print(summary.line())


def remap_labels(src: Path, dst: Path, key: bytes) -> Path:
    """The labels CSV with StudyInstanceUIDs remapped as de-identification remapped them."""
    rows = read_labels(src)
    with dst.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["StudyInstanceUID", "label"])
        for uid, label in rows.items():
            w.writerow([remap_uid(uid, key), label])
    return dst


def cmd_export(a: argparse.Namespace) -> None:
    settings = get_settings()
    config = DeidConfig(
        key=pseudonym_key(settings),
        keep_dates=a.keep_dates,
        keep_device_identity=a.keep_device_identity,
        allow_burned_in=a.allow_burned_in,
    )
    summary = export_cohort(settings, a.cohort, a.out, config, getpass.getuser())
    print(f"export of {a.cohort} to {a.out}: {summary.line()}")


def cmd_quarantine(a: argparse.Namespace) -> None:
    settings = get_settings()
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
    if a.words[0] != "from-reads":
        if len(a.words) != 1:
            raise UsageError("cohort takes one NAME, or: cohort from-reads NAME [options]")
        print("\n".join(cohort_summary(get_settings(), a.words[0]).lines()))
        return
    if len(a.words) != 2:
        raise UsageError("cohort from-reads takes one NAME: the cohort to make")
    # statsmodels (the kappas) takes seconds to import: only this handler pays for it
    from workbench.review.from_reads import cohort_from_reads

    made = cohort_from_reads(
        get_settings(),
        a.words[1],
        a.source,
        adjudicated_only=a.adjudicated_only,
        min_readers=a.min_readers,
        reads_only=a.reads_only,
        actor=actor(),
    )
    print(made.line())
    for pair in made.agreement.get("pairs", []):
        kappa, lo, hi = pair.get("kappa"), pair.get("ci_low"), pair.get("ci_high")
        shown = "n/a" if kappa is None else f"{kappa:.2f}"
        if kappa is not None and lo is not None and hi is not None:
            shown += f" [{lo:.2f}, {hi:.2f}]"
        who = " / ".join(pair["readers"])
        print(f"  Cohen's kappa {who}: {shown} on {pair['studies']} studies")


COMMANDS = {
    "synth": cmd_synth,
    "ingest": cmd_ingest,
    "export": cmd_export,
    "quarantine": cmd_quarantine,
    "cohort": cmd_cohort,
}
