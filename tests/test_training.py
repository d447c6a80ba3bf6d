"""Training under autocast on the CPU, bundles that load back and predict identically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import Pipeline
from workbench.catalog.cohorts import cohort_items
from workbench.catalog.ingest import CatalogError, cache_path, ingest
from workbench.config import Settings
from workbench.dicom.synth import synthesize_cohort
from workbench.model.bundle import load_bundle
from workbench.model.bundle_info import hash_bundle
from workbench.model.nets import create_network, load_initial_weights
from workbench.model.runtime import choose_precision, resolve_precision
from workbench.predict.inference import predict_study
from workbench.predict.results import latest_predictions
from workbench.train.config import TrainConfig
from workbench.train.loop import train_epoch
from workbench.train.recipe import TrainingError, prepare_network
from workbench.train.training import train


def test_a_few_steps_in_this_cpus_training_precision_lower_the_loss() -> None:
    # bf16 where the CPU has bf16 units, fp32 on an AVX2-only CPU (where emulated bf16 took
    # 97 s for these 12 steps against about 10 s in fp32).
    precision = resolve_precision("auto", torch.device("cpu"), 2, training=True)
    torch.manual_seed(0)
    model = create_network(2, 3).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x = torch.rand(8, 1, 32, 32)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    x[y == 1, :, 8:16, 8:16] += 1.0  # a visible difference per class
    x[y == 2, :, 20:28, 4:30] += 0.8
    batch = [{"image": x, "label": y}] * 12
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cpu = torch.device("cpu")
    losses = train_epoch(model, batch, loss_fn, opt, scaler, cpu, precision, 2)
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_a_nan_loss_stops_with_a_clear_message() -> None:
    model = create_network(2, 2)
    batch = [{"image": torch.full((2, 1, 32, 32), float("nan")), "label": torch.tensor([0, 1])}]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.raises(TrainingError, match="loss became nan"):
        train_epoch(
            model,
            batch,
            nn.CrossEntropyLoss(),
            opt,
            torch.amp.GradScaler("cpu", enabled=False),
            torch.device("cpu"),
            "fp32",
            2,
        )
    after = model.state_dict()
    assert all(
        torch.equal(before[k], after[k]) for k in before if before[k].dtype.is_floating_point
    )


def test_training_writes_a_complete_bundle(pipeline: Pipeline) -> None:
    path = pipeline.bundle
    meta = json.loads((path / "configs" / "metadata.json").read_text())
    wb = meta["workbench"]
    assert wb["classes"] == ["effusion", "nodule", "normal"]
    assert wb["negative_class"] == "normal"
    assert wb["image_size"] == 64 and wb["spatial_dims"] == 2
    assert len(wb["cohort_hash"]) == 64
    assert set(wb["split"]["studies"]) == {"train", "validation", "calibration", "test"}
    # auto: the probe of this machine's real step, recorded; bf16 only where it has bf16
    # units and beat fp32 (AVX512-BF16 / AMX), fp32 on an AVX2-only CPU.
    choice = wb["training"]["precision_choice"]
    assert choice["probe"]["fp32"] > 0 and choice["reason"]
    assert wb["training"]["precision"] == choose_precision(choice["probe"])
    assert wb["calibration"]["method"] in ("none", "temperature", "sigmoid", "isotonic")
    assert "auroc_macro" in wb["metrics"]["test"]
    assert wb["code_version"]
    for rel in ("configs/inference.json", "models/model.pt", "docs/README.md"):
        assert (path / rel).exists()
    curves = (path / "docs" / "training.png").read_bytes()
    assert curves.startswith(b"\x89PNG") and len(wb["training"]["history"]) == 2
    # Weights load with weights_only=True: nothing executable is unpickled.
    state = torch.load(path / "models" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_a_bundle_loads_again_and_predicts_identically(pipeline: Pipeline) -> None:
    s = pipeline.settings
    first = load_bundle(s.models_dir, pipeline.model)
    second = load_bundle(s.models_dir, str(pipeline.bundle))
    assert first.bundle_hash == second.bundle_hash == hash_bundle(pipeline.bundle)
    item = cohort_items(s, pipeline.cohort, "test")[0]
    a = predict_study(s, first, item, explain="none", precision="fp32")
    b = predict_study(s, second, item, explain="none", precision="fp32")
    assert a.probabilities == b.probabilities
    stored = latest_predictions(s, first.bundle_hash, [item.study_id])[item.study_id]
    again = predict_study(s, first, item, explain="none", precision="auto")
    assert np.allclose(
        [stored.probabilities[c] for c in first.classes],
        [again.probabilities[c] for c in first.classes],
        atol=1e-6,
    )


def test_training_an_unknown_cohort_is_a_clear_error(pipeline: Pipeline) -> None:
    with pytest.raises(CatalogError, match="no cohort named 'missing'"):
        train(pipeline.settings, TrainConfig(cohort="missing", name="x"), progress=False)


def test_a_ct_cohort_trains_a_3d_densenet_and_explains_whole_volumes(
    settings: Settings, tmp_path: Path
) -> None:
    from workbench.model.data import eval_transforms
    from workbench.predict.explain import sanity_checks

    src = tmp_path / "ct"
    synthesize_cohort(src, n_studies=10, seed=4, modality="CT", image_size=48)
    ingest(settings, src, src / "labels.csv", "ct", progress=False)
    # No saliency sanity checks in the bundle: on volumes they run occlusion and integrated
    # gradients for three models (trained, weight-randomised, label-randomised), about six
    # minutes on 2 cores for this cohort's two test volumes. The cheap methods are checked on
    # a volume below; the bundle's checks are tested on the 2D trust model.
    cfg = TrainConfig(
        cohort="ct", name="ct", epochs=1, image_size=32, batch_size=4, device="cpu",
        sanity_images=0,
    )  # fmt: skip
    result = train(settings, cfg, progress=False)
    wb = json.loads((result.bundle / "configs" / "metadata.json").read_text())["workbench"]
    assert wb["spatial_dims"] == 3 and wb["classes"] == ["lesion", "no_lesion"]
    assert wb["training"]["precision"] == "fp32"  # auto: no bf16 for 3D on the CPU
    bundle = load_bundle(settings.models_dir, "ct")
    item = cohort_items(settings, "ct", "test")[0]
    pred = predict_study(settings, bundle, item, explain="gradcam")
    (image,) = pred.images
    volume = np.load(cache_path(settings, image.cache_key))
    assert volume.shape == (32, 48, 48)  # slices stacked along the normal at ingest
    assert image.saliency_file is not None
    heat = np.load(settings.cache_dir / image.saliency_file)
    assert heat.shape == volume.shape and np.isfinite(heat).all()
    x = torch.as_tensor(eval_transforms(bundle.spec)({"image": str(item.images[0])})["image"])
    assert x.shape == (1, 32, 32, 32)
    checks = sanity_checks(bundle.network, [x[None]], [0], ("gradcam", "gradient"))
    for method in ("gradcam", "gradient"):
        assert checks[method]["n_images"] == 1
        assert all(np.isfinite(v) for v in checks[method].values()), checks[method]


def test_a_run_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import make_settings

    src = tmp_path / "src"
    synthesize_cohort(src, n_studies=30, seed=13, modality="DX", image_size=48)
    args = ["--cohort", "c", "--epochs", "2", "--image-size", "32", "--batch-size", "4"]
    args += ["--checkpoint-every", "3", "--name", "m"]
    args += ["--sanity-images", "0"]  # the bundle's saliency checks come after the weights
    args += ["--ema-decay", "0.9"]  # the kept weights are the average: it must resume too
    homes = {}
    for run in ("whole", "killed"):
        s = make_settings(tmp_path / run)  # same key: the same pseudonyms and split
        ingest(s, src, src / "labels.csv", "c", progress=False, workers=1)
        homes[run] = s

    def start(home: Path, *extra: str) -> subprocess.Popen[str]:
        env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("WORKBENCH")}
        env.update(WORKBENCH_HOME=str(home), PYTHONWARNINGS="ignore")
        return subprocess.Popen(
            [sys.executable, "-m", "workbench.cli", "train", *args, *extra],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    assert start(homes["whole"].home).wait(timeout=300) == 0
    victim = start(homes["killed"].home)
    ckpt = homes["killed"].models_dir / "m" / ".training" / "checkpoint.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)  # no chance to clean up: as a crash would
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["batch"] > 0  # the last checkpoint is inside an epoch (every 3 steps)
    resumed = start(homes["killed"].home, "--resume")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resuming at epoch {saved['epoch'] + 1}, batch {saved['batch'] + 1}" in out
    whole = torch.load(homes["whole"].models_dir / "m" / "v1" / "models" / "model.pt")
    again = torch.load(homes["killed"].models_dir / "m" / "v1" / "models" / "model.pt")
    assert whole.keys() == again.keys()
    assert all(torch.equal(whole[k], again[k]) for k in whole), "resumed weights differ"


def test_fine_tuning_onto_one_more_class_keeps_the_backbone_and_trains_a_new_head(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    import csv
    import shutil

    s = pipeline.settings
    src = tmp_path / "more"
    synthesize_cohort(src, n_studies=24, seed=21, modality="DX", image_size=64)
    rows = list(csv.DictReader((src / "labels.csv").open()))
    for row in rows[::4]:
        row["label"] = "pneumothorax"  # a class the source model never saw
    with (src / "labels-4.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["StudyInstanceUID", "label"])
        w.writeheader()
        w.writerows(rows)
    ingest(s, src, src / "labels-4.csv", "four", progress=False, workers=1)
    cfg = TrainConfig(
        cohort="four",
        name="four-classes",
        epochs=1,
        image_size=64,
        batch_size=8,
        init_from=pipeline.model,
        freeze_blocks=4,  # stem and every dense block: only the new head learns
        sanity_images=0,  # no saliency checks (a shuffled-label model from scratch) after it
    )
    _, report = prepare_network(s, cfg, 2, 4)
    assert report["loaded"] > 300 and "bundle tiny-model/v1" in report["from"]
    assert {k for k in report["skipped"]} == {"class_layers.out.weight", "class_layers.out.bias"}
    result = train(s, cfg, progress=False)
    source = torch.load(pipeline.bundle / "models" / "model.pt", weights_only=True)
    tuned = torch.load(result.bundle / "models" / "model.pt", weights_only=True)
    backbone = [k for k in tuned if k.startswith("features.") and "norm5" not in k]
    assert backbone and all(torch.equal(tuned[k], source[k]) for k in backbone)
    assert tuned["class_layers.out.weight"].shape == (4, 1024)
    meta = json.loads((result.bundle / "configs" / "metadata.json").read_text())["workbench"]
    assert meta["classes"] == ["effusion", "nodule", "normal", "pneumothorax"]
    assert meta["training"]["init"]["frozen"][:2] == ["conv0", "norm0"]
    shutil.rmtree(result.bundle.parent)


def test_a_backbone_lr_factor_of_zero_fine_tunes_the_head_alone(pipeline: Pipeline) -> None:
    """``train --backbone-lr-factor 0`` from a bundle: every backbone parameter keeps its value
    (BatchNorm's running statistics still follow the data) while the head learns."""
    from tests.conftest import _env_for, run_cli

    s = pipeline.settings
    env = {k: v for k, v in _env_for(s).items() if k != "WORKBENCH_HOME"}
    args = ["train", "--cohort", pipeline.cohort, "--name", "head-only", "--epochs", "1"]
    args += ["--image-size", "64", "--batch-size", "8", "--init-from", pipeline.model]
    args += ["--sanity-images", "0", "--label-randomization-epochs", "0", "--precision", "fp32"]
    r = run_cli([*args, "--backbone-lr-factor", "0"], s.home, **env)
    assert r.returncode == 0, r.stderr
    source = torch.load(pipeline.bundle / "models" / "model.pt", weights_only=True)
    bundle = s.models_dir / "head-only" / "v1"
    tuned = torch.load(bundle / "models" / "model.pt", weights_only=True)
    params = {name for name, _ in create_network(2, 3).named_parameters()}
    backbone = sorted(k for k in params if k.startswith("features."))
    assert len(backbone) > 300
    assert all(torch.equal(tuned[k], source[k]) for k in backbone)
    assert not torch.equal(tuned["class_layers.out.weight"], source["class_layers.out.weight"])
    stats = [k for k in tuned if k.endswith("running_mean")]
    assert any(not torch.equal(tuned[k], source[k]) for k in stats)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())["workbench"]
    assert meta["training"]["backbone_lr_factor"] == 0.0


