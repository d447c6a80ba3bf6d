"""The model contract: what a bundle's ``configs/metadata.json`` says under ``"workbench"``, as
one typed, versioned record, validated whenever a bundle is read or written.

Everything that reads a bundle's metadata reads this record's attributes; only this module
knows the JSON keys. The sections that are reports in themselves (``metrics``, ``trust``,
``training``, ``split``, ``calibration_fit``, the calibration maps) stay JSON objects, owned by
the modules that write them.

Versions: 1 is every bundle from before this record (no ``contract_version`` key; ``problem``,
``normalization``, ``thresholds`` and the per-site maps may be absent, thresholds may sit
under ``operating_point``); 2 is this record. An older bundle is upgraded in memory when read
(its files are never rewritten, so its hash is unchanged); a newer one is refused with one
line. No torch here: the app and the listings read contracts without loading a network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from workbench.errors import WorkbenchError

#: The contract version this workbench writes and the newest it reads.
CONTRACT_VERSION = 2
PROBLEM_KINDS = ("binary", "multiclass", "ovr", "multilabel")
SIGMOID_KINDS = ("ovr", "multilabel")


@dataclass(frozen=True)
class RunRecord:
    """What listings and reports read of a model's training run (``ModelContract.run``)."""

    where: str  # the GPU, else the CPU model, else the device; "N x ..." for N processes
    epochs_run: int
    best_epoch: int | None
    epochs: int | None  # the --epochs asked for (None: the step budget)
    seconds: float | None
    precision: str
    precision_reason: str | None  # why precision auto chose it


class ContractError(WorkbenchError):
    """Bundle metadata that does not follow the contract (or a newer contract)."""


