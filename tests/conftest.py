"""Shared fixtures. They make their own DICOM (no test reaches the network) and run the real
pipeline (synth → ingest → train → predict) once per session on a tiny cohort."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from workbench.config import Settings

# Modules that take minutes run first: under `make test`'s two xdist workers (files are
# dealt out in collection order) the longest one must not start last while the other worker
# idles. The order is otherwise pytest's own.
SLOW_MODULES_FIRST = (
    "test_trust_model.py",  # a 5-minute module fixture
    "test_degraded_site.py",
    "test_training.py",
    "test_app.py",  # the first to build the session's pipeline fixture
    "test_demo.py",
    "test_app_browser.py",
    "test_precision.py",
    "test_shapes.py",
    "test_distributed.py",
    "test_store_concurrency.py",
    "test_problems.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept


TINY_COHORT = "tiny"
TINY_MODEL = "tiny-model"


def make_settings(home: Path) -> Settings:
    """A workbench home with a fixed pseudonymisation key, so that pseudonyms, and with them
    the patient-level splits and the trained model, are the same in every run."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "pseudonym.key").write_bytes(b"test-installation-key")
    return Settings(
        home=home,
        database_url=f"sqlite:///{home / 'workbench.db'}",
        models_dir=home / "models",
        cache_dir=home / "cache",
        device="cpu",
        precision="auto",
    )


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch on ``n`` threads inside the block, the previous count restored after it. The
    count changes the order of float sums, which a few epochs of training amplify into another
    model: tests that document a trained model's figures train on a fixed count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_cli(args: list[str], home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``workbench ARGS`` in a subprocess with its home at ``home`` (no other WORKBENCH_*)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WORKBENCH_")}
    environ.update(WORKBENCH_HOME=str(home), PYTHONWARNINGS="ignore", **env)
    return subprocess.run(
        [sys.executable, "-m", "workbench.cli", *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=300,
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """An empty workbench home of its own."""
    return make_settings(tmp_path / "home")


@dataclass(frozen=True)
class Pipeline:
    settings: Settings
    source: Path  # the synthetic DICOM folder
    cohort: str
    model: str
    bundle: Path


def _env_for(settings: Settings) -> dict[str, str]:
    return {
        "WORKBENCH_HOME": str(settings.home),
        "WORKBENCH_DATABASE_URL": settings.database_url,
        "WORKBENCH_MODELS": str(settings.models_dir),
        "WORKBENCH_CACHE": str(settings.cache_dir),
        "WORKBENCH_DEVICE": "cpu",
        "WORKBENCH_PRECISION": "auto",
    }


def copy_home(
    pipeline: Pipeline, home: Path, monkeypatch: pytest.MonkeyPatch, models: bool = False
) -> Settings:
    """A private copy of the pipeline's home at ``home``: the catalog (SQLite's backup API, so
    the write-ahead log comes too), the pixel cache and, with ``models``, the trained bundles.
    The environment points at it while the test runs."""
    import shutil
    import sqlite3

    settings = make_settings(home)
    src = sqlite3.connect(pipeline.settings.home / "workbench.db")
    dst = sqlite3.connect(settings.home / "workbench.db")
    src.backup(dst)
    src.close()
    dst.close()
    shutil.copytree(pipeline.settings.cache_dir, settings.cache_dir)
    if models:
        shutil.copytree(pipeline.settings.models_dir, settings.models_dir)
    for k, v in _env_for(settings).items():
        monkeypatch.setenv(k, v)
    return settings


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """A tiny trained model with stored predictions: 36 synthetic studies, 2 epochs at 64 px.

    The environment points at this home while the session runs, so code that reads
    ``get_settings()`` (the app, the CLI) sees the same catalog.
    """
    from workbench.catalog.cohorts import cohort_items
    from workbench.catalog.ingest import ingest
    from workbench.dicom.synth import synthesize_cohort
    from workbench.model.bundle import load_bundle
    from workbench.predict.inference import predict_items
    from workbench.train.config import TrainConfig
    from workbench.train.training import train

    root = tmp_path_factory.mktemp("pipeline")
    settings = make_settings(root / "home")
    src = root / "studies"
    synthesize_cohort(src, n_studies=36, seed=7, modality="DX", image_size=96)
    ingest(settings, src, src / "labels.csv", TINY_COHORT, progress=False)
    result = train(
        settings,
        TrainConfig(
            cohort=TINY_COHORT,
            name=TINY_MODEL,
            epochs=2,
            image_size=64,
            batch_size=8,
            precision="auto",  # the probe's choice (fp32 on a CPU without bf16 units)
            device="cpu",
        ),
        progress=False,
    )
    bundle = load_bundle(settings.models_dir, TINY_MODEL)
    items = cohort_items(settings, TINY_COHORT, "test") + cohort_items(
        settings, TINY_COHORT, "calibration"
    )
    predict_items(settings, bundle, items, explain="gradcam", progress=False)
    saved = {k: os.environ.get(k) for k in _env_for(settings)}
    os.environ.update(_env_for(settings))
    try:
        yield Pipeline(settings, src, TINY_COHORT, TINY_MODEL, result.bundle)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
