"""Where and how tensors are computed: device, precision, autocast, batched forward passes."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from torch import nn

from workbench.errors import UsageError
from workbench.model.nets import embed

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}

#: A reduced precision must beat fp32's probed step time by this factor to be chosen: two
#: timings on a shared machine differ by a few per cent, and "never slower than fp32" must
#: hold with that noise.
PROBE_MARGIN = 0.9
#: The probe's file under ``$WORKBENCH_HOME``: one entry per machine, torch and input shape.
PROBE_FILE = Path("runtime") / "precision-probe.json"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(device)


def check_precision(precision: str, device: torch.device) -> str:
    """``precision`` if it names one this device can run (fp16 autocast needs CUDA)."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be auto, bf16, fp16 or fp32, not {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("fp16 autocast needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision


@dataclass(frozen=True)
class Hardware:
    """What a device can do for reduced precision, as torch reports it."""

    device: str  # "cpu" or "cuda"
    name: str  # CPU model or GPU name
    capability: str  # torch's CPU kernel level (AVX2, AVX512...) or CUDA compute capability
    bf16_units: bool  # AVX512-BF16 / AMX-BF16 on a CPU; native bf16 on a GPU (sm >= 8.0)
    fp16_units: bool  # tensor cores (sm >= 7.0); never on a CPU here

    def describe(self) -> str:
        units = [u for u, ok in (("bf16", self.bf16_units), ("fp16", self.fp16_units)) if ok]
        has = f"{'/'.join(units)} units" if units else "no bf16 or fp16 units"
        return f"{self.name} ({self.capability}, {has})"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_of(device: torch.device) -> Hardware:
    """The reduced-precision units of ``device`` (CPU: torch's cpuinfo flags; CUDA: compute
    capability and torch's bf16 check without emulation)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return Hardware(
            "cuda",
            torch.cuda.get_device_name(device),
            f"sm_{major}{minor}",
            bf16_units=torch.cuda.is_bf16_supported(including_emulation=False),
            fp16_units=major >= 7,
        )
    caps = torch.cpu.get_capabilities()
    return Hardware(
        "cpu",
        _cpu_name(),
        torch.backends.cpu.get_cpu_capability(),
        bf16_units=bool(caps.get("avx512_bf16") or caps.get("amx_bf16")),
        fp16_units=False,
    )


def precision_candidates(hw: Hardware, spatial_dims: int) -> list[str]:
    """The precisions worth timing for training on ``hw``: fp32 always (the floor), bf16 where
    the device has bf16 units (on a CPU only in 2D: torch 2.13's CPU bf16 backward of 3D
    convolutions overflowed to NaN on 32^3 DenseNet121 inputs here), fp16 on tensor cores
    without bf16. Without units, autocast emulates the type: bf16 measured 9x slower than
    fp32 on an AVX2-only CPU, so it is not even probed there."""
    out = ["fp32"]
    if hw.bf16_units and (hw.device == "cuda" or spatial_dims == 2):
        out.append("bf16")
    elif hw.fp16_units and hw.device == "cuda":
        out.append("fp16")
    return out


def choose_precision(seconds: Mapping[str, float], margin: float = PROBE_MARGIN) -> str:
    """The precision to train in, from probed seconds per step: the fastest reduced precision
    when it takes at most ``margin`` x fp32's time, else fp32. Never one slower than fp32."""
    if "fp32" not in seconds:
        raise ValueError("the probe must time fp32, the floor every choice is measured against")
    best = "fp32"
    for name, s in seconds.items():
        if name != "fp32" and s <= margin * seconds["fp32"] and s < seconds[best]:
            best = name
    return best


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run trains in, and why (recorded in the bundle's experiment record)."""

    precision: str
    reason: str
    probe: dict[str, float] = field(default_factory=dict)  # seconds per step, per precision
    hardware: str = ""
    cached: bool = False

    def record(self) -> dict[str, Any]:
        return asdict(self)


def probe_step_seconds(
    precision: str,
    device: torch.device,
    spatial_dims: int,
    image_size: int,
    batch_size: int,
    n_classes: int = 2,
    steps: int = 2,
    architecture: str = "densenet121",
) -> float:
    """Seconds per training step of the run's network (``architecture``, channels_last in 2D,
    fused AdamW, cross-entropy) on random inputs of the run's shape under ``precision``:
    the fastest of ``steps`` timed steps after one warm-up step."""
    from workbench.model.nets import create_network  # the network the run trains

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        model = create_network(spatial_dims, n_classes, architecture=architecture).to(device)
        x = torch.rand(batch_size, 1, *[image_size] * spatial_dims, device=device)
        y = torch.randint(0, n_classes, (batch_size,), device=device)
    if spatial_dims == 2:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for k in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            logits = model(x)
        scaler.scale(loss_fn(logits.float(), y)).backward()
        scaler.step(opt)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k:  # the first step warms caches and kernels up
            times.append(time.perf_counter() - t0)
    return min(times)


def _probe_key(
    hw: Hardware, spatial_dims: int, image_size: int, batch_size: int, architecture: str
) -> str:
    net = "" if architecture == "densenet121" else f" {architecture}"  # keeps older entries
    return (
        f"{hw.device}|{hw.name}|{hw.capability}|threads {torch.get_num_threads()}|"
        f"torch {torch.__version__}|{spatial_dims}D {image_size} px batch {batch_size}{net}"
    )


def training_precision(
    requested: str,
    device: torch.device,
    spatial_dims: int,
    image_size: int,
    batch_size: int,
    home: Path | None = None,
    architecture: str = "densenet121",
) -> PrecisionChoice:
    """The precision to train in. An explicit one is kept (checked). ``auto`` times the real
    training step in each precision the hardware has units for (:func:`precision_candidates`)
    and takes the fastest that beats fp32 by the margin (:func:`choose_precision`); the probe is
    cached under ``home`` per machine, torch version and input shape, so it runs once."""
    hw = hardware_of(device)
    if requested != "auto":
        return PrecisionChoice(
            check_precision(requested, device), "asked for", hardware=hw.describe()
        )
    candidates = precision_candidates(hw, spatial_dims)
    # A small batch keeps the probe short; the ratio between precisions is what it measures.
    probe_batch = max(2, min(batch_size, 8))
    key = _probe_key(hw, spatial_dims, image_size, probe_batch, architecture)
    path = home / PROBE_FILE if home is not None else None
    cache: dict[str, Any] = {}
    if path is not None and path.exists():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}  # a damaged cache is measured again, never trusted
    entry = cache.get(key)
    cached = isinstance(entry, dict) and set(entry.get("seconds", {})) == set(candidates)
    if cached:
        seconds = {k: float(v) for k, v in entry["seconds"].items()}  # type: ignore[index]
    else:
        seconds = {
            p: round(
                probe_step_seconds(
                    p, device, spatial_dims, image_size, probe_batch, architecture=architecture
                ),
                4,
            )
            for p in candidates
        }
        if path is not None:
            cache[key] = {"seconds": seconds, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=2, sort_keys=True))
            os.replace(tmp, path)
    chosen = choose_precision(seconds)
    shape = f"{architecture}, {spatial_dims}D {image_size} px, batch {probe_batch}"
    timing = ", ".join(f"{p} {s * 1000:.0f} ms" for p, s in seconds.items())
    if len(candidates) == 1:
        why = "no bf16/fp16 units: autocast would emulate them, slower than fp32"
        if hw.bf16_units and hw.device == "cpu" and spatial_dims == 3:
            why = "3D on the CPU: bf16 backward of 3D convolutions is not stable in torch here"
        reason = f"{why}; probe: {timing} ({shape})"
    elif chosen == "fp32":
        reason = f"probe: {timing} ({shape}); no reduced precision beat fp32 by 10%"
    else:
        reason = (
            f"probe: {timing} ({shape}); {chosen} is {seconds['fp32'] / seconds[chosen]:.2f}x fp32"
        )
    return PrecisionChoice(chosen, reason, seconds, hw.describe(), cached)


