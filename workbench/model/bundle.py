"""Save and load trained models as MONAI bundles under ``models/NAME/VERSION/``.

Layout (MONAI's bundle specification)::

    configs/metadata.json   MONAI metadata + a "workbench" section: the model's whole contract
                            (classes, input size, intensity window, calibration, cohort hash,
                            split, metrics, code version) — enough to predict and to audit;
                            with per-site calibration, "site_calibration" holds each site's
                            map and the sites that use the global one, as JSON
    configs/inference.json  the network definition in MONAI's config syntax, for MONAI tools
    models/model.pt         the state dict, loaded with ``weights_only=True``
    docs/README.md          a short model card

Nothing executable is read back: the loader builds the network from our own factory with the
architecture named in the metadata, and weights are plain tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from torch import nn

import workbench
from workbench.model.bundle_info import (
    BundleError,
    read_bundle_info,
    version_number,
)
from workbench.model.contract import CONTRACT_VERSION, ContractError, ModelContract
from workbench.model.data import InputSpec, Normalization
from workbench.model.nets import create_network
from workbench.posthoc.calibration import Calibration, LabelCalibration, calibration_from_dict
from workbench.posthoc.site_calibration import GLOBAL_MAP, SiteCalibration


@dataclass(frozen=True)
class Bundle:
    """A loaded model bundle: the network in eval mode and its contract."""

    path: Path
    name: str
    version: str
    network: nn.Module
    classes: tuple[str, ...]
    spec: InputSpec
    calibration: Calibration | LabelCalibration
    negative_class: str | None
    contract: ModelContract
    bundle_hash: str
    # per-site maps beside ``calibration`` (the global map); None when trained without them
    site_calibration: SiteCalibration | None = None

    def calibration_for(self, site: str | None) -> tuple[Calibration | LabelCalibration, str]:
        """The map that calibrates a study of ``site`` and its name as predictions record it:
        ``"site:NAME"`` for the site's own map, else ``"global"``."""
        if self.site_calibration is None:
            return self.calibration, GLOBAL_MAP
        return self.site_calibration.map_for(site)

    @property
    def problem(self) -> str:
        """binary, multiclass, ovr or multilabel (bundles from before problems: softmax)."""
        return self.contract.problem

    @property
    def thresholds(self) -> list[float] | None:
        """Per-label decision thresholds of a sigmoid (ovr / multilabel) model, in class order."""
        return self.contract.threshold_list()


def code_version() -> str:
    """Package version plus the git commit (and '+dirty') when run from a checkout."""
    root = Path(__file__).resolve().parents[2]  # the checkout: workbench/model/bundle.py
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"{workbench.__version__}+g{commit}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return workbench.__version__


def _next_version(model_dir: Path) -> str:
    numbers = [version_number(p.name) for p in model_dir.glob("v*") if p.is_dir()]
    return f"v{max(numbers, default=0) + 1}"


