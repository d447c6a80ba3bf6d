"""MONAI transform presets and datasets over the decoded-pixel cache.

Nothing here decodes DICOM: images arrive as display-pipeline arrays in ``[0, 1]`` that ingest
cached as ``.npy``. The eval preset keeps the aspect ratio (resize the longest side, then pad);
training adds random augmentation per batch. Both follow the model's contract (input size,
spatial dims), so a bundle alone says how to feed it.
"""

from __future__ import annotations

import hashlib
import json
import math
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
    ScaleIntensityRanged,
    SpatialPadd,
)
from torch.utils.data import Dataset as TorchDataset

from workbench.catalog.cohorts import MIN_VOLUME_SLICES, CohortItem
from workbench.errors import UsageError, WorkbenchError

PRESET_VERSION = 1


@dataclass(frozen=True)
class Normalization:
    """The intensity map a network's first layer was trained on, applied to display pixels
    ``x`` in ``[0, 1]``: ``x' = (x * scale - mean) / std``.

    ``scale`` takes the display value to the range the source's mean and std are given in
    (1 for ImageNet statistics on [0, 1] pixels; 2048 with mean 1024 and std 1 for
    TorchXRayVision's [-1024, 1024]).
    """

    scale: float = 1.0
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if not (self.std > 0 and self.scale > 0):
            raise ValueError(f"normalization needs scale > 0 and std > 0, not {self}")

    def apply(self, x: Any) -> Any:
        """``x`` (display values) as the network sees them."""
        return (x * self.scale - self.mean) / self.std

    def invert(self, x: Any) -> Any:
        """Network input back to display values."""
        return (x * self.std + self.mean) / self.scale

    def to_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Normalization | None:
        """The map a bundle's metadata records (None when it records none)."""
        if not d:
            return None
        return cls(scale=float(d["scale"]), mean=float(d["mean"]), std=float(d["std"]))


