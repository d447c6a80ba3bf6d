"""The ``demo`` command: synth, ingest, train, predict, report, then the review app, with the
same entry points as the commands themselves."""

from __future__ import annotations

import argparse
import secrets
import time

from workbench.catalog.cohorts import cohort_items
from workbench.catalog.ingest import ingest
from workbench.cli.app import cmd_app
from workbench.cli.common import actor
from workbench.cli.models import train_and_report
from workbench.cli.predict import predict_and_report
from workbench.config import Settings, environment_value, get_settings
from workbench.dicom.synth import DEMO_IMAGE_SIZE, synthesize_cohort
from workbench.review import users
from workbench.train.config import ARCHITECTURES, TrainConfig

DEMO_COHORT = "demo"
DEMO_MODEL = "chest-xray"
DEMO_USER = "demo"
DEMO_TIME_BUDGET = 240.0  # seconds of training: the demo finishes in minutes on 2 CPU cores
# The demo's network: the compact DenseNet takes about three times the steps of DenseNet121 in
# the same seconds on a CPU (nets.py), so the demo's model converges within its budget.
DEMO_ARCHITECTURE = "densenet-small"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this group's commands to the parser."""
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


def demo_account(settings: Settings) -> None:
    """A demo clinician to sign in with: WORKBENCH_DEMO_PASSWORD, or a random password printed
    once (an existing demo account is left alone)."""
    if users.get_account(settings, DEMO_USER) is not None:
        print(f"[demo] sign in as {DEMO_USER!r} (its password was printed when it was created)")
        return
    given = environment_value("WORKBENCH_DEMO_PASSWORD")
    password = given or secrets.token_urlsafe(12)
    users.add_user(settings, actor(), DEMO_USER, "clinician", password)
    shown = "from WORKBENCH_DEMO_PASSWORD" if given else password
    print(f"[demo] clinician account {DEMO_USER!r}, password {shown} (shown once)")


def cmd_demo(a: argparse.Namespace) -> None:
    from workbench.evaluation.report import build_report
    from workbench.model.bundle import load_bundle
    from workbench.model.runtime import resolve_device

    settings = get_settings()
    t0 = time.time()
    out = settings.home / "studies" / "demo"
    if not (out / "labels.csv").exists():
        s = synthesize_cohort(out, a.studies, a.seed, "DX", DEMO_IMAGE_SIZE, progress=True)
        print(f"[demo] synthesised {s.n_studies} studies ({s.n_files} files) in {out}")
    print("[demo] " + ingest(settings, out, out / "labels.csv", DEMO_COHORT).line())
    train_and_report(
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
    predict_and_report(
        settings,
        bundle,
        cohort_items(settings, DEMO_COHORT, "test"),
        "gradcam",
        settings.home / "reports" / "demo" / "predictions.csv",
    )
    paths = build_report(settings, DEMO_MODEL, DEMO_COHORT, settings.home / "reports" / "demo")
    print(f"[demo] report: {paths[0]}")
    print(f"[demo] pipeline took {time.time() - t0:.0f} s")
    demo_account(settings)
    if not a.no_app:
        cmd_app(argparse.Namespace(port=a.port, address="127.0.0.1"))


COMMANDS = {"demo": cmd_demo}
