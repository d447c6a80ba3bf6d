"""Weights from elsewhere, offline: `workbench weights import / list` and
`train --init-from weights:NAME`. Every source file is built here, in its project's key layout,
from a randomly initialised DenseNet121 (nothing is downloaded)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import types
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet121
from torch import nn

from tests.conftest import make_settings
from workbench.cli import main
from workbench.config import Settings
from workbench.model.bundle import load_bundle, save_bundle
from workbench.model.data import (
    PRESET_VERSION,
    InputSpec,
    Normalization,
    augment_batch,
    describe_transforms,
    draw_augmentation,
    eval_transforms,
    make_dataset,
)
from workbench.model.nets import create_network
from workbench.model.weights import (
    WeightsError,
    import_weights,
    input_normalization,
    list_weights,
    load_weights,
    read_entry,
    weights_dir,
)
from workbench.posthoc.calibration import Calibration
from workbench.train.config import TrainConfig
from workbench.train.recipe import prepare_network

MONAI_STEM = "features.conv0.weight"
A_LAYER = "features.denseblock3.denselayer5.layers.conv2.weight"
IMAGENET_GREY = Normalization(scale=1.0, mean=(0.485 + 0.456 + 0.406) / 3, std=0.226)
XRV_NORM = Normalization(scale=2048.0, mean=1024.0, std=1.0)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "home")


def _monai_state(in_channels: int, classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=classes)
    state = net.state_dict()
    # distinct running statistics, so a mix-up of buffers shows
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var")):
            value.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in state.items()}


def _torchvision_layout(state: dict[str, torch.Tensor], old: bool = False) -> dict[str, Any]:
    """torchvision's names (timm's and TorchXRayVision's too): no `.layers`, head `classifier`;
    ``old``: the pre-0.4 spelling `norm.1`, `conv.2`, without num_batches_tracked."""
    out = {}
    for key, value in state.items():
        key = key.replace(".layers.", ".").replace("class_layers.out.", "classifier.")
        if old:
            if key.endswith("num_batches_tracked"):
                continue
            key = re.sub(r"(denselayer\d+\.)(norm|conv)([12])\.", r"\1\2.\3.", key)
        out[key] = value
    return out


def _write_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """The safetensors format by hand (the package is not needed to read it either)."""
    names = {torch.float32: "F32", torch.int64: "I64"}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    chunks, offset = [], 0
    for key, value in state.items():
        data = value.contiguous().numpy().tobytes()
        header[key] = {
            "dtype": names[value.dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(chunks))


def _stored(settings: Settings, name: str) -> dict[str, torch.Tensor]:
    return torch.load(weights_dir(settings) / f"{name}.pt", weights_only=True)


def _assert_converted(
    stored: dict[str, torch.Tensor], source: dict[str, torch.Tensor], rgb: bool
) -> None:
    """The stored file has MONAI's keys, one input channel, the source's tensors."""
    template = create_network(2, 2).state_dict()
    backbone = [k for k in template if k.startswith("features.")]
    assert all(k in stored for k in backbone if not k.endswith("num_batches_tracked"))
    assert all(v.dtype != torch.float32 or not v.requires_grad for v in stored.values())
    stem = source[MONAI_STEM]
    assert stored[MONAI_STEM].shape == (64, 1, 7, 7)
    expected = stem.sum(dim=1, keepdim=True) if rgb else stem
    assert torch.equal(stored[MONAI_STEM], expected)
    assert torch.equal(stored[A_LAYER], source[A_LAYER])
    running = "features.transition2.norm.running_var"
    assert torch.equal(stored[running], source[running])


@pytest.mark.parametrize("old", [False, True], ids=["norm1-keys", "old-norm.1-keys"])
def test_a_torchvision_state_dict_imports_into_monai_layout_with_a_grey_stem(
    settings: Settings, tmp_path: Path, old: bool
) -> None:
    source = _monai_state(3, 1000)
    path = tmp_path / "densenet121-a639ec97.pth"
    tv = _torchvision_layout(source, old=old)
    spelled = "features.denseblock1.denselayer1." + ("norm.1" if old else "norm1") + ".weight"
    assert spelled in tv
    torch.save(tv, path)

    entry = import_weights(settings, path, "torchvision", name="imagenet")

    _assert_converted(_stored(settings, "imagenet"), source, rgb=True)
    assert entry.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    stored_bytes = (weights_dir(settings) / "imagenet.pt").read_bytes()
    assert entry.sha256 == hashlib.sha256(stored_bytes).hexdigest()
    assert entry.source_input["channels"] == 3 and entry.source_input["layout"] == "RGB"
    assert entry.source_input["mean"] == [0.485, 0.456, 0.406]
    assert entry.source_input["std"] == [0.229, 0.224, 0.225]
    assert entry.stored_input["channels"] == 1
    assert "summed" in entry.stored_input["first_conv"]
    assert entry.input_normalization == IMAGENET_GREY
    assert entry.tensors == len(_stored(settings, "imagenet"))
    assert entry.skipped == []
    record = json.loads((weights_dir(settings) / "imagenet.json").read_text())
    for key in ("name", "source_file", "source_sha256", "sha256", "format", "licence"):
        assert key in record
    assert record["format"] == "torchvision" and record["imported"].endswith("Z")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_timm_densenet121_imports_with_imagenet_statistics(
    settings: Settings, tmp_path: Path, suffix: str
) -> None:
    # timm's densenet121: torchvision's key names (features.denseblockN.denselayerM.norm1,
    # features.transitionN, features.norm5, classifier); default_cfg mean / std of ImageNet.
    source = _monai_state(3, 1000, seed=1)
    timm_state = _torchvision_layout(source)
    path = tmp_path / f"densenet121.ra_in1k{suffix}"
    if suffix == ".safetensors":
        _write_safetensors(timm_state, path)
    else:  # a timm training checkpoint keeps it under "state_dict"
        torch.save({"epoch": 299, "arch": "densenet121", "state_dict": timm_state}, path)

    entry = import_weights(settings, path, "timm", name="timm-in1k")

    _assert_converted(_stored(settings, "timm-in1k"), source, rgb=True)
    assert entry.input_normalization == IMAGENET_GREY
    assert entry.source_input["image_size"] == 224


def test_a_torchxrayvision_state_dict_imports_with_its_1024_scaling(
    settings: Settings, tmp_path: Path
) -> None:
    source = _monai_state(1, 18, seed=2)
    xrv_state = _torchvision_layout(source)
    xrv_state["op_threshs"] = torch.rand(18)  # xrv's operating points: not part of DenseNet121
    path = tmp_path / "xrv-all.pt"
    torch.save(xrv_state, path)

    entry = import_weights(settings, path, "torchxrayvision")

    assert entry.name == "xrv-all"
    stored = _stored(settings, "xrv-all")
    _assert_converted(stored, source, rgb=False)
    assert stored["class_layers.out.weight"].shape == (18, 1024)
    assert entry.skipped == ["op_threshs"]
    assert entry.source_input["channels"] == 1 and entry.source_input["layout"] == "gray"
    assert entry.source_input["scale"] == 2048.0 and entry.source_input["mean"] == [1024.0]
    assert entry.input_normalization == XRV_NORM
    # display 0 and 1 land on TorchXRayVision's -1024 and 1024
    assert (XRV_NORM.apply(0.0), XRV_NORM.apply(1.0)) == (-1024.0, 1024.0)
    assert "as in the source" in entry.stored_input["first_conv"]


# --- a whole pickled TorchXRayVision model, as their published files are ----------------------


class _DenseLayer(nn.Sequential):
    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.add_module("norm1", nn.BatchNorm2d(c_in))
        self.add_module("relu1", nn.ReLU(inplace=True))
        self.add_module("conv1", nn.Conv2d(c_in, 128, kernel_size=1, bias=False))
        self.add_module("norm2", nn.BatchNorm2d(128))
        self.add_module("relu2", nn.ReLU(inplace=True))
        self.add_module("conv2", nn.Conv2d(128, 32, kernel_size=3, padding=1, bias=False))
        self.drop_rate = 0.0


class _DenseBlock(nn.Sequential):
    def __init__(self, layers: int, c_in: int) -> None:
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(c_in + 32 * i))


class _Transition(nn.Sequential):
    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(c_in))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(c_in, c_in // 2, kernel_size=1, bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class DenseNet(nn.Module):
    """TorchXRayVision's DenseNet121 module tree (one channel, 18 outputs), for pickling."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv0", nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(64)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                ]
            )
        )
        c = 64
        for i, layers in enumerate((6, 12, 24, 16)):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(layers, c))
            c += 32 * layers
            if i < 3:
                self.features.add_module(f"transition{i + 1}", _Transition(c))
                c //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(c))
        self.classifier = nn.Linear(c, 18)
        self.register_buffer("op_threshs", torch.rand(18))
        self.pathologies = ["Atelectasis"] * 18
        self.weights = "densenet121-res224-all"
        self.upsample = nn.Upsample(size=(224, 224), mode="bilinear", align_corners=False)


