"""Saliency cost per image: Grad-CAM, Integrated Gradients (50 steps), Occlusion, gradients.

DenseNet121 (MONAI, 2D, 1 channel, 3 classes) on one 224 x 224 image, in the same run:
  * baseline: Captum with the workbench's settings in plain fp32, contiguous tensors;
  * workbench: the same calls through ``workbench.predict.explain.saliency`` with
    ``precision="bf16"`` (autocast) and channels_last, as the app and batch prediction run
    them on the CPU.

The issue's targets on 2 cores: Grad-CAM <= 100 ms, IG (50 steps) <= 5 s, Occlusion <= 3 s.
On a CUDA machine the workbench rows use the GPU (bf16) and the baseline stays on the CPU.
Usage: ``python bench/explain.py [--size 224] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from workbench.model.nets import create_network
from workbench.predict.explain import ExplainMethod, saliency

METHODS: dict[ExplainMethod, dict[str, Any]] = {
    "gradcam": {},
    "ig": {"ig_steps": 50, "internal_batch_size": 10},
    "occlusion": {"internal_batch_size": 32},
    "gradient": {},
}


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: oneDNN picks its kernels on the first call
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = create_network(2, 3).eval()
    image = torch.rand(1, 1, args.size, args.size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fast_model = create_network(2, 3).eval().to(device)
    fast_model = fast_model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    fast_model.load_state_dict(model.state_dict())
    fast_image = image.to(device).contiguous(memory_format=torch.channels_last)
    results: dict[str, object] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        "date": time.strftime("%Y-%m-%d"),
        "size": args.size,
    }
    for method, kw in METHODS.items():
        base = timed(functools.partial(saliency, model, image, 1, method, **kw), args.repeats)
        ours = timed(
            functools.partial(saliency, fast_model, fast_image, 1, method, precision="bf16", **kw),
            args.repeats,
        )
        results[method] = {
            "baseline_fp32_s": round(base, 4),
            "workbench_s": round(ours, 4),
            "ratio": round(base / ours, 2),
        }
        print(method, results[method], flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
