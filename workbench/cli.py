"""The ``workbench`` command: one sub-command per stage.

Every failure prints one line (``error: ...``) and exits non-zero; ``WORKBENCH_DEBUG=1`` shows
the traceback. Ctrl-C stops cleanly: ingest, training (``--resume``) and predict pick up where
they stopped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

DEMO_COHORT = "demo"
DEMO_MODEL = "chest-xray"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="workbench",
        description="Medical imaging classification workbench: DICOM in, calibrated and "
        "explained predictions out.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("synth", help="write a synthetic DICOM cohort")
    s.add_argument("out", type=Path)
    s.add_argument("--studies", type=int, default=300)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--modality", choices=["DX", "CT"], default="DX")
    s.add_argument("--image-size", type=int, help="in-plane size (default 256 DX, 128 CT)")

    s = sub.add_parser("ingest", help="catalog a folder of DICOM files")
    s.add_argument("src", type=Path)
    s.add_argument("--labels", type=Path, help="CSV with StudyInstanceUID,label")
    s.add_argument("--cohort", help="add the studies to this named cohort")

    sub.add_parser("quarantine", help="list files that could not be ingested, with reasons")
    sub.add_parser("models", help="list trained model bundles")

    s = sub.add_parser("train", help="train, calibrate and bundle a model on a cohort")
    s.add_argument("--cohort", required=True)
    s.add_argument("--name", required=True, help="model name (bundle folder under models/)")
    s.add_argument("--epochs", type=int, default=12)
    s.add_argument("--image-size", type=int, default=96)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run")

    s = sub.add_parser("predict", help="predict studies with a trained model")
    s.add_argument("model", help="model name, NAME/VERSION or a bundle folder")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--cohort")
    g.add_argument("src", nargs="?", type=Path, help="a folder of DICOM files")
    s.add_argument("--split", choices=["train", "calibration", "test"])
    s.add_argument("--explain", choices=["gradcam", "ig", "occlusion", "none"], default="gradcam")
    s.add_argument("--out", type=Path, help="write a CSV of the predictions here")
    s.add_argument("--force", action="store_true", help="predict again studies already done")

    s = sub.add_parser("report", help="write the consistency report (HTML, PDF, JSON, CSV)")
    s.add_argument("model")
    s.add_argument("--cohort", required=True)
    s.add_argument("--out", type=Path, required=True)

    s = sub.add_parser("app", help="start the review app (Streamlit)")
    s.add_argument("--port", type=int, default=8501)
    s.add_argument("--address", default="127.0.0.1")

    s = sub.add_parser("demo", help="synth → ingest → train → predict → report → app")
    s.add_argument("--studies", type=int, default=300)
    s.add_argument("--epochs", type=int, default=12)
    s.add_argument("--image-size", type=int, default=96)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-app", action="store_true", help="stop after the report")
    s.add_argument("--port", type=int, default=8501)
    return p


def _settings():  # noqa: ANN202 - imported lazily so `--help` stays fast
    from workbench.config import get_settings

    return get_settings()


def cmd_synth(a: argparse.Namespace) -> None:
    from workbench.dicom.synth import synthesize_cohort

    size = a.image_size or (128 if a.modality == "CT" else 256)
    s = synthesize_cohort(a.out, a.studies, a.seed, a.modality, size, progress=True)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(s.class_counts.items()))
    print(
        f"wrote {s.n_files} files: {s.n_studies} studies of {s.n_patients} patients "
        f"({counts}) to {s.out}; labels in {s.labels_csv}"
    )


def cmd_ingest(a: argparse.Namespace) -> None:
    from workbench.catalog import ingest

    print(ingest(_settings(), a.src, a.labels, a.cohort).line())


def cmd_quarantine(a: argparse.Namespace) -> None:
    from sqlalchemy import select

    from workbench.store import Quarantine, session_scope

    with session_scope(_settings().database_url) as session:
        rows = session.scalars(select(Quarantine).order_by(Quarantine.id)).all()
        for r in rows:
            print(f"{r.reason:28s} {r.path}  ({r.detail})")
        print(f"{len(rows)} quarantined files")


def cmd_models(a: argparse.Namespace) -> None:
    from workbench.bundle import list_bundles

    bundles = list_bundles(_settings().models_dir)
    for b in bundles:
        wb = b.workbench
        auroc = wb.get("metrics", {}).get("test", {}).get("auroc_macro")
        shown = f"{auroc:.3f}" if auroc is not None else "n/a"
        print(
            f"{b.ref}  cohort {wb.get('cohort')}  classes {','.join(wb.get('classes', []))}  "
            f"test AUROC {shown}  created {wb.get('created')}"
        )
    print(f"{len(bundles)} model bundles")


def cmd_train(a: argparse.Namespace) -> None:
    from workbench.training import TrainConfig, train

    cfg = TrainConfig(
        cohort=a.cohort,
        name=a.name,
        epochs=a.epochs,
        image_size=a.image_size,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        precision=a.precision,
        device=a.device,
        resume=a.resume,
    )
    res = train(_settings(), cfg)
    m = res.metrics
    print(
        f"bundle {res.bundle}: best epoch {res.best_epoch}, test accuracy {m['accuracy']:.3f}, "
        f"macro AUROC {m['auroc_macro']:.3f}, ECE {m['ece_before']:.3f} → {m['ece_after']:.3f}"
    )


def cmd_predict(a: argparse.Namespace) -> None:
    from workbench.bundle import load_bundle
    from workbench.catalog import cohort_items, ingest, items_for_studies
    from workbench.inference import latest_predictions, predict_items, write_csv
    from workbench.runtime import resolve_device

    settings = _settings()
    bundle = load_bundle(settings.models_dir, a.model, resolve_device(settings.device))
    if a.cohort:
        items = cohort_items(settings, a.cohort, a.split)
    else:
        summary = ingest(settings, a.src)
        print(summary.line())
        items = items_for_studies(settings, summary.study_ids)
    new = predict_items(settings, bundle, items, a.explain, settings.precision, force=a.force)
    rows = latest_predictions(settings, bundle.bundle_hash, [i.study_id for i in items])
    if a.out:
        write_csv(a.out, bundle, [rows[i.study_id] for i in items if i.study_id in rows])
    print(
        f"predicted {len(new)} studies with {bundle.name}/{bundle.version} "
        f"({len(rows) - len(new)} already done)" + (f"; CSV in {a.out}" if a.out else "")
    )


def cmd_report(a: argparse.Namespace) -> None:
    from workbench.report import build_report

    paths = build_report(_settings(), a.model, a.cohort, a.out)
    print("report: " + ", ".join(str(p) for p in paths))


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
    print(f"review app on http://{a.address}:{a.port} (Ctrl-C to stop)")
    subprocess.run(_streamlit_cmd(a.port, a.address), check=False)


def cmd_demo(a: argparse.Namespace) -> None:
    from workbench.catalog import ingest
    from workbench.dicom.synth import synthesize_cohort
    from workbench.report import build_report

    settings = _settings()
    t0 = time.time()
    out = settings.home / "studies" / "demo"
    if not (out / "labels.csv").exists():
        s = synthesize_cohort(out, a.studies, a.seed, "DX", 256, progress=True)
        print(f"[demo] synthesised {s.n_studies} studies ({s.n_files} files) in {out}")
    print("[demo] " + ingest(settings, out, out / "labels.csv", DEMO_COHORT).line())
    ns = argparse.Namespace(
        cohort=DEMO_COHORT,
        name=DEMO_MODEL,
        epochs=a.epochs,
        image_size=a.image_size,
        batch_size=16,
        lr=1e-3,
        seed=a.seed,
        precision=settings.precision,
        device=settings.device,
        resume=False,
    )
    cmd_train(ns)
    cmd_predict(
        argparse.Namespace(
            model=DEMO_MODEL,
            cohort=DEMO_COHORT,
            src=None,
            split="test",
            explain="gradcam",
            out=settings.home / "reports" / "demo" / "predictions.csv",
            force=False,
        )
    )
    paths = build_report(settings, DEMO_MODEL, DEMO_COHORT, settings.home / "reports" / "demo")
    print(f"[demo] report: {paths[0]}")
    print(f"[demo] pipeline took {time.time() - t0:.0f} s")
    if not a.no_app:
        cmd_app(argparse.Namespace(port=a.port, address="127.0.0.1"))


COMMANDS = {
    "synth": cmd_synth,
    "ingest": cmd_ingest,
    "quarantine": cmd_quarantine,
    "models": cmd_models,
    "train": cmd_train,
    "predict": cmd_predict,
    "report": cmd_report,
    "app": cmd_app,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's contract: one clear line, no traceback
        if os.environ.get("WORKBENCH_DEBUG"):
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
