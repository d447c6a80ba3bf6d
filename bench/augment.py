"""Training augmentation: the workbench's batched ``augment_batch`` against the two well-kept
libraries that do the same job, on the same batch, with the same kinds and ranges of change
(affine: rotation, scale, shift with probability 0.8; contrast x(1 +- 0.1); brightness +- 0.05;
Gaussian noise sigma 0.02 for 30 % of the images), in one run:

  * workbench: ``draw_augmentation`` per sample (as the data loader's workers draw it), then
    ``augment_batch`` once per batch (one ``affine_grid`` / ``grid_sample``);
  * MONAI: the dictionary transforms ``RandAffined``, ``RandScaleIntensityd``,
    ``RandShiftIntensityd``, ``RandGaussianNoised`` in a ``Compose``, one image at a time (as
    MONAI's tutorials run them inside the data loader);
  * Kornia (when installed: ``pip install kornia``): ``AugmentationSequential`` of
    ``RandomAffine`` (``RandomAffine3D`` for volumes), ``RandomContrast``, ``RandomBrightness``
    and ``RandomGaussianNoise`` on the whole batch.

Reports the median seconds per batch of each and its ratio to the workbench's, for 2D images
and 3D volumes, with the machine (CPU capability named) and the date. Usage:

    python bench/augment.py [--size 96] [--batch 16] [--size3d 48] [--batch3d 4] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

from workbench.model.data import (
    AUG_BRIGHTNESS,
    AUG_CONTRAST,
    AUG_NOISE_STD,
    AUG_P_AFFINE,
    AUG_P_BRIGHTNESS,
    AUG_P_CONTRAST,
    AUG_P_NOISE,
    AUG_ROTATE_2D,
    AUG_ROTATE_3D,
    AUG_SCALE,
    AUG_TRANSLATE,
    augment_batch,
    draw_augmentation,
)


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ours(x: torch.Tensor, seed: int) -> Callable[[], torch.Tensor]:
    d = x.ndim - 2
    state = {"epoch": 0}

    def run() -> torch.Tensor:
        state["epoch"] += 1
        params = np.stack(
            [
                draw_augmentation(np.random.default_rng([seed, state["epoch"], i]), d)
                for i in range(x.shape[0])
            ]
        )
        return augment_batch(x, torch.from_numpy(params))

    return run


def monai_per_sample(x: torch.Tensor, seed: int) -> Callable[[], torch.Tensor]:
    d = x.ndim - 2
    size = x.shape[-1]
    rotate = AUG_ROTATE_2D if d == 2 else (AUG_ROTATE_3D,) * 3
    pipeline = Compose(
        [
            RandAffined(
                keys="image",
                prob=AUG_P_AFFINE,
                rotate_range=rotate,
                scale_range=(AUG_SCALE,) * d,
                translate_range=(AUG_TRANSLATE * size,) * d,
                mode="bilinear",
                padding_mode="zeros",
            ),
            RandScaleIntensityd(keys="image", factors=AUG_CONTRAST, prob=AUG_P_CONTRAST),
            RandShiftIntensityd(keys="image", offsets=AUG_BRIGHTNESS, prob=AUG_P_BRIGHTNESS),
            RandGaussianNoised(keys="image", prob=AUG_P_NOISE, std=AUG_NOISE_STD),
        ]
    ).set_random_state(seed)

    def run() -> torch.Tensor:
        return torch.stack(
            [torch.as_tensor(pipeline({"image": x[i]})["image"]) for i in range(x.shape[0])]
        )

    return run


def kornia_batched(x: torch.Tensor, seed: int) -> Callable[[], torch.Tensor] | None:
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    d = x.ndim - 2
    degrees = math.degrees(AUG_ROTATE_2D if d == 2 else AUG_ROTATE_3D)
    scale = (1 - AUG_SCALE, 1 + AUG_SCALE)
    t = AUG_TRANSLATE
    affine: Any = (
        K.RandomAffine(degrees, translate=(t, t), scale=scale, p=AUG_P_AFFINE)
        if d == 2
        else K.RandomAffine3D(degrees, translate=(t, t, t), scale=(scale,) * 3, p=AUG_P_AFFINE)
    )
    if d == 2:
        pipeline = K.AugmentationSequential(
            affine,
            K.RandomContrast((1 - AUG_CONTRAST, 1 + AUG_CONTRAST), p=AUG_P_CONTRAST),
            K.RandomBrightness((1 - AUG_BRIGHTNESS, 1 + AUG_BRIGHTNESS), p=AUG_P_BRIGHTNESS),
            K.RandomGaussianNoise(std=AUG_NOISE_STD, p=AUG_P_NOISE),
        )
    else:  # Kornia's intensity augmentations are 2D: the affine alone for volumes
        pipeline = K.AugmentationSequential(affine, data_keys=["input"])
    torch.manual_seed(seed)

    def run() -> torch.Tensor:
        return pipeline(x)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size3d", type=int, default=48)
    ap.add_argument("--batch3d", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    cases = {
        f"2D {args.batch} x {args.size}^2": torch.rand(args.batch, 1, args.size, args.size),
        f"3D {args.batch3d} x {args.size3d}^3": torch.rand(
            args.batch3d, 1, args.size3d, args.size3d, args.size3d
        ),
    }
    out: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
    }
    for name, x in cases.items():
        row: dict[str, Any] = {}
        base = timed(ours(x, 0), args.repeats)
        row["workbench_s"] = round(base, 5)
        for label, make in (("monai", monai_per_sample), ("kornia", kornia_batched)):
            fn = make(x, 0)
            if fn is None:
                row[f"{label}_s"] = "not installed"
                continue
            t = timed(fn, args.repeats)
            row[f"{label}_s"] = round(t, 5)
            row[f"{label}_over_workbench"] = round(t / base, 2)
        out[name] = row
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
