"""Where and how tensors are computed: device, precision, autocast, batched forward passes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from torch import nn

from workbench.nets import embed

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(device)


def resolve_precision(
    precision: str, device: torch.device, spatial_dims: int = 2, training: bool = True
) -> str:
    """Resolve ``auto`` to the fastest precision that is safe here.

    CUDA: bf16 where the GPU supports it, else fp16 (with a GradScaler in training).
    CPU: bf16 autocast for 2D training; fp32 for 3D training (torch 2.13's CPU bf16 backward
    of 3D convolutions overflowed to NaN on 32^3 DenseNet121 inputs here) and for inference,
    where reproducible probabilities matter more than the small speed-up.
    """
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if training and spatial_dims == 2 else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, not {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision


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
