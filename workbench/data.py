"""MONAI transform presets and datasets over the decoded-pixel cache.

Nothing here decodes DICOM: images arrive as display-pipeline arrays in ``[0, 1]`` that ingest
cached as ``.npy``. The eval preset keeps the aspect ratio (resize the longest side, then pad);
training adds random augmentation per batch. Both follow the model's contract (input size,
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
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    Resized,
    SpatialPadd,
)
from torch.utils.data import Dataset as TorchDataset

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


# Random augmentation, drawn per sample and applied per batch (on the GPU when training there):
# a small rotation, scale and shift, then contrast, brightness and noise. The parameters of a
# sample come from (seed, epoch, index) alone, so a resumed run or a run split over ranks
# augments every image exactly as an uninterrupted single-process run does.
AUG_P_AFFINE, AUG_ROTATE_2D, AUG_ROTATE_3D, AUG_SCALE, AUG_TRANSLATE = 0.8, 0.15, 0.1, 0.08, 0.05
AUG_P_CONTRAST, AUG_CONTRAST = 0.5, 0.1  # x * (1 + U(-0.1, 0.1))
AUG_P_BRIGHTNESS, AUG_BRIGHTNESS = 0.5, 0.05  # x + U(-0.05, 0.05)
AUG_P_NOISE, AUG_NOISE_STD = 0.3, 0.02  # x + N(0, 0.02)


def draw_augmentation(rng: np.random.Generator, spatial_dims: int) -> np.ndarray:
    """One sample's augmentation parameters as a float64 vector (see :func:`augment_batch`):
    [affine?, rotation angles (1 in 2D, 3 in 3D), scales (per axis), shifts (fraction of the
    side, per axis), contrast?, factor, brightness?, offset, noise?, noise seed]."""
    d = spatial_dims
    angle = AUG_ROTATE_2D if d == 2 else AUG_ROTATE_3D
    n_angles = 1 if d == 2 else 3
    return np.concatenate(
        [
            [rng.random() < AUG_P_AFFINE],
            rng.uniform(-angle, angle, n_angles),
            1.0 + rng.uniform(-AUG_SCALE, AUG_SCALE, d),
            rng.uniform(-AUG_TRANSLATE, AUG_TRANSLATE, d),
            [rng.random() < AUG_P_CONTRAST, rng.uniform(-AUG_CONTRAST, AUG_CONTRAST)],
            [rng.random() < AUG_P_BRIGHTNESS, rng.uniform(-AUG_BRIGHTNESS, AUG_BRIGHTNESS)],
            [rng.random() < AUG_P_NOISE, rng.integers(0, 2**31)],
        ]
    ).astype(np.float64)


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """(B, d, d) rotation matrices from (B, 1) angles (2D) or (B, 3) Euler angles (3D)."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    if angles.shape[1] == 1:
        return torch.stack(
            [torch.stack([c[:, 0], -s[:, 0]], 1), torch.stack([s[:, 0], c[:, 0]], 1)], 1
        )
    rx = torch.stack(
        [
            torch.stack([one, zero, zero], 1),
            torch.stack([zero, c[:, 0], -s[:, 0]], 1),
            torch.stack([zero, s[:, 0], c[:, 0]], 1),
        ],
        1,
    )
    ry = torch.stack(
        [
            torch.stack([c[:, 1], zero, s[:, 1]], 1),
            torch.stack([zero, one, zero], 1),
            torch.stack([-s[:, 1], zero, c[:, 1]], 1),
        ],
        1,
    )
    rz = torch.stack(
        [
            torch.stack([c[:, 2], -s[:, 2], zero], 1),
            torch.stack([s[:, 2], c[:, 2], zero], 1),
            torch.stack([zero, zero, one], 1),
        ],
        1,
    )
    return rz @ ry @ rx


