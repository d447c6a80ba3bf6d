"""Training throughput on one NVIDIA GPU: MONAI DenseNet121 (2D, 1 channel, 3 classes) at 224 px.

What runs: bf16 autocast, channels_last, fused AdamW; the data is an in-memory float16 tensor
cache on the GPU (synthetic images, or the arrays of a workbench decoded-pixel cache folder
resized to 256 px), batches drawn at random and augmented on the GPU (one affine_grid +
grid_sample per batch: rotation, scale, shift, flip, resize to 224; then contrast, brightness
and noise), so the host never touches a pixel. Measured:
  * eager: images/s over ``--steps`` timed steps after ``--warmup`` steps;
  * ``torch.compile(model)``: the first step's seconds (mostly compilation) on their own, then
    images/s as for eager;
  * GPU utilisation sampled every 0.2 s during each timed loop (``torch.cuda.utilization()``,
    i.e. NVML, else ``nvidia-smi``): the share of time a kernel was running, not how busy the
    SMs were;
  * a ``torch.profiler`` table of the top 10 ops by CUDA time over a few eager steps.

Only torch and MONAI (plus numpy for ``--cache-dir``) are imported: no pydicom, no workbench.
Without a CUDA device it says so and exits (status 0, so that ``make bench`` runs on a CPU
machine; ``--require-cuda`` makes it status 1). About 3-5 minutes on an H100 / H200, most of
it compilation. Usage:
``python bench/train_gpu.py [--batch-size 128] [--steps 100] [--cache-dir DIR] [--no-compile]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CACHE_SIZE = 256  # cached images are CACHE_SIZE², the network sees IMAGE_SIZE² crops of them
IMAGE_SIZE = 224
N_CLASSES = 3


# --- utilisation ------------------------------------------------------------------------------


class UtilisationSampler:
    """Samples the GPU's utilisation (percent) in a thread while a ``with`` block runs."""

    def __init__(self, device: torch.device, period_s: float = 0.2) -> None:
        self.device, self.period_s = device, period_s
        self.samples: list[int] = []
        self.source = self._pick_source()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _pick_source(self) -> str | None:
        try:
            torch.cuda.utilization(self.device)
            return "torch.cuda.utilization"
        except Exception:  # no nvidia-ml-py, or NVML unusable: fall back to the CLI
            pass
        if shutil.which("nvidia-smi") and self._smi() is not None:
            return "nvidia-smi"
        return None

    def _smi(self) -> int | None:
        uuid = f"GPU-{torch.cuda.get_device_properties(self.device).uuid}"
        for ident in (uuid, str(self.device.index or 0)):
            out = subprocess.run(
                ["nvidia-smi", f"--id={ident}", "--query-gpu=utilization.gpu"]
                + ["--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            if out.returncode == 0 and out.stdout.strip().isdigit():
                return int(out.stdout.strip())
        return None

    def _read(self) -> int | None:
        if self.source == "torch.cuda.utilization":
            return int(torch.cuda.utilization(self.device))
        return self._smi()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            value = self._read()
            if value is not None:
                self.samples.append(value)

    def __enter__(self) -> UtilisationSampler:
        if self.source is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> dict[str, Any]:
        s = self.samples
        if not s:
            return {"source": self.source, "samples": 0}
        return {
            "source": self.source,
            "samples": len(s),
            "mean_pct": round(sum(s) / len(s), 1),
            "min_pct": min(s),
            "max_pct": max(s),
        }


# --- data -------------------------------------------------------------------------------------


def synthetic_cache(n: int, device: torch.device, seed: int) -> torch.Tensor:
    """(n, 1, 256, 256) float16 in [0, 1]: smooth blobs plus noise, made on the GPU."""
    g = torch.Generator(device=device).manual_seed(seed)
    coarse = torch.rand(n, 1, 16, 16, device=device, generator=g)
    smooth = F.interpolate(coarse, size=(CACHE_SIZE, CACHE_SIZE), mode="bicubic")
    noise = 0.05 * torch.randn(smooth.shape, device=device, generator=g)
    return (smooth + noise).clamp_(0, 1).to(torch.float16)


def folder_cache(folder: Path, n: int, device: torch.device) -> torch.Tensor:
    """Up to n 2D arrays of a workbench decoded-pixel cache (``*.npy``, display values in
    [0, 1]), longest side resized to 256 and centre padded, as (n, 1, 256, 256) float16."""
    import numpy as np  # a dependency of MONAI and of torch.from_numpy

    out: list[torch.Tensor] = []
    for path in sorted(folder.rglob("*.npy")):
        arr = np.load(path)
        if arr.ndim != 2:
            continue  # a 3D volume: not for this 2D benchmark
        x = torch.from_numpy(arr.astype(np.float32)).to(device)[None, None]
        h, w = x.shape[-2:]
        scale = CACHE_SIZE / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="area")
        top, left = (CACHE_SIZE - nh) // 2, (CACHE_SIZE - nw) // 2
        x = F.pad(x, (left, CACHE_SIZE - nw - left, top, CACHE_SIZE - nh - top))
        out.append(x.to(torch.float16))
        if len(out) == n:
            break
    if not out:
        raise SystemExit(f"train_gpu.py: no 2D .npy arrays under {folder}")
    return torch.cat(out)


def augment(x: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Random affine (rotation ±0.15 rad, scale ±8 %, shift ±5 %, horizontal flip) resampled
    to size² in one grid_sample, then contrast ±10 %, brightness ±0.05 and, for 30 % of the
    images, Gaussian noise (σ 0.02): the train preset of ``workbench.model.data``, batched on
    the GPU.

    x: (B, 1, 256, 256) float16 -> (B, 1, size, size) float32, channels_last.
    """
    b, dev = x.shape[0], x.device

    def uniform(*shape: int) -> torch.Tensor:  # in [-1, 1)
        return torch.rand(*shape, device=dev) * 2 - 1

    angle, scale = 0.15 * uniform(b), 1 + 0.08 * uniform(b)
    shift = 0.1 * uniform(b, 2)  # 5 % of the side; normalised coordinates span 2
    flip = torch.where(torch.rand(b, device=dev) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(  # (B, 2, 3): output (x, y, 1) -> input (x, y)
        [
            torch.stack([cos * flip, -sin, shift[:, 0]], dim=1),
            torch.stack([sin * flip, cos, shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, [b, 1, size, size], align_corners=False)
    y = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = y * (1 + 0.1 * uniform(b, 1, 1, 1)) + 0.05 * uniform(b, 1, 1, 1)
    y = y + 0.02 * torch.randn_like(y) * (torch.rand(b, 1, 1, 1, device=dev) < 0.3)
    return y.contiguous(memory_format=torch.channels_last)


# --- training steps ---------------------------------------------------------------------------


def make_step(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    loss_fn = nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x)  # (B, 3) in bf16
        loss = loss_fn(logits.float(), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def run_steps(
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    cache: torch.Tensor,
    labels: torch.Tensor,
    n: int,
    batch: int,
) -> torch.Tensor:
    """n steps on random batches of the GPU cache; no host sync inside (the loss stays put)."""
    total = torch.zeros((), device=cache.device)
    for _ in range(n):
        idx = torch.randint(cache.shape[0], (batch,), device=cache.device)
        total += step(augment(cache[idx]), labels[idx])
    return total


def measure(
    name: str,
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    cache: torch.Tensor,
    labels: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """First step (compilation, cuDNN autotuning), warm-up, then the timed loop."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    run_steps(step, cache, labels, 1, args.batch_size)
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    run_steps(step, cache, labels, args.warmup, args.batch_size)
    torch.cuda.synchronize()
    with UtilisationSampler(device) as util:
        t = time.perf_counter()
        loss = run_steps(step, cache, labels, args.steps, args.batch_size)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t
    mean_loss = float(loss) / args.steps
    if not math.isfinite(mean_loss):
        raise SystemExit(f"train_gpu.py: {name}: the loss is {mean_loss}")
    result = {
        "first_step_s": round(first, 2),
        "images_per_s": round(args.steps * args.batch_size / elapsed, 1),
        "ms_per_step": round(1000 * elapsed / args.steps, 2),
        "utilisation": util.summary(),
        "mean_loss": round(mean_loss, 4),
    }
    print(json.dumps({name: result}), flush=True)
    return result


def profile(
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    cache: torch.Tensor,
    labels: torch.Tensor,
    batch: int,
    steps: int = 5,
) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_steps(step, cache, labels, steps, batch)
        torch.cuda.synchronize()
    print(f"torch.profiler, eager, {steps} steps of {batch}: top 10 ops by CUDA time")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10), flush=True)


