"""What a model bundle says about itself, read without loading it: metadata JSON, versions,
the bundle hash. No torch or MONAI here, so that the app and the listings start quickly
(:mod:`workbench.model.bundle` loads and saves the weights)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.model.contract import ContractError, ModelContract


class BundleError(WorkbenchError):
    """A bundle that is missing, incomplete or inconsistent."""


def hash_bundle(path: Path) -> str:
    """sha256 over the weights and the metadata: what a prediction is traced back to."""
    h = hashlib.sha256()
    for rel in ("models/model.pt", "configs/metadata.json"):
        f = path / rel
        if not f.exists():
            raise BundleError(f"bundle {path} lacks {rel}")
        h.update(rel.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def version_number(version: str) -> int:
    """``v7`` -> 7; -1 for anything that is not a version folder name."""
    m = re.fullmatch(r"v(\d+)", version)
    return int(m.group(1)) if m else -1


@dataclass(frozen=True)
class BundleInfo:
    """A model bundle's identity and its contract (read as JSON; no weights are loaded)."""

    name: str
    version: str
    path: Path
    contract: ModelContract

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def classes(self) -> tuple[str, ...]:
        return self.contract.classes

    @cached_property
    def bundle_hash(self) -> str:
        return hash_bundle(self.path)


def _info(path: Path) -> BundleInfo:
    """A bundle's metadata, read as JSON (no weights) and validated against the model
    contract; BundleError when unreadable or not a contract this workbench reads."""
    try:
        metadata = json.loads((path / "configs" / "metadata.json").read_text())
        contract = ModelContract.from_dict(metadata.get("workbench"))
    except (OSError, ValueError, ContractError) as err:
        raise BundleError(f"bundle {path} is unreadable: {err}") from err
    name = str(metadata.get("name") or path.parent.name)
    return BundleInfo(name, path.name, path, contract)


def read_bundle_info(models_dir: Path, model: str) -> BundleInfo:
    """What a bundle says about itself, for reports and listings: no network is built."""
    return _info(resolve_bundle_path(models_dir, model))


def list_bundles(models_dir: Path) -> list[BundleInfo]:
    """Every readable bundle under ``models_dir``, by name, newest version first.

    Reads ``configs/metadata.json`` only; a bundle whose metadata is unreadable is left out.
    """
    found: list[BundleInfo] = []
    for meta in models_dir.glob("*/v*/configs/metadata.json") if models_dir.is_dir() else []:
        version_dir = meta.parent.parent
        if version_number(version_dir.name) < 0:
            continue
        try:
            found.append(_info(version_dir))
        except BundleError:
            continue
    return sorted(found, key=lambda b: (b.name, -version_number(b.version)))


def resolve_bundle_path(models_dir: Path, model: str) -> Path:
    """A bundle folder from a path, ``NAME/VERSION`` or ``NAME`` (its latest version)."""
    p = Path(model)
    if (p / "configs" / "metadata.json").exists():
        return p
    candidate = models_dir / model
    if (candidate / "configs" / "metadata.json").exists():
        return candidate
    if candidate.is_dir():
        versions = sorted(
            (version_number(d.name), d)
            for d in candidate.iterdir()
            if d.is_dir() and version_number(d.name) >= 0
        )
        if versions:
            return versions[-1][1]
    raise BundleError(f"no model bundle {model!r} (looked in {models_dir})")