@contextmanager
def _as_torchxrayvision() -> Iterator[None]:
    """The classes above named torchxrayvision.models.* while inside (as in their pickles),
    and no torchxrayvision module afterwards: the import must not need one."""
    package = types.ModuleType("torchxrayvision")
    module = types.ModuleType("torchxrayvision.models")
    package.models = module  # type: ignore[attr-defined]
    classes = (DenseNet, _DenseBlock, _DenseLayer, _Transition)
    saved = [(c, c.__module__) for c in classes]
    for c in classes:
        c.__module__ = "torchxrayvision.models"
        setattr(module, c.__name__, c)
    sys.modules["torchxrayvision"], sys.modules["torchxrayvision.models"] = package, module
    try:
        yield
    finally:
        del sys.modules["torchxrayvision"], sys.modules["torchxrayvision.models"]
        for c, name in saved:
            c.__module__ = name


def test_a_whole_pickled_torchxrayvision_model_imports_through_inert_stand_ins(
    settings: Settings, tmp_path: Path
) -> None:
    torch.manual_seed(3)
    model = DenseNet()
    path = tmp_path / "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-best.pt"
    with _as_torchxrayvision():
        torch.save(model, path)
    assert "torchxrayvision" not in sys.modules

    entry = import_weights(settings, path, "torchxrayvision", name="xrv")

    source = {
        k.replace("norm1.", "layers.norm1.")
        .replace("norm2.", "layers.norm2.")
        .replace("conv1.", "layers.conv1.")
        .replace("conv2.", "layers.conv2.")
        .replace("classifier.", "class_layers.out."): v
        for k, v in model.state_dict().items()
    }
    stored = _stored(settings, "xrv")
    assert set(stored) == set(source) - {"op_threshs"}
    assert all(torch.equal(stored[k], source[k]) for k in stored)
    assert entry.skipped == ["op_threshs"]
    assert entry.input_normalization == XRV_NORM
    assert "inert stand-ins" in entry.source_input["note"]
    assert "torchxrayvision" not in sys.modules  # nothing imported it


