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
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset
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
        payload = json.dumps({"preset": PRESET_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


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
    records: list[dict[str, Any]], spec: InputSpec, train: bool, cache: bool = True
) -> Dataset:
    """CacheDataset runs the deterministic head of the preset once; random parts run per epoch."""
    transform = train_transforms(spec) if train else eval_transforms(spec)
    if cache:
        return CacheDataset(records, transform, progress=False, num_workers=0)
    return Dataset(records, transform)
