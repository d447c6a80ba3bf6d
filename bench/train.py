"""Training throughput on the CPU: MONAI DenseNet121 (2D, 1 channel, 3 classes), images per second.

Compares, in the same run on the same synthetic DX cohort (256 px, three sites, some files
RLE or JPEG-LS compressed), at 224 px and at 128 px:
  * naive: a plain MONAI loop as people write it: ``LoadImaged(reader="PydicomReader")`` from
    the DICOM files on every epoch + EnsureChannelFirstd + ScaleIntensityd + Resized + random
    flip / rotate, torch DataLoader (num_workers=0), fp32, contiguous, the MetaTensor batch
    straight into the model;
  * workbench: ``workbench.model.data.make_dataset`` over the decoded-pixel cache that ingest wrote
    (CacheDataset: the deterministic preset runs once; random augmentation drawn per sample
    and applied per batch), bf16 autocast, channels_last, fused AdamW, through
    ``workbench.train.loop.train_epoch``;
  * workbench fp32: the same data path in fp32 (still channels_last), to separate what the
    data path gives from what the precision gives;
  * step only (bf16): the same bf16 step on one batch made beforehand and fed again and
    again, no loading at all. This is the ceiling any data path can reach with this step:
    ``ceiling_ratio`` is it over the naive loop.

Same model, seed, AdamW settings and batch size everywhere. Images/s are steady state: two warm-up
steps, then ``--steps`` timed steps (data loading included, cache building not: it is
reported on its own, like ingest, which is measured by ``bench/ingest.py``).
Usage: ``python bench/train.py [--studies 48] [--batch-size 16] [--steps 12] [--steps-128 30]``
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import torch
from monai.data import DataLoader as MonaiDataLoader
from monai.data import Dataset
from monai.networks.nets import DenseNet121
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    RandFlipd,
    RandRotated,
    Resized,
    ScaleIntensityd,
)
from monai.utils import set_determinism
from torch import nn
from torch.utils.data import DataLoader

from workbench.catalog.cohorts import cohort_items
from workbench.catalog.ingest import ingest
from workbench.dicom.synth import DX_CLASSES, synthesize_cohort
from workbench.model.data import InputSpec, make_dataset, to_records
from workbench.model.nets import create_network
from workbench.train.loop import train_epoch
from workbench.train.recipe import make_optimizer

COHORT = "bench-train"
WARMUP = 2
LR, WEIGHT_DECAY = 1e-3, 1e-4


class Clocked:
    """Loops a loader for as many epochs as asked and notes when the warm-up steps have ended.

    A step ends when its loop asks for the next batch, so the clock starts after the last
    warm-up step and the timed window holds the loading and the computing of every later step.
    """

    def __init__(self, loader: Iterable[dict[str, Any]], warmup: int = WARMUP) -> None:
        self.loader, self.warmup = loader, warmup
        self.start = 0.0
        self.loading = 0.0  # seconds spent making batches inside the timed window

    def __iter__(self) -> Iterator[dict[str, Any]]:
        done = 0
        while True:
            asked, before = time.perf_counter(), done
            for batch in self.loader:
                if done >= self.warmup:
                    self.loading += time.perf_counter() - asked
                yield batch
                done += 1
                asked = time.perf_counter()
                if done == self.warmup:
                    self.start = asked
            if done == before:
                raise ValueError("fewer images than one batch: ask for more --studies")


def rate(clocked: Clocked, images: int) -> tuple[float, float]:
    """Images per second since the warm-up, and the share of that time spent loading."""
    elapsed = time.perf_counter() - clocked.start
    return images / elapsed, clocked.loading / elapsed


def make_cohort(root: Path, n_studies: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Synthesise and ingest one cohort; records for the naive loop (DICOM paths) and ours
    (cached arrays), the same images with the same labels."""
    # `tests` is not an installed package and `make bench` runs us without PYTHONPATH.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import make_settings

    src = root / "dicom"
    synth = synthesize_cohort(src, n_studies=n_studies, seed=0, modality="DX", image_size=256)
    settings = make_settings(root / "home")
    summary = ingest(settings, src, labels=synth.labels_csv, cohort=COHORT, progress=False)
    assert summary.quarantined == 0, summary
    classes = list(DX_CLASSES)
    with synth.labels_csv.open(newline="") as fh:
        label_of = {row["StudyInstanceUID"]: row["label"] for row in csv.DictReader(fh)}
    naive = []
    for p in sorted(src.rglob("*.dcm")):
        study_uid = pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID
        naive.append({"image": str(p), "label": classes.index(label_of[study_uid])})
    ours = to_records(cohort_items(settings, COHORT), classes)
    assert len(naive) == len(ours) and all(r["label"] >= 0 for r in ours)
    return naive, ours


