"""The network is a choice the bundle records: a compact DenseNet trains, is rebuilt from its
bundle, explains and predicts like DenseNet121, and weights of another architecture are refused
in one line before anything trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import Pipeline, make_settings
from workbench import cli
from workbench.catalog.cohorts import cohort_items
from workbench.catalog.ingest import ingest
from workbench.cli import demo as cli_demo
from workbench.cli import models as cli_models
from workbench.dicom.plant import planted_cohort
from workbench.model import nets
from workbench.model.bundle import load_bundle
from workbench.model.contract import ModelContract
from workbench.model.runtime import training_precision
from workbench.predict.inference import predict_items
from workbench.predict.results import latest_predictions
from workbench.train.config import ARCHITECTURES, TrainConfig
from workbench.train.recipe import TrainingError
from workbench.train.training import train

SMALL = {"image_size": 32, "batch_size": 4, "sanity_images": 0, "label_randomization_epochs": 0}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 one-slice studies of real anatomy, half with a planted lesion, in cohort "slices"."""
    root = tmp_path_factory.mktemp("arch")
    planted_cohort(root / "src", 24, seed=2, task="binary")
    ingest(make_settings(root / "home"), root / "src", root / "src/labels.csv", "slices")
    return root / "home"


def test_the_cli_offers_the_architectures_the_network_factory_builds() -> None:
    assert tuple(nets.NETWORKS) == ARCHITECTURES
    a = cli.build_parser().parse_args(["train", "--cohort", "c", "--name", "m"])
    assert a.architecture == "densenet121"  # train's default
    assert cli.build_parser().parse_args(["demo"]).architecture == cli_demo.DEMO_ARCHITECTURE
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(
            ["train", "--cohort", "c", "--name", "m", "--architecture", "resnet50"]
        )


def test_the_compact_densenet_is_a_tenth_of_densenet121_with_the_same_modules() -> None:
    small, big = (
        nets.create_network(2, 3, architecture=a) for a in ("densenet-small", "densenet121")
    )
    n_small, n_big = (sum(p.numel() for p in m.parameters()) for m in (small, big))
    assert n_small < n_big / 8
    logits, emb = nets.embed(small, torch.rand(2, 1, 64, 64))
    assert logits.shape == (2, 3) and emb.shape == (2, 384)
    assert nets.freeze_early_blocks(small, 1)  # the same block names as DenseNet121
    with pytest.raises(ValueError, match="unknown architecture"):
        nets.create_network(2, 3, architecture="resnet50")


@pytest.mark.parametrize("name", list(nets.NETWORKS))
def test_each_registered_network_names_its_parts_for_training_embedding_and_grad_cam(
    name: str,
) -> None:
    entry = nets.NETWORKS[name]
    model = nets.create_network(2, 3, architecture=name)
    assert nets.network_of(model) is entry
    backbone_params = {id(p) for p in entry.backbone(model).parameters()}
    head_params = {id(p) for p in entry.head(model).parameters()}
    assert backbone_params and head_params and not backbone_params & head_params
    everything = {id(p) for p in model.parameters()}
    assert backbone_params | head_params == everything
    assert any(m is entry.gradcam_layer(model) for m in entry.backbone(model).modules())
    x = torch.rand(2, 1, 64, 64)
    logits, emb = nets.embed(model.eval(), x)
    assert logits.shape == (2, 3) and emb.shape == (2, entry.embedding_size)
    assert torch.allclose(logits, model(x), atol=1e-5)  # the embedding pass is the forward pass


def test_a_second_architecture_is_one_registry_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny DenseNet registered under a new name: built, embedded, frozen and explained by
    the same code, with nothing else changed."""
    from monai.networks.nets import DenseNet

    def tiny(
        spatial_dims: int, n_classes: int, in_channels: int, dropout: float
    ) -> torch.nn.Module:
        return DenseNet(
            spatial_dims,
            in_channels,
            n_classes,
            init_features=8,
            growth_rate=4,
            block_config=(2, 2),
            dropout_prob=dropout,
        )

    monkeypatch.setitem(nets.NETWORKS, "tiny", nets.Network("tiny", tiny, 16, False))
    model = nets.create_network(2, 2, architecture="tiny").eval()
    x = torch.rand(1, 1, 64, 64)
    logits, emb = nets.embed(model, x)
    assert torch.allclose(logits, model(x), atol=1e-6) and emb.shape == (1, 16)
    assert nets.freeze_early_blocks(model, 1)
    from workbench.predict.explain import gradcam_layer_for, saliency

    layer, grid = gradcam_layer_for(model, x)
    assert any(m is layer for m in model.features.children())
    heat = saliency(model, x, 1, "gradcam")
    assert heat.shape == (64, 64)


def test_a_compact_densenet_trains_is_rebuilt_from_its_bundle_and_explains(home: Path) -> None:
    settings = make_settings(home)
    cfg = TrainConfig(
        cohort="slices", name="small", architecture="densenet-small", epochs=1, **SMALL
    )
    result = train(settings, cfg, progress=False)
    meta = json.loads((result.bundle / "configs" / "metadata.json").read_text())
    wb = meta["workbench"]
    assert wb["architecture"] == "densenet-small" == wb["training"]["architecture"]
    assert meta["description"].startswith("densenet-small classifying")
    assert "densenet-small" in wb["training"]["precision_choice"]["reason"]  # what was probed
    bundle = load_bundle(settings.models_dir, "small")
    n_params = sum(p.numel() for p in bundle.network.parameters())
    assert n_params == sum(
        p.numel() for p in nets.create_network(2, 2, architecture="densenet-small").parameters()
    )
    test = cohort_items(settings, "slices", "test")
    predict_items(settings, bundle, test, explain="gradcam", progress=False)
    preds = latest_predictions(settings, bundle.bundle_hash, [i.study_id for i in test])
    assert len(preds) == len(test) and all(p.probabilities for p in preds.values())
    assert "densenet-small" in cli_models.model_line("small/v1", ModelContract.from_dict(wb))


def test_weights_of_another_architecture_are_refused_before_training(
    home: Path, tmp_path: Path, pipeline: Pipeline
) -> None:
    settings = make_settings(home)
    weights = tmp_path / "imagenet.pt"
    torch.save(nets.create_network(2, 1000).state_dict(), weights)
    small = TrainConfig(cohort="slices", name="x", architecture="densenet-small", epochs=1, **SMALL)
    with pytest.raises(TrainingError, match="--architecture densenet121"):
        train(settings, TrainConfig(**{**small.__dict__, "init_from": str(weights)}), False)
    # a bundle is started from only by the architecture it was trained as
    with pytest.raises(TrainingError, match="that bundle is a densenet121"):
        train(
            pipeline.settings,
            TrainConfig(
                **{**small.__dict__, "cohort": pipeline.cohort, "init_from": pipeline.model}
            ),
            False,
        )
    assert not (settings.models_dir / "x").exists()


def test_the_precision_probe_is_cached_per_architecture(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    a = training_precision("auto", cpu, 2, 32, 2, tmp_path, architecture="densenet-small")
    b = training_precision("auto", cpu, 2, 32, 2, tmp_path)
    assert not a.cached and not b.cached  # two entries, not one reused
    cache = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert len(cache) == 2 and sum("densenet-small" in k for k in cache) == 1
    again = training_precision("auto", cpu, 2, 32, 2, tmp_path, architecture="densenet-small")
    assert again.cached