@dataclass(frozen=True)
class InputSpec:
    """What the network expects: read from the bundle, never copied by hand.

    ``normalization``: the intensity map of imported weights (see ``workbench.model.weights``),
    applied last by the eval preset; None (the default) feeds display pixels in [0, 1].
    """

    image_size: int
    spatial_dims: int = 2
    normalization: Normalization | None = None

    def transform_hash(self) -> str:
        """Digest of the deterministic preset as built for this spec: every parameter of every
        eval transform (size, resize mode, padding...) goes in, so changing one changes the
        hash, and with it every cache key and prediction record derived from it. A spec without
        normalization hashes exactly as before the field existed (old bundles keep theirs)."""
        fields = asdict(self)
        if self.normalization is None:
            del fields["normalization"]
        payload = json.dumps(
            {
                "preset": PRESET_VERSION,
                **fields,
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
    float32: (1, H, W) or (1, D, H, W). For a 2D model a short stack (fewer slices than
    :data:`workbench.catalog.cohorts.MIN_VOLUME_SLICES`, so a 2D study by the shape rule) gives its
    middle slice.
    """

    def __init__(self, keys: Sequence[str] | str = "image", spatial_dims: int = 2) -> None:
        super().__init__(keys)
        # Private, so the preset's description (and with it every existing transform hash)
        # is unchanged: inputs that loaded before load exactly as before.
        self._spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            array = np.load(d[key])
            if self._spatial_dims == 2 and array.ndim == 3:
                if array.shape[0] >= MIN_VOLUME_SLICES:
                    raise ValueError(
                        f"a volume of {array.shape[0]} slices for a 2D model "
                        f"(a study with at least {MIN_VOLUME_SLICES} slices is 3D)"
                    )
                array = array[array.shape[0] // 2]
            if array.ndim != self._spatial_dims:
                raise ValueError(
                    f"a {array.ndim}D image for a {self._spatial_dims}D model "
                    f"(shape {tuple(array.shape)})"
                )
            d[key] = array.astype(np.float32)[None]
        return d


class StudyInputError(WorkbenchError):
    """A study's input failed in a transform or the network: the message names the study."""


def study_error(err: BaseException, where: str) -> StudyInputError:
    """One line naming ``where`` (the study) and the innermost cause of ``err`` (MONAI wraps a
    transform's error as "applying transform <object at 0x...>", which names neither)."""
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return StudyInputError(f"{where}: {type(cause).__name__}: {text}".rstrip(": "))


class StudyCompose(Compose):
    """MONAI's Compose whose errors name the record's study (its ``study_key``) and the cause,
    in one line; the original exception is kept as ``__cause__`` (``WORKBENCH_DEBUG=1``)."""

    def __call__(  # Compose's own signature, as MONAI declares it
        self,
        input_: Any,
        start: int = 0,
        end: int | None = None,
        threading: bool = False,
        lazy: bool | None = None,
    ) -> Any:
        try:
            return super().__call__(input_, start, end, threading, lazy)
        except Exception as err:
            study = input_.get("study_key") if isinstance(input_, Mapping) else None
            where = f"study {study}" if study else f"input {input_!r:.80}"
            raise study_error(err, where) from err


def eval_transforms(spec: InputSpec) -> Compose:
    """Deterministic preset: load → resize longest side → centre pad → tensor."""
    size = spec.image_size
    return StudyCompose(
        [
            LoadCachedd("image", spec.spatial_dims),
            EnsureTyped("image", track_meta=True),
            Resized("image", spatial_size=size, size_mode="longest", mode="area"),
            SpatialPadd("image", spatial_size=[size] * spec.spatial_dims),
            EnsureTyped("image", dtype=torch.float32, track_meta=True),
        ]
        + _normalize(spec)
    )


def _normalize(spec: InputSpec) -> list[MapTransform]:
    """The spec's normalization as a transform ([] without one, so the preset, and its hash,
    stay as they were): the linear map that takes display 0 and 1 where ``Normalization``
    does."""
    n = spec.normalization
    if n is None:
        return []
    low, high = float(n.apply(0.0)), float(n.apply(1.0))
    return [ScaleIntensityRanged("image", a_min=0.0, a_max=1.0, b_min=low, b_max=high)]


# Random augmentation, drawn per sample and applied per batch (on the GPU when training there):
# a small rotation, scale and shift, then contrast, brightness and noise. The parameters of a
# sample come from (seed, epoch, index) alone, so a resumed run or a run split over ranks
# augments every image exactly as an uninterrupted single-process run does.
AUG_P_AFFINE, AUG_ROTATE_2D, AUG_ROTATE_3D, AUG_SCALE, AUG_TRANSLATE = 0.8, 0.15, 0.1, 0.08, 0.05
AUG_P_CONTRAST, AUG_CONTRAST = 0.5, 0.1  # x * (1 + U(-0.1, 0.1))
AUG_P_BRIGHTNESS, AUG_BRIGHTNESS = 0.5, 0.05  # x + U(-0.05, 0.05)
AUG_P_NOISE, AUG_NOISE_STD = 0.3, 0.02  # x + N(0, 0.02)


@dataclass(frozen=True)
class AffineRanges:
    """The largest rotation (radians: in-plane in 2D, about each axis in 3D), relative scale
    change and shift (a fraction of the side) that the training augmentation draws, each
    uniformly in [-x, x]."""

    rotate_2d: float = AUG_ROTATE_2D
    rotate_3d: float = AUG_ROTATE_3D
    scale: float = AUG_SCALE
    translate: float = AUG_TRANSLATE

    @classmethod
    def of(
        cls, rotate_degrees: float | None, scale: float | None, translate: float | None
    ) -> AffineRanges:
        """The standard ranges with the ones given replaced (``rotate_degrees`` for both 2D
        and 3D); ``None`` keeps a standard range exactly."""
        if rotate_degrees is not None and not 0.0 <= rotate_degrees <= 180.0:
            raise UsageError(f"--rotate must be in [0, 180] degrees, not {rotate_degrees}")
        if scale is not None and not 0.0 <= scale < 1.0:
            raise UsageError(f"--scale must be in [0, 1), not {scale}")
        if translate is not None and not 0.0 <= translate <= 0.5:
            raise UsageError(f"--translate must be in [0, 0.5], not {translate}")
        angle = None if rotate_degrees is None else math.radians(rotate_degrees)
        return cls(
            AUG_ROTATE_2D if angle is None else angle,
            AUG_ROTATE_3D if angle is None else angle,
            AUG_SCALE if scale is None else scale,
            AUG_TRANSLATE if translate is None else translate,
        )


STANDARD_AFFINE = AffineRanges()


def draw_augmentation(
    rng: np.random.Generator,
    spatial_dims: int,
    flip: float = 0.0,
    affine: AffineRanges = STANDARD_AFFINE,
) -> np.ndarray:
    """One sample's augmentation parameters as a float64 vector (see :func:`augment_batch`):
    [affine?, rotation angles (1 in 2D, 3 in 3D), scales (per axis), shifts (fraction of the
    side, per axis), contrast?, factor, brightness?, offset, noise?, noise seed].

    ``flip``: the probability of mirroring each axis, drawn after the rest (so that 0 draws
    exactly what it drew before flips existed) and carried as a negative scale, which turns
    the affine on. ``affine``: the ranges of rotation, scale and shift.
    """
    d = spatial_dims
    angle = affine.rotate_2d if d == 2 else affine.rotate_3d
    n_angles = 1 if d == 2 else 3
    params = np.concatenate(
        [
            [rng.random() < AUG_P_AFFINE],
            rng.uniform(-angle, angle, n_angles),
            1.0 + rng.uniform(-affine.scale, affine.scale, d),
            rng.uniform(-affine.translate, affine.translate, d),
            [rng.random() < AUG_P_CONTRAST, rng.uniform(-AUG_CONTRAST, AUG_CONTRAST)],
            [rng.random() < AUG_P_BRIGHTNESS, rng.uniform(-AUG_BRIGHTNESS, AUG_BRIGHTNESS)],
            [rng.random() < AUG_P_NOISE, rng.integers(0, 2**31)],
        ]
    ).astype(np.float64)
    if flip > 0.0:
        mirrored = rng.random(d) < flip
        if mirrored.any():
            params[1 + n_angles : 1 + n_angles + d] *= np.where(mirrored, -1.0, 1.0)
            params[0] = 1.0
    return params


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


def _aug_size(spatial_dims: int) -> int:
    """Length of :func:`draw_augmentation`'s vector."""
    return 1 + (1 if spatial_dims == 2 else 3) + 2 * spatial_dims + 6


def augment_batch(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply per-sample augmentation ``params`` (B, P) from :func:`draw_augmentation` to a batch
    ``x`` (B, C, *spatial) of display values, in one ``affine_grid`` / ``grid_sample`` for the
    whole batch (bilinear, zero padding) on ``x``'s device.

    Hand-written rather than MONAI's per-sample ``RandAffined`` & co.: those run one image at a
    time on the CPU inside the data loader; this runs once per batch where the batch is, with
    the same kinds and ranges of change. A sample whose affine flag is off is resampled at its
    own pixel centres, which leaves it unchanged.

    Inputs normalised for imported weights (``params`` ends with the spec's normalization
    ``scale, mean, std``, as :class:`AugmentedDataset` appends it) are taken back to display
    values, augmented as any other, and normalised again: the same change in either case.
    """
    b, d = x.shape[0], x.ndim - 2
    if params.shape[1] == _aug_size(d) + 3:
        view = (b,) + (1,) * (x.ndim - 1)
        norm = params[:, -3:].to(device=x.device, dtype=x.dtype)
        scale, mean, std = (norm[:, i].reshape(view) for i in range(3))
        out = augment_batch((x * std + mean) / scale, params[:, :-3])
        return (out * scale - mean) / std
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
    MetaTensors with their metadata costs more than the images' copy).

    ``normalization`` (the spec's, when its images are normalised) is appended to each
    sample's parameters, so that :func:`augment_batch` augments display values."""

    def __init__(
        self,
        base: Any,
        seed: int,
        spatial_dims: int,
        normalization: Normalization | None = None,
        flip: float = 0.0,
        affine: AffineRanges = STANDARD_AFFINE,
    ) -> None:
        self.base, self.seed, self.spatial_dims, self.epoch = base, seed, spatial_dims, 0
        self.normalization, self.flip, self.affine = normalization, flip, affine

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.base[index])
        image = sample["image"]
        sample["image"] = image.as_tensor() if isinstance(image, MetaTensor) else image
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index]))
        params = draw_augmentation(rng, self.spatial_dims, self.flip, self.affine)
        n = self.normalization
        if n is not None:
            params = np.concatenate([params, [n.scale, n.mean, n.std]])
        sample["aug"] = torch.from_numpy(params)
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
                    "study_key": it.study_key,
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
    flip: float = 0.0,
    affine: AffineRanges = STANDARD_AFFINE,
) -> Any:
    """CacheDataset runs the deterministic preset once. With ``train``, the samples carry
    augmentation parameters from (``seed``, epoch, index) (:class:`AugmentedDataset`), applied
    per batch by :func:`augment_batch`; ``flip`` is the probability of mirroring each axis,
    ``affine`` the ranges of rotation, scale and shift.

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
    if not train:
        return base
    return AugmentedDataset(base, seed, spec.spatial_dims, spec.normalization, flip, affine)
