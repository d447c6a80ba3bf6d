"""What a training run leaves behind: the last good checkpoint when the loss diverges, the
experiment record in each bundle and its one-line listing, compiled training."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.conftest import make_settings
from workbench import cli
from workbench.catalog.ingest import ingest
from workbench.config import Settings
from workbench.dicom.synth import synthesize_cohort
from workbench.model.problems import Objective


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("record")
    s = make_settings(root / "home")
    src = root / "src"
    synthesize_cohort(src, n_studies=20, seed=11, modality="DX", image_size=48)
    ingest(s, src, src / "labels.csv", "c", progress=False, workers=1)
    return s


def _use(monkeypatch: pytest.MonkeyPatch, s: Settings) -> None:
    """Point the CLI (get_settings) at this home."""
    monkeypatch.setenv("WORKBENCH_HOME", str(s.home))
    monkeypatch.setenv("WORKBENCH_DATABASE_URL", s.database_url)
    monkeypatch.setenv("WORKBENCH_MODELS", str(s.models_dir))
    monkeypatch.setenv("WORKBENCH_CACHE", str(s.cache_dir))
    monkeypatch.delenv("WORKBENCH_DEBUG", raising=False)


TRAIN = ["train", "--cohort", "c", "--image-size", "32", "--batch-size", "4", "--device", "cpu"]


def test_a_diverging_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(
    small: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _use(monkeypatch, small)
    real = Objective.forward
    calls = {"n": 0}

    def diverging(self: Objective, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = real(self, logits, target)
        return loss * float("nan") if calls["n"] > 2 else loss  # the 3rd step diverges

    monkeypatch.setattr(Objective, "forward", diverging)
    code = cli.main([*TRAIN, "--name", "nan", "--epochs", "1", "--checkpoint-every", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: the loss became nan after 2 steps")
    assert "last good checkpoint is kept" in err[-1]
    assert not any(line.startswith("Traceback") for line in err)
    ckpt = small.models_dir / "nan" / ".training" / "checkpoint.pt"
    saved = torch.load(ckpt, weights_only=False)  # our own file: the run's state at step 2
    assert saved["step"] == 2 and saved["batch"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert not (small.models_dir / "nan" / "v1").exists()  # no bundle from a diverged run
    shutil.rmtree(small.models_dir / "nan")


def test_each_bundle_records_its_experiment_and_models_lists_it(
    small: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _use(monkeypatch, small)
    args = ["--name", "rec", "--epochs", "2", "--balance", "sampler", "--sanity-images", "0"]
    assert cli.main([*TRAIN, *args]) == 0
    meta = json.loads((small.models_dir / "rec" / "v1" / "configs" / "metadata.json").read_text())
    tr = meta["workbench"]["training"]
    assert tr["epochs"] == 2 and tr["balance"] == "sampler" and tr["problem"] == "multiclass"
    assert tr["loss"] == {"kind": "cross_entropy", "class_weight": None}
    assert [h["epoch"] for h in tr["history"]] == [1, 2]
    assert {"train_loss", "val_loss", "val_auroc", "lr", "seconds"} <= set(tr["history"][0])
    hw = tr["hardware"]
    assert hw["cpu_cores"] == os.cpu_count() and hw["processes"] == 1 and hw["gpu"] is None
    assert hw["torch"] == torch.__version__ and hw["monai"]
    assert tr["seconds"] > 0 and tr["epochs_run"] == 2
    capsys.readouterr()
    assert cli.main(["models"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("rec/v1"))
    for part in ("multiclass", "AUROC", "ECE", "epochs 2", " s  on ", hw["cpu"][:10]):
        assert part in line


def test_compiled_training_is_unwrapped_for_the_frozen_blocks_and_the_state_dict() -> None:
    from workbench.model.nets import create_network
    from workbench.train.recipe import unwrap

    model = create_network(2, 2)
    compiled = torch.compile(model)  # lazy: nothing is compiled until the first call
    assert unwrap(compiled) is model  # type: ignore[arg-type]


@pytest.mark.skipif(
    not os.environ.get("WORKBENCH_SLOW_TESTS"),
    reason="torch.compile of DenseNet121 takes minutes on 2 CPU cores; WORKBENCH_SLOW_TESTS=1",
)
def test_compiled_training_reports_its_compile_time(
    small: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, small)
    assert cli.main([*TRAIN, "--name", "compiled", "--epochs", "1", "--compile"]) == 0
    path = small.models_dir / "compiled" / "v1" / "configs" / "metadata.json"
    tr = json.loads(path.read_text())["workbench"]["training"]
    assert tr["compile"] is True and tr["compile_seconds"] is not None