@dataclass(frozen=True)
class ModelContract:
    """A trained model's contract: how to build and feed it, what it outputs, how it was made."""

    classes: tuple[str, ...]
    image_size: int
    spatial_dims: int
    calibration: dict[str, Any]  # calibration.calibration_from_dict reads it
    architecture: str = "densenet121"
    problem: str = "multiclass"
    negative_class: str | None = None
    # x' = (x * scale - mean) / std on display pixels (imported weights); None: as displayed
    normalization: dict[str, float] | None = None
    intensity_window: dict[str, Any] = field(default_factory=dict)
    transform_hash: str = ""
    # per-label decision thresholds of a sigmoid model (class -> probability); None: argmax
    thresholds: dict[str, float] | None = None
    threshold_rule: str | None = None
    site_calibration: dict[str, Any] | None = None  # calibration.SiteCalibration.from_dict
    modality: str | None = None
    cohort: str | None = None
    cohort_hash: str | None = None
    created: str = ""
    code_version: str = ""
    platform: str = ""
    split: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    calibration_fit: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    trust: dict[str, Any] = field(default_factory=dict)
    data_files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    contract_version: int = CONTRACT_VERSION
    # keys this version does not know (kept, so reading and writing loses nothing)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.classes or not all(isinstance(c, str) and c for c in self.classes):
            raise ContractError(f"classes must be a non-empty list of names, not {self.classes}")
        if self.image_size < 1:
            raise ContractError(f"image_size must be positive, not {self.image_size}")
        if self.spatial_dims not in (2, 3):
            raise ContractError(f"spatial_dims must be 2 or 3, not {self.spatial_dims}")
        if self.problem not in PROBLEM_KINDS:
            raise ContractError(f"problem must be one of {', '.join(PROBLEM_KINDS)}")
        if "method" not in self.calibration:
            raise ContractError("calibration has no method")
        # softmax: the negative class is one of the classes; sigmoid: the name of "none of
        # the labels" (e.g. no_finding), which is not a label
        softmax_negative = self.negative_class is not None and not self.sigmoid
        if softmax_negative and self.negative_class not in self.classes:
            raise ContractError(f"negative_class {self.negative_class!r} is not a class")

    @property
    def sigmoid(self) -> bool:
        """One probability per label (ovr, multilabel) rather than a softmax over classes."""
        return self.problem in SIGMOID_KINDS

    @property
    def test_metrics(self) -> dict[str, Any]:
        """The summary of the test split recorded at training (``{}`` when absent)."""
        return dict(self.metrics.get("test") or {})

    @property
    def test_detail(self) -> dict[str, Any]:
        """The full test-split metrics recorded at training, CIs and per class (``{}``)."""
        return dict(self.metrics.get("test_detail") or {})

    @property
    def split_seed(self) -> int | None:
        """The seed of the cohort's train / calibration / test split."""
        seed = self.split.get("seed")
        return None if seed is None else int(seed)

    @property
    def split_studies(self) -> dict[str, int] | None:
        """Studies per split at training."""
        studies = self.split.get("studies")
        return None if studies is None else {str(k): int(v) for k, v in studies.items()}

    @property
    def label_sources(self) -> dict[str, int] | None:
        """Training studies by where their label came from ("csv", "read", "adjudicated"),
        over every split; None for a bundle trained before the sources were recorded."""
        by_split = self.split.get("label_sources")
        if not by_split:
            return None
        total: dict[str, int] = {}
        for counts in by_split.values():
            for source, n in counts.items():
                total[str(source)] = total.get(str(source), 0) + int(n)
        return dict(sorted(total.items()))

    @property
    def conformal_record(self) -> dict[str, Any] | None:
        """The conformal predictor's record in the trust section, when the bundle has one."""
        record = self.trust.get("conformal")
        return dict(record) if record else None

    @property
    def has_ood_detector(self) -> bool:
        return bool(self.trust.get("ood"))

    @property
    def run(self) -> RunRecord:
        """How the model was trained, as the listings and the report show it."""
        tr = self.training
        hw = tr.get("hardware") or {}
        where = str(hw.get("gpu") or hw.get("cpu") or tr.get("device", "?"))
        processes = int(hw.get("processes", 1) or 1)
        choice = tr.get("precision_choice") or {}
        seconds = tr.get("seconds")
        return RunRecord(
            where=f"{processes} x {where}" if processes > 1 else where,
            epochs_run=int(tr.get("epochs_run", len(tr.get("history", [])))),
            best_epoch=tr.get("best_epoch"),
            epochs=tr.get("epochs"),
            seconds=None if seconds is None else float(seconds),
            precision=str(tr.get("precision", "?")),
            precision_reason=choice.get("reason"),
        )

    @property
    def calibration_method(self) -> str:
        return str(self.calibration["method"])

    @property
    def calibration_warning(self) -> str | None:
        warning = (self.calibration_fit.get("check") or {}).get("warning")
        return None if warning is None else str(warning)

    def threshold_list(self) -> list[float] | None:
        """The thresholds in class order, or None (argmax)."""
        if not self.thresholds:
            return None
        return [float(self.thresholds[c]) for c in self.classes]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written under ``"workbench"`` (unknown keys read earlier included)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["classes"] = list(self.classes)
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelContract:
        """Validate and upgrade a ``"workbench"`` object; ContractError says what is wrong."""
        if not isinstance(raw, Mapping):
            raise ContractError("the bundle metadata has no workbench section")
        version = raw.get("contract_version", 1)
        if not isinstance(version, int) or version < 1:
            raise ContractError(f"contract_version must be a positive integer, not {version!r}")
        if version > CONTRACT_VERSION:
            raise ContractError(
                f"the bundle follows model contract {version}, newer than this workbench's "
                f"{CONTRACT_VERSION}: upgrade the workbench to use it"
            )
        d = dict(raw)
        if version == 1:
            d = _upgrade_from_1(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = [
            k for k in ("classes", "image_size", "spatial_dims", "calibration") if k not in d
        ]
        if missing:
            raise ContractError(f"the bundle metadata lacks {', '.join(missing)}")
        values = {k: v for k, v in d.items() if k in known}
        try:
            values["classes"] = tuple(str(c) for c in values["classes"])
            values["image_size"] = int(values["image_size"])
            values["spatial_dims"] = int(values["spatial_dims"])
            values["problem"] = str(values.get("problem") or "multiclass")
            values["contract_version"] = CONTRACT_VERSION
            for name in ("split", "training", "calibration_fit", "metrics", "trust"):
                values[name] = dict(values.get(name) or {})
            values["intensity_window"] = dict(values.get("intensity_window") or {})
            values["data_files"] = {str(k): str(v) for k, v in (d.get("data_files") or {}).items()}
            if values.get("thresholds") is not None:
                values["thresholds"] = {str(k): float(v) for k, v in values["thresholds"].items()}
        except (TypeError, ValueError, AttributeError) as err:
            raise ContractError(f"the bundle metadata is malformed: {err}") from None
        return cls(**values, extra={k: v for k, v in d.items() if k not in known})


def _upgrade_from_1(d: dict[str, Any]) -> dict[str, Any]:
    """Version 1 (bundles written before the typed record) to version 2: the thresholds of
    ``operating_point`` move to ``thresholds``; absent fields take their defaults."""
    op = d.get("operating_point")
    if d.get("thresholds") is None and isinstance(op, Mapping):
        raw = op.get("thresholds")
        if isinstance(raw, Mapping):
            d["thresholds"] = {str(k): v for k, v in raw.items() if isinstance(v, int | float)}
    return d