def test_a_whole_model_in_the_legacy_format_is_refused_with_how_to_convert_it(
    settings: Settings, tmp_path: Path
) -> None:
    # torch < 1.6 pickles each module class with its source code: the weights-only loader
    # cannot read that without the classes, so the file is refused, saying how to convert it.
    path = tmp_path / "xrv-legacy.pt"
    with _as_torchxrayvision(), pytest.warns(UserWarning):
        torch.save(DenseNet(), path, _use_new_zipfile_serialization=False)
    with pytest.raises(WeightsError) as caught:
        import_weights(settings, path, "torchxrayvision")
    message = str(caught.value)
    assert "\n" not in message and "refused" in message and "legacy" in message
    assert "xrv.models.DenseNet(weights=" in message and "torch.save(m.state_dict()" in message
    assert list_weights(settings) == []


# --- nothing that could run code is unpickled --------------------------------------------------


class _Payload:
    """Unpickling this runs a shell command that writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch '{self.marker}'",))


def _malicious(kind: str, tmp_path: Path, marker: Path) -> tuple[Path, str]:
    """A file that runs code when unpickled, in the shape each format's reader expects."""
    state: dict[str, Any] = _torchvision_layout(_monai_state(3, 10))
    if kind == "torchxrayvision-model":
        model = DenseNet()
        model.evil = _Payload(marker)  # type: ignore[assignment]
        path = tmp_path / "evil-xrv.pt"
        with _as_torchxrayvision():
            torch.save(model, path)
        return path, "torchxrayvision"
    state["features.conv0.weight"] = _Payload(marker)
    if kind == "monai-bundle":
        folder = tmp_path / "evil_bundle"
        (folder / "configs").mkdir(parents=True)
        (folder / "models").mkdir()
        (folder / "configs" / "metadata.json").write_text("{}")
        torch.save(state, folder / "models" / "model.pt")
        return folder, kind
    path = tmp_path / f"evil-{kind}.pth"
    torch.save(state, path)
    return path, kind