def new_model(device: torch.device, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    from monai.networks.nets import DenseNet121

    torch.manual_seed(seed)
    model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=N_CLASSES)
    model = model.to(device, memory_format=torch.channels_last).train()  # type: ignore[call-overload]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, fused=True)
    return model, optimizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps after the first")
    ap.add_argument("--images", type=int, default=4096, help="images in the GPU cache")
    ap.add_argument("--cache-dir", type=Path, default=None, help="a workbench cache folder")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode")
    ap.add_argument("--require-cuda", action="store_true", help="exit 1 without a GPU")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print(
            f"train_gpu.py: no CUDA device is available (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}); this benchmark needs one NVIDIA GPU. "
            "Nothing was measured.",
            file=sys.stderr,
        )
        sys.exit(1 if args.require_cuda else 0)

    import monai

    device = torch.device("cuda", torch.cuda.current_device())
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels once
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    props = torch.cuda.get_device_properties(device)
    results: dict[str, Any] = {
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "host": f"{platform.machine()} {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "monai": monai.__version__,
        "batch_size": args.batch_size,
        "image_size": IMAGE_SIZE,
        "precision": "bf16 autocast, channels_last",
    }
    if not torch.cuda.is_bf16_supported():
        raise SystemExit(f"train_gpu.py: {props.name} has no bf16 support")

    t = time.perf_counter()
    if args.cache_dir is not None:
        cache = folder_cache(args.cache_dir, args.images, device)
        results["data"] = f"workbench cache {args.cache_dir}: {cache.shape[0]} images"
    else:
        cache = synthetic_cache(args.images, device, seed=0)
        results["data"] = f"synthetic: {cache.shape[0]} images"
    labels = torch.randint(N_CLASSES, (cache.shape[0],), device=device)
    torch.cuda.synchronize()
    results["cache_build_s"] = round(time.perf_counter() - t, 2)

    model, optimizer = new_model(device, seed=0)
    eager_step = make_step(model, optimizer)
    results["eager"] = measure("eager", eager_step, cache, labels, args, device)
    profile(eager_step, cache, labels, args.batch_size)
    del model, optimizer, eager_step

    if not args.no_compile:
        model, optimizer = new_model(device, seed=0)
        compiled = torch.compile(model, mode=args.compile_mode)
        step = make_step(compiled, optimizer)  # type: ignore[arg-type]
        res = measure("compiled", step, cache, labels, args, device)
        res["compile_s"] = res.pop("first_step_s")  # the first step is mostly compilation
        res["mode"] = args.compile_mode
        results["compiled"] = res
        results["compiled_over_eager"] = round(
            res["images_per_s"] / results["eager"]["images_per_s"], 2
        )
    results["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
