"""The training configuration: one typed record, the only home of `train`'s defaults.

``workbench train``'s options are checked against these fields (``tests/test_cli.py``), take
their defaults from here (an option not given leaves the field's default), and ``workbench
demo`` builds the same record. Imports no torch, so the command line can use it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args, get_type_hints

from workbench.config import SITE_MIN_STUDIES, Device, Precision
from workbench.errors import UsageError

Architecture = Literal["densenet121", "densenet-small"]
Problem = Literal["auto", "binary", "multiclass", "ovr", "multilabel"]
Balance = Literal["weights", "sampler", "none"]
SpatialDims = Literal["auto", "2", "3"]

#: Fields with no `train` option: the split is fixed at ingest's 60 / 20 / 20 by patient, and
#: weight decay is the recipe's (an ablation in BENCHMARKS.md did not favour changing it).
NOT_ON_COMMAND_LINE = frozenset({"split_fractions", "weight_decay"})


@dataclass(frozen=True)
class TrainConfig:
    cohort: str
    name: str
    # None: the step budget below (early stopping, capped by max_steps and time_budget);
    # a number: exactly that many epochs at most, the schedule spread over them.
    epochs: int | None = None
    architecture: Architecture = "densenet121"
    image_size: int = 96
    batch_size: int = 16  # the global batch: split over ranks under torchrun
    lr: float = 1e-3
    weight_decay: float = 1e-4
    precision: Precision = "auto"
    device: Device = "auto"
    seed: int = 0
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    max_steps: int | None = None  # cap on optimiser steps (None: see DEFAULT_MAX_STEPS)
    time_budget: float | None = None  # seconds of training before it stops (None: no limit)
    patience_steps: int | None = None  # steps without a better validation score (None: auto)
    warmup_steps: int | None = None  # linear learning-rate warm-up (None: auto)
    validation_fraction: float = 0.15  # training patients held out for early stopping
    ema_decay: float = 0.0  # > 0: keep an average of the last ~1/(1-d) steps' weights
    flip: float = 0.0  # training augmentation: the probability of mirroring each axis
    rotate: float | None = None  # largest rotation, degrees (None: data.AUG_ROTATE_2D / _3D)
    scale: float | None = None  # largest relative scale change (None: data.AUG_SCALE)
    translate: float | None = None  # largest shift, fraction of the side (None: AUG_TRANSLATE)
    resume: bool = False
    checkpoint_every: int = 50  # optimiser steps between mid-epoch checkpoints (0: epochs only)
    init_from: str | None = None  # a bundle (NAME, NAME/vN, folder) or a weights file (.pt/.pth)
    freeze_blocks: int = 0  # freeze the stem and this many early dense blocks
    backbone_lr_factor: float = 1.0  # backbone learning rate = lr x this
    problem: Problem = "auto"
    balance: Balance = "weights"  # weighted loss | class-balanced draw | none
    folds: int = 0  # K >= 2: patient-level K-fold cross-validation, one bundle per fold
    compile: bool = False  # torch.compile the training forward pass
    coverage: float = 0.9  # target coverage of the conformal prediction sets
    sanity_images: int = 4  # test images for the saliency sanity checks (0: skip them)
    label_randomization_epochs: int = 2  # epochs of the shuffled-label model (0: skip it)
    spatial_dims: SpatialDims = "auto"  # the shape of study trained on (select_shape)
    calibrate_per_site: bool = False  # also fit a calibration map per site (see calibration.py)
    site_min_studies: int = SITE_MIN_STUDIES  # calibration studies a site needs for its own map

    def __post_init__(self) -> None:
        for name, allowed in LITERAL_FIELDS.items():
            value = getattr(self, name)
            if value not in allowed:
                option = "--" + name.replace("_", "-")
                raise UsageError(f"{option} must be one of {', '.join(allowed)}, not {value!r}")


def _literal_fields() -> dict[str, tuple[str, ...]]:
    hints = get_type_hints(TrainConfig)
    return {
        f.name: get_args(hints[f.name])
        for f in dataclasses.fields(TrainConfig)
        if getattr(hints[f.name], "__origin__", None) is Literal
    }


#: The fields whose value is one of a fixed set, with that set (the CLI's ``choices``).
LITERAL_FIELDS: dict[str, tuple[str, ...]] = _literal_fields()
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
#: The defaults, for the command line's help.
DEFAULTS = TrainConfig(cohort="", name="")