def naive_rate(
    records: list[dict[str, Any]], size: int, batch: int, steps: int
) -> tuple[float, float]:
    """The loop from the MONAI tutorials, fp32, contiguous, files decoded on every epoch."""
    set_determinism(seed=0)
    transform = Compose(
        [
            LoadImaged(keys="image", reader="PydicomReader"),
            EnsureChannelFirstd(keys="image"),
            ScaleIntensityd(keys="image"),
            Resized(keys="image", spatial_size=(size, size)),
            RandFlipd(keys="image", prob=0.5, spatial_axis=1),
            RandRotated(keys="image", range_x=0.26, prob=0.5, keep_size=True),
        ]
    )
    loader = DataLoader(
        Dataset(records, transform),
        batch_size=batch,
        shuffle=True,
        num_workers=0,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=len(DX_CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    clocked = Clocked(loader)
    for i, batch_data in enumerate(clocked):
        inputs, labels = batch_data["image"], batch_data["label"]
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), labels)
        loss.backward()
        optimizer.step()
        loss.item()
        if i + 1 == WARMUP + steps:
            break
    return rate(clocked, steps * batch)


def workbench_loader(
    records: list[dict[str, Any]], size: int, batch: int
) -> tuple[MonaiDataLoader, float]:
    """Our training loader (as ``workbench.train.training.train`` builds it), cache seconds."""
    set_determinism(seed=0)
    t = time.perf_counter()
    dataset = make_dataset(records, InputSpec(image_size=size), train=True)
    built = time.perf_counter() - t
    loader = MonaiDataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=0,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    return loader, built


def workbench_rate(
    loader: Iterable[dict[str, Any]], precision: str, batch: int, steps: int
) -> tuple[float, float]:
    set_determinism(seed=0)
    device = torch.device("cpu")
    model = create_network(2, len(DX_CLASSES)).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = make_optimizer(model.parameters(), LR, WEIGHT_DECAY)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    clocked = Clocked(loader)
    train_epoch(
        model,
        clocked,
        nn.CrossEntropyLoss(),
        optimizer,
        scaler,
        device,
        precision,
        spatial_dims=2,
        max_steps=WARMUP + steps,
    )
    return rate(clocked, steps * batch)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=48, help="synthetic studies (~2 images each)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12, help="timed steps at 224 px")
    ap.add_argument("--steps-128", type=int, default=30, help="timed steps at 128 px")
    args = ap.parse_args()
    # MONAI warns on every naive load (no nvImageCodec, no orientation tags on a DX): not news.
    warnings.filterwarnings("ignore", category=UserWarning, module="monai")
    results: dict[str, Any] = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "warmup_steps": WARMUP,
    }
    with tempfile.TemporaryDirectory() as tmp:
        naive_records, records = make_cohort(Path(tmp), args.studies)
        results["images"] = len(records)
        for size, steps in ((224, args.steps), (128, args.steps_128)):
            naive, naive_load = naive_rate(naive_records, size, args.batch_size, steps)
            loader, built = workbench_loader(records, size, args.batch_size)
            bf16, bf16_load = workbench_rate(loader, "bf16", args.batch_size, steps)
            fp32, fp32_load = workbench_rate(loader, "fp32", args.batch_size, steps)
            # one batch, made once: the step alone (same model, optimizer and precision)
            one_batch = [next(iter(loader))]
            step_only, _ = workbench_rate(one_batch, "bf16", args.batch_size, steps)
            results[f"{size}px"] = {
                "timed_steps": steps,
                "naive_images_per_s": round(naive, 2),
                "workbench_bf16_images_per_s": round(bf16, 2),
                "workbench_fp32_images_per_s": round(fp32, 2),
                "ratio": round(bf16 / naive, 2),
                "ratio_data_path_fp32": round(fp32 / naive, 2),
                "ratio_bf16_over_fp32": round(bf16 / fp32, 2),
                "step_only_bf16_images_per_s": round(step_only, 2),
                "ceiling_ratio": round(step_only / naive, 2),
                # Share of the timed window spent making batches (the rest is the step).
                "loading_share": {
                    "naive": round(naive_load, 3),
                    "workbench_bf16": round(bf16_load, 3),
                    "workbench_fp32": round(fp32_load, 3),
                },
                "cache_build_s": round(built, 2),
            }
            print(json.dumps({f"{size}px": results[f"{size}px"]}), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