def test_a_torchvision_layout_state_dict_loads_into_the_network(tmp_path: Path) -> None:
    from monai.networks.nets import DenseNet121

    rgb = DenseNet121(spatial_dims=2, in_channels=3, out_channels=1000)
    # torchvision's names: no `.layers` inside a dense layer, the head is `classifier`
    tv = {}
    for key, value in rgb.state_dict().items():
        key = key.replace(".layers.", ".").replace("class_layers.out.", "classifier.")
        tv[key] = value.clone()
    assert "features.denseblock1.denselayer1.norm1.weight" in tv
    path = tmp_path / "densenet121_imagenet.pth"
    torch.save(tv, path)
    model = create_network(2, 3)
    report = load_initial_weights(model, torch.load(path, weights_only=True))
    state = model.state_dict()
    features = [k for k in state if k.startswith("features.")]
    assert set(report["loaded"]) == set(features)  # every backbone tensor came across
    assert set(report["skipped"]) == {"classifier.weight", "classifier.bias"}
    grey = tv["features.conv0.weight"].sum(dim=1, keepdim=True)
    assert torch.equal(state["features.conv0.weight"], grey)  # RGB stem summed for grey input
    key = "features.denseblock3.denselayer5.layers.conv2.weight"
    assert torch.equal(state[key], tv[key.replace(".layers.", ".")])