def augment_batch(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply per-sample augmentation ``params`` (B, P) from :func:`draw_augmentation` to a batch
    ``x`` (B, C, *spatial) of display values, in one ``affine_grid`` / ``grid_sample`` for the
    whole batch (bilinear, zero padding) on ``x``'s device.

    Hand-written rather than MONAI's per-sample ``RandAffined`` & co.: those run one image at a
    time on the CPU inside the data loader; this runs once per batch where the batch is, with
    the same kinds and ranges of change. A sample whose affine flag is off is resampled at its
    own pixel centres, which leaves it unchanged.
    """
    b, d = x.shape[0], x.ndim - 2
    n_angles = 1 if d == 2 else 3
    p = params.to(device=x.device, dtype=torch.float32)
    k = 1
    angles = p[:, k : k + n_angles]
    k += n_angles
    scales = p[:, k : k + d]
    k += d
    shifts = p[:, k : k + d] * 2.0  # fraction of the side -> normalised [-1, 1] coordinates
    k += d
    on = p[:, 0:1] > 0.5
    eye = torch.eye(d, device=x.device).expand(b, d, d)
    linear = torch.where(on[:, :, None], _rotation(angles) @ torch.diag_embed(scales), eye)
    shift = torch.where(on, shifts, torch.zeros_like(shifts))
    theta = torch.cat([linear, shift[:, :, None]], dim=2)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    view = (b,) + (1,) * (x.ndim - 1)
    contrast = torch.where(p[:, k] > 0.5, 1.0 + p[:, k + 1], torch.ones_like(p[:, k]))
    brightness = torch.where(p[:, k + 2] > 0.5, p[:, k + 3], torch.zeros_like(p[:, k]))
    out = out * contrast.view(view) + brightness.view(view)
    noisy = [i for i in range(b) if float(params[i, k + 4]) > 0.5]
    if noisy:
        # each sample's noise from its own seed (the same image, the same noise, whatever batch
        # or rank it lands in), drawn on the CPU
        noise = torch.zeros_like(out, device="cpu")
        for i in noisy:
            gen = torch.Generator().manual_seed(int(params[i, k + 5]))
            noise[i] = torch.randn(out.shape[1:], generator=gen) * AUG_NOISE_STD
        out = out + noise.to(out.device)
    return out


class AugmentedDataset(TorchDataset):
    """A deterministic dataset whose samples carry their augmentation parameters ("aug"),
    drawn from (seed, epoch, index): set ``epoch`` before each epoch. The images themselves are
    augmented per batch by :func:`augment_batch`; "image" is a plain tensor (collating MONAI
    MetaTensors with their metadata costs more than the images' copy)."""

    def __init__(self, base: Any, seed: int, spatial_dims: int) -> None:
        self.base, self.seed, self.spatial_dims, self.epoch = base, seed, spatial_dims, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.base[index])
        image = sample["image"]
        sample["image"] = image.as_tensor() if isinstance(image, MetaTensor) else image
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index]))
        sample["aug"] = torch.from_numpy(draw_augmentation(rng, self.spatial_dims))
        return sample


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
    seed: int = 0,
) -> Any:
    """CacheDataset runs the deterministic preset once. With ``train``, the samples carry
    augmentation parameters from (``seed``, epoch, index) (:class:`AugmentedDataset`), applied
    per batch by :func:`augment_batch`.

    ``persist_dir``: keep the deterministic head's outputs on disk across runs instead
    (MONAI's PersistentDataset) under ``persist_dir/<transform hash>/``, each file named by a
    hash of its record (which carries the pixel hash): a tensor is reused only for the same
    pixels through the same preset; change a preset parameter and the folder changes.
    """
    transform = eval_transforms(spec)
    base: Dataset
    if persist_dir is not None:
        folder = Path(persist_dir) / spec.transform_hash()
        base = PersistentDataset(records, transform, cache_dir=folder)
    elif cache:
        base = CacheDataset(records, transform, progress=False, num_workers=0)
    else:
        base = Dataset(records, transform)
    return AugmentedDataset(base, seed, spec.spatial_dims) if train else base