@pytest.mark.parametrize(
    "kind", ["torchvision", "timm", "torchxrayvision", "torchxrayvision-model", "monai-bundle"]
)
def test_a_pickle_that_runs_code_is_refused_and_never_run(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    marker = tmp_path / "pwned"
    path, fmt = _malicious(kind, tmp_path, marker)

    with pytest.raises(WeightsError, match="refused"):
        import_weights(settings, path, fmt, name="evil")
    monkeypatch.setenv("WORKBENCH_HOME", str(settings.home))
    assert main(["weights", "import", str(path), "--format", fmt, "--name", "evil"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "refused" in err
    if kind.startswith("torchxrayvision"):
        assert "torch.save(m.state_dict(), 'out.pt')" in err  # how to convert it instead

    assert not marker.exists()
    assert list_weights(settings) == []
    assert not (weights_dir(settings) / "evil.pt").exists()


def test_the_malicious_payload_is_live_when_unpickled_unsafely(tmp_path: Path) -> None:
    """The control for the test above: the same payload does write its marker."""
    marker = tmp_path / "pwned"
    path, _ = _malicious("torchvision", tmp_path, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


# --- MONAI model-zoo bundles -------------------------------------------------------------------


def _bundle_files(state: dict[str, torch.Tensor], channels: int) -> dict[str, bytes]:
    metadata = {
        "name": "chest_xray_classification",
        "version": "0.1.0",
        "network_data_format": {
            "inputs": {
                "image": {
                    "num_channels": channels,
                    "spatial_shape": [224, 224],
                    "value_range": [0, 1],
                }
            }
        },
    }
    buf = io.BytesIO()
    torch.save({f"model.{k}": v for k, v in state.items()}, buf)  # keys with a prefix
    return {
        "configs/metadata.json": json.dumps(metadata).encode(),
        "models/model.pt": buf.getvalue(),
    }


def test_a_monai_bundle_folder_imports_without_normalization(
    settings: Settings, tmp_path: Path
) -> None:
    source = _monai_state(1, 4, seed=4)
    folder = tmp_path / "chest_xray_classification"
    for name, data in _bundle_files(source, 1).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)

    entry = import_weights(settings, folder, "monai-bundle", name="zoo")

    _assert_converted(_stored(settings, "zoo"), source, rgb=False)
    assert entry.input_normalization is None  # value range [0, 1]: our display pixels
    assert (
        entry.source_sha256
        == hashlib.sha256((folder / "models" / "model.pt").read_bytes()).hexdigest()
    )
    assert entry.source_input["image_size"] == 224


def test_a_monai_bundle_zip_with_an_rgb_network_imports_with_a_summed_stem(
    settings: Settings, tmp_path: Path
) -> None:
    source = _monai_state(3, 2, seed=5)
    path = tmp_path / "bundle.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in _bundle_files(source, 3).items():
            zf.writestr(f"rgb_bundle/{name}", data)

    entry = import_weights(settings, path, "monai-bundle", name="zoo-rgb")

    _assert_converted(_stored(settings, "zoo-rgb"), source, rgb=True)
    assert entry.source_input["channels"] == 3
    assert entry.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_that_is_not_a_densenet121_is_refused_with_what_is_missing(
    settings: Settings, tmp_path: Path
) -> None:
    text = tmp_path / "README.md"
    text.write_text("# not weights\n")
    with pytest.raises(WeightsError, match="not a PyTorch weights file"):
        import_weights(settings, text, "timm")
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(WeightsError, match="no DenseNet first convolution"):
        import_weights(settings, path, "torchvision")
    half = _torchvision_layout(_monai_state(3, 10))
    half = {k: v for k, v in half.items() if "denseblock4" not in k}
    torch.save(half, path)
    with pytest.raises(WeightsError, match="not a DenseNet121: .* missing"):
        import_weights(settings, path, "torchvision")
    assert list_weights(settings) == []


# --- the store: hash pinning, listing, licence --------------------------------------------------


def _imported(settings: Settings, tmp_path: Path, name: str = "imagenet") -> dict[str, Any]:
    source = _torchvision_layout(_monai_state(3, 1000))
    path = tmp_path / f"{name}.pth"
    torch.save(source, path)
    import_weights(settings, path, "torchvision", name=name)
    return source


def test_a_changed_store_file_is_refused_by_its_pinned_hash(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    _imported(settings, tmp_path)
    state, entry = load_weights(settings, "imagenet")
    assert len(state) == entry.tensors

    stored = weights_dir(settings) / "imagenet.pt"
    tampered = _stored(settings, "imagenet")
    tampered[A_LAYER] = tampered[A_LAYER] + 1e-3
    torch.save(tampered, stored)
    with pytest.raises(WeightsError, match="does not match its recorded sha256"):
        load_weights(settings, "imagenet")

    cfg = TrainConfig(cohort="c", name="n", init_from="weights:imagenet")
    with pytest.raises(WeightsError) as caught:
        prepare_network(settings, cfg, 2, 3)
    message = str(caught.value)
    assert "\n" not in message and "imagenet.pt" in message and "refused" in message


def test_weights_list_shows_one_line_per_entry(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("WORKBENCH_HOME", str(settings.home))
    for var in ("WORKBENCH_MODELS", "WORKBENCH_CACHE", "WORKBENCH_DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    assert main(["weights", "list"]) == 0
    assert capsys.readouterr().out.strip().startswith("0 weights")

    torch.save(_torchvision_layout(_monai_state(3, 1000)), tmp_path / "tv.pth")
    torch.save(_torchvision_layout(_monai_state(1, 18)), tmp_path / "xrv.pt")
    assert main(["weights", "import", str(tmp_path / "tv.pth"), "--format", "torchvision"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("imported tv: 727 tensors") and "--init-from weights:tv" in out
    args = ["weights", "import", str(tmp_path / "xrv.pt"), "--format", "torchxrayvision"]
    assert main([*args, "--name", "chest", "--licence", "Apache-2.0"]) == 0
    capsys.readouterr()

    assert main(["weights", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("2 weights in ")
    chest, tv = lines[0], lines[1]
    assert chest.startswith("chest ") and "torchxrayvision" in chest
    assert "(x*2048-1024)/1" in chest and "licence recorded" in chest
    assert tv.startswith("tv ") and "(x*1-0.449)/0.226" in tv and "licence none" in tv
    assert read_entry(settings, "tv").sha256[:16] in tv

    # the same name twice: refused, in one line
    assert main([*args, "--name", "chest"]) == 1
    assert "already in the store" in capsys.readouterr().err


def test_the_licence_is_recorded_from_a_file_or_as_text(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save(_torchvision_layout(_monai_state(3, 1000)), path)
    licence = tmp_path / "LICENSE"
    licence.write_text("BSD 3-Clause License\n\nCopyright (c) Soumith Chintala 2016\n")

    by_file = import_weights(settings, path, "torchvision", name="a", licence_file=licence)
    by_text = import_weights(settings, path, "torchvision", name="b", licence="CC-BY-4.0")
    none = import_weights(settings, path, "torchvision", name="c")

    assert read_entry(settings, "a").licence == licence.read_text() == by_file.licence
    assert by_file.licence_file == "LICENSE"
    assert read_entry(settings, "b").licence == "CC-BY-4.0" == by_text.licence
    assert none.licence is None
    assert by_file.source_sha256 == by_text.source_sha256  # same source, same hash


# --- training from the store, and the normalization it brings ------------------------------------


def test_init_from_weights_loads_the_backbone_and_records_which_weights(
    settings: Settings, tmp_path: Path
) -> None:
    torch.save(_torchvision_layout(_monai_state(1, 18, seed=7)), tmp_path / "xrv.pt")
    entry = import_weights(settings, tmp_path / "xrv.pt", "torchxrayvision", name="xrv")
    stored = _stored(settings, "xrv")

    cfg = TrainConfig(cohort="c", name="n", init_from="weights:xrv")
    model, report = prepare_network(settings, cfg, 2, 3)

    state = model.state_dict()
    features = [k for k in state if k.startswith("features.")]
    assert all(torch.equal(state[k], stored[k]) for k in features if k in stored)
    assert report["loaded"] == len([k for k in stored if not k.startswith("class_layers.")])
    head = "class_layers.out.weight"  # the source's head (18 findings) is not ours: rebuilt
    assert not torch.equal(state[head], stored[head][:3])
    assert report["weights"] == {
        "name": "xrv",
        "format": "torchxrayvision",
        "sha256": entry.sha256,
        "source_file": "xrv.pt",
        "source_sha256": entry.source_sha256,
        "normalization": XRV_NORM.to_dict(),
    }
    assert report["from"].startswith("weights xrv (torchxrayvision, ")
    # the spec training builds for it normalises as TorchXRayVision expects
    assert input_normalization(settings, "weights:xrv") == XRV_NORM
    assert input_normalization(settings, None) is None
    assert input_normalization(settings, str(tmp_path / "xrv.pt")) is None  # a plain file
    with pytest.raises(WeightsError, match="no weights 'nope' in the store"):
        prepare_network(settings, TrainConfig(cohort="c", name="n", init_from="weights:nope"), 2, 3)


def _image(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "image.npy"
    np.save(path, rng.random((20, 30)).astype(np.float32))
    return path


def test_the_eval_preset_applies_the_normalization_and_can_still_be_inverted(
    tmp_path: Path,
) -> None:
    path = _image(tmp_path)
    plain = eval_transforms(InputSpec(32))({"image": str(path)})["image"]
    spec = InputSpec(32, normalization=XRV_NORM)
    transform = eval_transforms(spec)
    normed = transform({"image": str(path)})["image"]

    assert torch.allclose(torch.as_tensor(normed), torch.as_tensor(plain) * 2048 - 1024, atol=1e-3)
    assert float(normed.min()) >= -1024.0 and float(normed.max()) <= 1024.0
    assert normed.dtype == torch.float32
    assert spec.transform_hash() != InputSpec(32).transform_hash()
    assert InputSpec(32, normalization=IMAGENET_GREY).transform_hash() != spec.transform_hash()
    # a saliency map on the network's grid still maps back onto the image's grid
    heat = torch.zeros_like(torch.as_tensor(normed))
    meta = type(normed)(heat)
    meta.copy_meta_from(normed)
    back = transform.inverse({"image": meta})["image"]
    assert tuple(back.shape) == (1, 20, 30)


def test_training_samples_get_the_same_normalization_and_display_value_augmentation(
    tmp_path: Path,
) -> None:
    path = _image(tmp_path)
    spec = InputSpec(32, normalization=XRV_NORM)
    records = [{"image": str(path), "label": 0}]
    evaluation = make_dataset(records, spec, train=False)[0]["image"]
    training = make_dataset(records, spec, train=True, seed=3)[0]
    assert torch.equal(torch.as_tensor(training["image"]), torch.as_tensor(evaluation))
    assert training["aug"].shape == (12 + 3,)  # the map rides with the augmentation

    # augmenting normalised images = normalising augmented display images
    rng = np.random.default_rng(1)
    x = torch.rand(4, 1, 16, 16)
    params = torch.from_numpy(np.stack([draw_augmentation(rng, 2) for _ in range(4)]))
    params[:, [0, 6, 8, 10]] = 1.0  # every change on (affine, contrast, brightness, noise)
    n = torch.tensor([[2048.0, 1024.0, 1.0]]).expand(4, 3).double()
    normed = augment_batch(XRV_NORM.apply(x), torch.cat([params, n], dim=1))
    assert torch.allclose(normed, XRV_NORM.apply(augment_batch(x, params)), atol=5e-2)


def test_a_bundle_keeps_its_normalization_through_save_and_load(
    settings: Settings, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    classes = ("a", "b")
    spec = InputSpec(32, normalization=XRV_NORM)
    path = save_bundle(
        models, "xrv-tuned", create_network(2, 2), classes, spec,
        Calibration("none", {}, classes), {"problem": "multiclass"},
    )  # fmt: skip
    meta = json.loads((path / "configs" / "metadata.json").read_text())["workbench"]
    assert meta["normalization"] == {"scale": 2048.0, "mean": 1024.0, "std": 1.0}
    assert meta["transform_hash"] == spec.transform_hash()

    loaded = load_bundle(models, "xrv-tuned")
    assert loaded.spec == spec
    assert loaded.spec.transform_hash() == meta["transform_hash"]
    assert "normalised as (x * 2048 - 1024) / 1" in (path / "docs" / "README.md").read_text()
    # fine-tuning from this bundle (--init-from) keeps feeding it what it was trained on
    assert input_normalization(settings, str(path)) == XRV_NORM


def test_an_old_bundle_without_normalization_loads_with_none_and_keeps_its_hash(
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    classes = ("a", "b")
    spec = InputSpec(32)
    path = save_bundle(
        models, "old", create_network(2, 2), classes, spec,
        Calibration("none", {}, classes), {"problem": "multiclass"},
    )  # fmt: skip
    meta_path = path / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    assert meta["workbench"].pop("normalization") is None
    meta_path.write_text(json.dumps(meta))  # as bundles from before the field were written

    loaded = load_bundle(models, "old")
    assert loaded.spec.normalization is None
    assert loaded.spec.transform_hash() == meta["workbench"]["transform_hash"]


@pytest.mark.parametrize("size, dims", [(96, 2), (224, 2), (64, 3)])
def test_a_spec_without_normalization_hashes_as_before_the_field(size: int, dims: int) -> None:
    spec = InputSpec(size, dims)
    before = json.dumps(  # the payload as transform_hash built it before `normalization`
        {
            "preset": PRESET_VERSION,
            "image_size": size,
            "spatial_dims": dims,
            "eval": describe_transforms(eval_transforms(spec)),
        },
        sort_keys=True,
    )
    assert spec.transform_hash() == hashlib.sha256(before.encode()).hexdigest()[:16]
    assert (
        len(eval_transforms(spec).transforms)
        == len(eval_transforms(InputSpec(size, dims, XRV_NORM)).transforms) - 1
    )