def resolve_precision(
    precision: str, device: torch.device, spatial_dims: int = 2, training: bool = True
) -> str:
    """The precision a forward pass runs in, without a probe.

    ``auto``: for inference (``training=False``) fp32 on a CPU, where reproducible
    probabilities matter more than a small speed-up, and on CUDA bf16 where the GPU has bf16
    units, else fp16 on tensor cores, else fp32. For training, ``auto`` should go through
    :func:`training_precision` (a timed probe); here it gives the capability's answer alone
    (bf16 only where the hardware has bf16 units, never emulated).
    """
    if precision != "auto":
        return check_precision(precision, device)
    hw = hardware_of(device)
    if device.type == "cuda":
        return "bf16" if hw.bf16_units else "fp16" if hw.fp16_units else "fp32"
    cands = precision_candidates(hw, spatial_dims)
    return cands[-1] if training else "fp32"


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    dtype = PRECISIONS[precision]
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def to_device(x: torch.Tensor, device: torch.device, spatial_dims: int) -> torch.Tensor:
    """A batch ready for the network: a plain tensor (a MONAI MetaTensor would route every op
    through its ``__torch_function__``), on ``device``, channels_last in 2D."""
    if isinstance(x, MetaTensor):
        x = x.as_tensor()
    x = x.to(device, non_blocking=True)
    if spatial_dims == 2:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def forward_dataset(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    precision: str,
    spatial_dims: int,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Logits (N, K) and embeddings (N, F) as float32 numpy, with each record's study id."""
    was_training = model.training
    model.eval()
    logits: list[np.ndarray] = []
    embeddings: list[np.ndarray] = []
    study_ids: list[int] = []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
            x = to_device(torch.as_tensor(batch["image"]), device, spatial_dims)
            with autocast(device, precision):
                out, emb = embed(model, x)
            logits.append(out.float().cpu().numpy())
            embeddings.append(emb.float().cpu().numpy())
            study_ids.extend(int(s) for s in batch["study_id"])
    finally:
        model.train(was_training)
    return {
        "logits": np.concatenate(logits) if logits else np.zeros((0, 0), np.float32),
        "embeddings": np.concatenate(embeddings) if embeddings else np.zeros((0, 0), np.float32),
        "study_ids": np.asarray(study_ids, dtype=np.int64),
    }


def mean_by_study(
    study_ids: Sequence[int] | np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Average per-image rows into one row per study (the study-level logit).

    Returns (unique study ids in first-seen order, (S, K) means).
    """
    ids = np.asarray(study_ids)
    order = list(dict.fromkeys(ids.tolist()))
    means = np.stack([values[ids == s].mean(axis=0) for s in order]) if order else values[:0]
    return np.asarray(order, dtype=np.int64), means