def save_bundle(
    models_dir: Path,
    name: str,
    network: nn.Module,
    classes: tuple[str, ...],
    spec: InputSpec,
    calibration: Calibration | LabelCalibration,
    extra: dict[str, Any],
    negative_class: str | None = None,
    figures: dict[str, bytes] | None = None,
    data_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a new version of model ``name``; returns the bundle folder.

    ``figures`` (file name -> PNG bytes) go to ``docs/``, e.g. the training curves.
    ``data_files`` (file name -> bytes, arrays saved with ``np.savez``) go to ``models/`` beside
    the weights, e.g. the similar-case index; the metadata lists their sha256 (so the bundle
    hash, which covers the metadata, covers them too).

    Written to a temporary folder and renamed into place, so a crash never leaves half a bundle.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise BundleError(f"model name {name!r}: use letters, digits, '.', '_' and '-'")
    model_dir = models_dir / name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = _next_version(model_dir)
    tmp = model_dir / f".{version}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    for sub in ("configs", "models", "docs"):
        (tmp / sub).mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    torch.save(state, tmp / "models" / "model.pt")
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    in_shape = [1] + [spec.image_size] * spec.spatial_dims
    architecture = str(extra.get("training", {}).get("architecture", "densenet121"))
    try:
        contract = ModelContract.from_dict(
            {
                "architecture": architecture,
                "classes": list(classes),
                "negative_class": negative_class,
                "image_size": spec.image_size,
                "spatial_dims": spec.spatial_dims,
                "intensity_window": {
                    "source": "DICOM display pipeline (VOI window or LUT), output in [0, 1]",
                    "range": [0.0, 1.0],
                },
                # x' = (x * scale - mean) / std on display pixels, applied by the eval preset
                # (imported weights; see workbench.model.weights); null: display pixels as they are
                "normalization": spec.normalization.to_dict() if spec.normalization else None,
                "transform_hash": spec.transform_hash(),
                "calibration": calibration.to_dict(),
                "created": now,
                "code_version": code_version(),
                "platform": platform.platform(),
                **extra,
                "data_files": {
                    Path(n).name: hashlib.sha256(d).hexdigest()
                    for n, d in (data_files or {}).items()
                },
                "contract_version": CONTRACT_VERSION,
            }
        )
    except ContractError as err:
        raise BundleError(f"model {name}: {err}") from None
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20240725.json",
        "version": version.removeprefix("v") + ".0.0",
        "changelog": {version.removeprefix("v") + ".0.0": f"trained {now}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"workbench": workbench.__version__},
        "name": name,
        "task": f"{'3D' if spec.spatial_dims == 3 else '2D'} image classification",
        "description": f"{architecture} classifying {', '.join(classes)}",
        "authors": "medical imaging classification workbench",
        "copyright": "trained locally; see the training cohort hash",
        "intended_use": "Research and decision support under clinician review; not for "
        "autonomous diagnosis.",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": extra.get("modality", "DX"),
                    "num_channels": 1,
                    "spatial_shape": in_shape[1:],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "display-pipeline intensity"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    # softmax rows sum to one; sigmoid (ovr / multilabel) outputs are per label
                    "format": "labels"
                    if extra.get("problem") in ("ovr", "multilabel")
                    else "classes",
                    "num_channels": len(classes),
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_onehot": extra.get("problem") not in ("ovr", "multilabel"),
                    "channel_def": {str(i): c for i, c in enumerate(classes)},
                }
            },
        },
        "workbench": contract.to_dict(),
    }
    (tmp / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2, default=float))
    inference = {
        "network_def": {
            "_target_": "monai.networks.nets.DenseNet121",
            "spatial_dims": spec.spatial_dims,
            "in_channels": 1,
            "out_channels": len(classes),
        },
        "network": "$@network_def",
    }
    (tmp / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    (tmp / "docs" / "README.md").write_text(_model_card(name, version, metadata, contract))
    for file_name, data in (figures or {}).items():
        (tmp / "docs" / Path(file_name).name).write_bytes(data)
    for file_name, data in (data_files or {}).items():
        (tmp / "models" / Path(file_name).name).write_bytes(data)
    final = model_dir / version
    os.replace(tmp, final)
    return final


def _model_card(name: str, version: str, metadata: dict[str, Any], c: ModelContract) -> str:
    metrics = c.test_metrics
    lines = [
        f"# {name} {version}",
        "",
        metadata["description"] + ".",
        "",
        f"Intended use: {metadata['intended_use']}",
        "",
        f"- input: {c.spatial_dims}D, {c.image_size} px, display pixels in [0, 1]"
        + _normalization_note(c),
        f"- training cohort: {c.cohort} (hash {str(c.cohort_hash)[:16]})",
        f"- calibration: {c.calibration_method}{_site_maps(c)}",
        f"- code: {c.code_version}",
        "- training curves: training.png beside this file",
    ]
    lines += [f"- test {k}: {v:.3f}" for k, v in metrics.items() if isinstance(v, float)]
    warning = c.calibration_warning
    if warning:
        lines += ["", f"**Warning: {warning}.**"]
    return "\n".join(lines) + "\n"


def _normalization_note(c: ModelContract) -> str:
    """The model card's note on the input normalization (empty without one)."""
    n = c.normalization
    if not n:
        return ""
    return f", normalised as (x * {n['scale']:g} - {n['mean']:g}) / {n['std']:g}"


def _site_maps(c: ModelContract) -> str:
    """The model card's note on per-site calibration maps (empty without them)."""
    per_site = c.site_calibration
    if not per_site:
        return ""
    own = ", ".join(f"{site} ({m['method']})" for site, m in per_site["sites"].items())
    shared = ", ".join(per_site["fallback"])
    return f"; per site: {own or 'none'}" + (f"; global map for {shared}" if shared else "")


def load_bundle(models_dir: Path, model: str, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle for inference: weights only, network built by our factory, eval mode."""
    info = read_bundle_info(models_dir, model)
    path, c = info.path, info.contract
    try:
        classes = c.classes
        spec = InputSpec(
            image_size=c.image_size,
            spatial_dims=c.spatial_dims,
            # absent in bundles from before imported weights: display pixels as they are
            normalization=Normalization.from_dict(c.normalization),
        )
        network = create_network(spec.spatial_dims, len(classes), architecture=c.architecture)
        state = torch.load(path / "models" / "model.pt", map_location="cpu", weights_only=True)
        network.load_state_dict(state)
        calibration = calibration_from_dict(c.calibration)
        per_site = c.site_calibration  # absent in bundles trained without per-site maps
        site_calibration = SiteCalibration.from_dict(per_site, calibration) if per_site else None
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise BundleError(f"bundle {path} is unreadable: {err}") from err
    network.to(device).eval()
    return Bundle(
        path=path,
        name=info.name,
        version=info.version,
        network=network,
        classes=classes,
        spec=spec,
        calibration=calibration,
        negative_class=c.negative_class,
        contract=c,
        bundle_hash=info.bundle_hash,
        site_calibration=site_calibration,
    )
