"""MONAI transform presets and datasets over the decoded-pixel cache.

Nothing here decodes DICOM: images arrive as display-pipeline arrays in ``[0, 1]`` that ingest
cached as ``.npy``. The eval preset keeps the aspect ratio (resize the longest side, then pad);
the train preset adds random augmentation. Both are built from the model's contract (input size,
spatial dims), so a bundle alone says how to feed it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
    SpatialPadd,
)

from workbench.catalog import CohortItem

PRESET_VERSION = 1


@dataclass(frozen=True)
class InputSpec:
    """What the network expects: read from the bundle, never copied by hand."""

    image_size: int
    spatial_dims: int = 2

    def transform_hash(self) -> str:
        """Digest of the deterministic preset as built for this spec: every parameter of every
        eval transform (size, resize mode, padding...) goes in, so changing one changes the
        hash, and with it every cache key and prediction record derived from it."""
        payload = json.dumps(
            {
                "preset": PRESET_VERSION,
                **asdict(self),
                "eval": describe_transforms(eval_transforms(self)),
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    """A transform attribute as JSON data (enums and dtypes by name), or None to skip it."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, list | tuple):
        items = [_plain(v) for v in value]
        return items
    if isinstance(value, type | np.dtype | torch.dtype) or hasattr(value, "value"):
        return str(value)
    return None


def describe_transforms(compose: Compose) -> list[dict[str, Any]]:
    """Each transform's class and public parameters, one level of helper objects deep
    (MONAI's dictionary transforms keep theirs in e.g. ``resizer``, ``padder``)."""
    out = []
    for t in compose.transforms:
        params: dict[str, Any] = {}
        for name, value in sorted(vars(t).items()):
            if name.startswith("_") or callable(value) and not hasattr(value, "__dict__"):
                continue
            plain = _plain(value)
            if plain is not None:
                params[name] = plain
            elif hasattr(value, "__dict__"):
                inner = {
                    k: _plain(v) for k, v in sorted(vars(value).items()) if not k.startswith("_")
                }
                params[name] = {k: v for k, v in inner.items() if v is not None}
        out.append({"transform": type(t).__name__, **params})
    return out


class LoadCachedd(MapTransform):
    """Load a cached display array (``.npy``): (H, W) image or (D, H, W) volume.

    Hand-written because the cache layout is the workbench's own; output is channel-first
    float32: (1, H, W) or (1, D, H, W).
    """

    def __init__(self, keys: Sequence[str] | str = "image") -> None:
        super().__init__(keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = np.load(d[key]).astype(np.float32)[None]
        return d


def eval_transforms(spec: InputSpec) -> Compose:
    """Deterministic preset: load → resize longest side → centre pad → tensor."""
    size = spec.image_size
    return Compose(
        [
            LoadCachedd("image"),
            EnsureTyped("image", track_meta=True),
            Resized("image", spatial_size=size, size_mode="longest", mode="area"),
            SpatialPadd("image", spatial_size=[size] * spec.spatial_dims),
            EnsureTyped("image", dtype=torch.float32, track_meta=True),
        ]
    )


def train_transforms(spec: InputSpec) -> Compose:
    """Eval preset plus random augmentation (small rotation, scale, shift, contrast, noise)."""
    rotate = (0.15,) if spec.spatial_dims == 2 else (0.1, 0.1, 0.1)
    return Compose(
        [
            *eval_transforms(spec).transforms,
            RandAffined(
                "image",
                prob=0.8,
                rotate_range=rotate,
                scale_range=0.08,
                translate_range=spec.image_size * 0.05,
                padding_mode="zeros",
            ),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.05, prob=0.5),
            RandGaussianNoised("image", std=0.02, prob=0.3),
        ]
    )


def to_records(
    items: Sequence[CohortItem],
    classes: Sequence[str],
    target: Callable[[str | None], Any] | None = None,
) -> list[dict[str, Any]]:
    """One record per model input (image or volume) with its study's target: by default the
    label's class index; ``target(label)`` gives another encoding (e.g. a (K,) multi-hot)."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for it in items:
        y = target(it.label) if target is not None else index.get(it.label or "", -1)
        for path, view, ph in zip(it.images, it.views, it.pixel_hashes, strict=True):
            out.append(
                {
                    "image": str(path),
                    "label": y,
                    "study_id": it.study_id,
                    "view": view,
                    "pixel_hash": ph,
                }
            )
    return out


def make_dataset(
    records: list[dict[str, Any]],
    spec: InputSpec,
    train: bool,
    cache: bool = True,
    persist_dir: Path | None = None,
) -> Dataset:
    """CacheDataset runs the deterministic head of the preset once; random parts run per epoch.

    ``persist_dir``: keep the deterministic head's outputs on disk across runs instead
    (MONAI's PersistentDataset) under ``persist_dir/<transform hash>/``, each file named by a
    hash of its record (which carries the pixel hash): a tensor is reused only for the same
    pixels through the same preset; change a preset parameter and the folder changes.
    """
    transform = train_transforms(spec) if train else eval_transforms(spec)
    if persist_dir is not None:
        folder = Path(persist_dir) / spec.transform_hash()
        return PersistentDataset(records, transform, cache_dir=folder)
    if cache:
        return CacheDataset(records, transform, progress=False, num_workers=0)
    return Dataset(records, transform)
