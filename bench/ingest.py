"""Ingest throughput: DICOM folder → catalog + decoded-pixel cache, files per second.

Compares, in the same run on the same files:
  * baseline: MONAI ``LoadImage(reader="PydicomReader")`` + EnsureChannelFirst + ScaleIntensity
    + Resize, one file after another (what a naive MONAI pipeline does on every epoch);
  * workbench: ``workbench.catalog.ingest.ingest`` (header, display pipeline, pseudonym, cache,
    catalog), timed inside a fresh process as the ``workbench ingest`` command runs it.

Files: uncompressed 512 x 512 12-bit DX (the headline), plus RLE Lossless and JPEG 2000 Lossless.
Usage: ``python bench/ingest.py [--files 1000] [--baseline-files 200] [--workers N]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

# Only the standard library at the top: the decoding workers are spawned, and a spawned worker
# imports this script again (as __mp_main__) before its first file; what it imports here would
# count as ingest time. Everything else is imported where it is used.


def make_files(out: Path, n: int, syntax: str | None, size: int = 512) -> list[Path]:
    """n distinct DX files of ``size``² (one synthetic chest, new UIDs and noise per copy)."""
    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    from workbench.dicom.synth import synthesize_cohort

    seed_dir = out / "_seed"
    synthesize_cohort(seed_dir, n_studies=1, seed=3, modality="DX", image_size=size)
    template = pydicom.dcmread(next(p for p in sorted(seed_dir.rglob("*.dcm"))))
    if template.file_meta.TransferSyntaxUID.is_compressed:
        template.decompress()
    base = template.pixel_array.astype(np.int32)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        ds = template.copy()
        ds.PatientID = f"BENCH-{i // 2:06d}"
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"bench-study-{i // 2}"])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"bench-series-{i}"])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[f"bench-{syntax}-{i}"])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        noisy = np.clip(base + rng.integers(-8, 9, base.shape), 0, 4095).astype(np.uint16)
        ds.PixelData = noisy.tobytes()
        if syntax is not None:
            ds.compress(syntax, noisy)
        p = out / f"{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    shutil.rmtree(seed_dir)
    return paths


def baseline(paths: list[Path], size: int = 256) -> float:
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize, ScaleIntensity

    chain = Compose(
        [
            LoadImage(reader="PydicomReader", image_only=True),
            EnsureChannelFirst(),
            ScaleIntensity(),
            Resize((size, size)),
        ]
    )
    t = time.perf_counter()
    for p in paths:
        chain(str(p))
    return len(paths) / (time.perf_counter() - t)


def workbench_rate(folder: Path, home: Path, workers: int | None) -> float:
    """Our ingest, in a fresh process as `workbench ingest` runs it (the baseline imported torch
    into this one, which makes ingest spawn its workers instead of forking them)."""
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--measure", str(folder), str(home)]
    if workers:
        cmd += ["--workers", str(workers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _measure(folder: Path, home: Path, workers: int | None) -> float:
    from workbench.catalog.ingest import ingest
    from workbench.config import Settings

    settings = Settings(
        home=home,
        database_url=f"sqlite:///{home / 'workbench.db'}",
        models_dir=home / "models",
        cache_dir=home / "cache",
    )
    home.mkdir(parents=True, exist_ok=True)
    (home / "pseudonym.key").write_bytes(b"bench")
    t = time.perf_counter()
    s = ingest(settings, folder, progress=False, workers=workers)
    dt = time.perf_counter() - t
    assert s.ingested == len(list(folder.glob("*.dcm"))), s
    return s.ingested / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--baseline-files", type=int, default=200)
    ap.add_argument("--compressed-files", type=int, default=300)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--measure", nargs=2, type=Path, metavar=("FOLDER", "HOME"), help="internal")
    args = ap.parse_args()
    if args.measure:  # one workbench measurement, in this fresh process
        print(_measure(args.measure[0], args.measure[1], args.workers))
        return
    results: dict[str, object] = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plain = root / "plain"
        plain.mkdir()
        paths = make_files(plain, args.files, None)
        base = baseline(paths[: args.baseline_files])
        ours = workbench_rate(plain, root / "home-plain", args.workers)
        results["uncompressed_512"] = {
            "files": args.files,
            "baseline_files_per_s": round(base, 1),
            "workbench_files_per_s": round(ours, 1),
            "ratio": round(ours / base, 2),
        }
        from pydicom.uid import JPEG2000Lossless, RLELossless

        for name, syntax in (("rle", RLELossless), ("jpeg2000_lossless", JPEG2000Lossless)):
            folder = root / name
            folder.mkdir()
            cpaths = make_files(folder, args.compressed_files, syntax)
            cbase = baseline(cpaths[: min(100, len(cpaths))])
            cours = workbench_rate(folder, root / f"home-{name}", args.workers)
            results[name] = {
                "files": args.compressed_files,
                "baseline_files_per_s": round(cbase, 1),
                "workbench_files_per_s": round(cours, 1),
                "ratio": round(cours / cbase, 2),
            }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
