"""Commands that make and list models: ``models``, ``train``, ``weights``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from workbench.cli.common import num
from workbench.config import Settings, environment_value, get_settings
from workbench.errors import NotFoundError
from workbench.model.bundle_info import list_bundles
from workbench.model.contract import ModelContract
from workbench.review.promotion import promoted_model
from workbench.train.config import (
    ARCHITECTURES,
    DEFAULTS,
    LITERAL_FIELDS,
    NOT_ON_COMMAND_LINE,
    TrainConfig,
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this group's commands to the parser."""
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
        "or weights:NAME from `workbench weights import` (with their input normalization); "
        "promoted: the model promoted for the task named --name (promoted:TASK for another)",
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
    s.set_defaults(**train_option_defaults())

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


def train_option_defaults() -> dict[str, object]:
    """`train`'s option defaults, taken from :class:`TrainConfig` (precision and device: None,
    which :func:`train_config` reads as the environment's setting)."""
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    skip = NOT_ON_COMMAND_LINE | {"cohort", "name", "precision", "device"}
    return {name: getattr(DEFAULTS, name) for name in fields if name not in skip}


def train_config(a: argparse.Namespace, settings: Settings) -> TrainConfig:
    """The training record from `train`'s options: every field the options name, the rest the
    dataclass's defaults. A flag wins for precision and device; otherwise WORKBENCH_PRECISION /
    WORKBENCH_DEVICE, as every command."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(a).items() if k in fields}
    values["precision"] = a.precision or settings.precision
    values["device"] = a.device or settings.device
    values["init_from"] = resolve_init_from(settings, a.init_from, a.name)
    return TrainConfig(**values)


#: ``--init-from promoted`` starts from the model promoted for the task named like the new
#: model; ``promoted:TASK`` from another task's.
PROMOTED = "promoted"


def resolve_init_from(settings: Settings, init_from: str | None, name: str) -> str | None:
    """``--init-from`` with ``promoted[:TASK]`` replaced by the promoted ``NAME/VERSION``, so
    that the bundle records which model it was fine-tuned from."""
    if init_from is None or init_from.partition(":")[0] != PROMOTED:
        return init_from
    task = init_from.partition(":")[2] or name
    ref = promoted_model(settings, task)
    if ref is None:
        raise NotFoundError(
            f"--init-from {init_from}: no model is promoted for task {task!r} "
            "(see `workbench promote`)"
        )
    return ref


def cmd_models(a: argparse.Namespace) -> None:
    bundles = list_bundles(get_settings().models_dir)
    for b in bundles:
        print(model_line(b.ref, b.contract))
    print(f"{len(bundles)} model bundles")


def model_line(ref: str, wb: ModelContract) -> str:
    """One bundle's experiment record in a line: problem, test AUROC and ECE, epochs,
    duration, hardware."""
    test = wb.test_metrics
    run = wb.run
    precision = run.precision + (f" ({run.precision_reason})" if run.precision_reason else "")
    return (
        f"{ref}  {wb.architecture}  {wb.problem}  "
        f"cohort {wb.cohort}  "
        f"classes {','.join(wb.classes)}  AUROC {num(test.get('auroc_macro'))}  "
        f"ECE {num(test.get('ece_after'))}  epochs {run.epochs_run}  "
        f"{num(run.seconds, '.0f')} s  on {run.where}  precision {precision}  "
        f"created {wb.created}"
    )


def cmd_train(a: argparse.Namespace) -> None:
    settings = get_settings()
    train_and_report(settings, train_config(a, settings))


def train_and_report(settings: Settings, cfg: TrainConfig) -> None:
    from workbench.train.training import train

    # Under torchrun only rank 0 reports (every rank returns the same result).
    main_rank = (environment_value("RANK") or "0") == "0"
    res = train(settings, cfg, progress=main_rank)
    if not main_rank:
        return
    m = res.metrics
    print(
        f"bundle {res.bundle}: best epoch {res.best_epoch}, test accuracy {num(m['accuracy'])}, "
        f"macro AUROC {num(m['auroc_macro'])}, "
        f"ECE {num(m['ece_before'])} → {num(m['ece_after'])}"
        + (
            f" per site (global map alone: {num(m['ece_after_global'])})"
            if "ece_after_global" in m
            else ""
        )
    )
    for label, auroc in (m.get("auroc_per_label") or {}).items():
        print(f"  {label}: AUROC {num(auroc)}")
    if m.get("calibration_warning"):
        print(f"warning: {m['calibration_warning']}")
    if res.folds:
        f = res.folds
        for key in ("accuracy", "auroc_macro", "ece_after"):
            print(f"{f['folds']}-fold {key}: {num(f[key]['mean'])} ± {num(f[key]['sd'])}")
        print(f"cross-validation record: {f.get('path')}")


def cmd_weights(a: argparse.Namespace) -> None:
    from workbench.model import weights

    settings = get_settings()
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


COMMANDS = {"models": cmd_models, "train": cmd_train, "weights": cmd_weights}
