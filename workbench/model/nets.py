"""Network registry: MONAI DenseNets in 2D or 3D, and where each network's parts are.

The model's contract (classes, input size, spatial dims, architecture) lives in the bundle,
not here; this module only builds networks from that contract. Each architecture is one entry
of :data:`NETWORKS` (as timm registers its models), which names its backbone, head, embedding
and Grad-CAM layer for training, similar-case search and saliency. Two architectures, both
MONAI's ``DenseNet`` class:

* ``densenet121`` (the default): MONAI's DenseNet121, 7.0 M parameters, the network that
  published chest X-ray classifiers and the importable weights (``workbench weights``) use.
* ``densenet-small``: the same design with growth rate 16 and blocks (6, 12, 16), 0.77 M
  parameters. One fp32 training step at batch 16 on 2 AVX2 cores (AMD EPYC, torch 2.13.0,
  2026-12-07): 0.30 s at 96 px and 0.41 s at 128 px against DenseNet121's 0.72 s and 1.30 s.
  On the 1,200-study synthetic chest cohort of tests/test_trust_model.py (128 px, 12 epochs)
  it reached test accuracy 0.969, AUROC 0.992 against DenseNet121's 0.960, 0.990, in a third
  of the time; on bench/recipe.py's multi-class task (real CT and MR slices, 64 px) it was
  weaker: AUROC 0.788 against 0.908. For CPU-only machines and quick runs (the demo); no
  published weights fit it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from monai.networks.nets import DenseNet, DenseNet121
from torch import nn

#: The architecture whose key layout imported weights and weights files must have.
PRETRAINED_ARCHITECTURE = "densenet121"


def _densenet121(spatial_dims: int, n_classes: int, in_channels: int, dropout: float) -> nn.Module:
    return DenseNet121(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=n_classes,
        dropout_prob=dropout,
    )


def _densenet_small(
    spatial_dims: int, n_classes: int, in_channels: int, dropout: float
) -> nn.Module:
    return DenseNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=n_classes,
        init_features=32,
        growth_rate=16,
        block_config=(6, 12, 16),
        dropout_prob=dropout,
    )


def _features(model: nn.Module) -> nn.Module:
    return model.features  # type: ignore[return-value]


def _class_layers(model: nn.Module) -> nn.Module:
    return model.class_layers  # type: ignore[return-value]


def _norm5(model: nn.Module) -> nn.Module:
    # the batch norm that closes the last dense block and feeds the head (see
    # explain.gradcam_layer for why it, not the block, is what Grad-CAM explains)
    return model.features.norm5  # type: ignore[union-attr,return-value]


def _densenet_embed(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # class_layers = relu -> adaptive pool -> flatten -> out (linear)
    layers: nn.Sequential = model.class_layers  # type: ignore[assignment]
    pooled = layers[:-1](_features(model)(x))
    return layers[-1](pooled), pooled


@dataclass(frozen=True)
class Network:
    """One architecture: how to build it and where its parts are, so that training (freezing,
    the backbone's learning rate), the embedding and Grad-CAM find them without knowing the
    class. A second architecture is one more entry in :data:`NETWORKS` (and its name in
    ``train_config.Architecture``, which the command line offers).

    ``build(spatial_dims, n_classes, in_channels, dropout)``; ``backbone(model)``: the module
    whose children are the feature blocks in order (frozen from the first; Grad-CAM's
    candidate layers); ``head(model)``: the classifier after it; ``gradcam_layer(model)``: the
    last convolutional feature map, inside the backbone; ``embed(model, x)``: logits and the
    pooled feature vector (``embedding_size`` numbers) in one pass. ``pretrained_layout``:
    whether DenseNet121 weights files (``--init-from``, ``workbench weights``) fit it.
    """

    name: str
    build: Callable[[int, int, int, float], nn.Module]
    embedding_size: int
    pretrained_layout: bool
    backbone: Callable[[nn.Module], nn.Module] = _features
    head: Callable[[nn.Module], nn.Module] = _class_layers
    gradcam_layer: Callable[[nn.Module], nn.Module] = _norm5
    embed: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = _densenet_embed


NETWORKS: dict[str, Network] = {
    "densenet121": Network("densenet121", _densenet121, 1024, pretrained_layout=True),
    "densenet-small": Network("densenet-small", _densenet_small, 384, pretrained_layout=False),
}
#: The attribute a built model carries its architecture's name in (see :func:`network_of`).
_TAG = "workbench_architecture"


def create_network(
    spatial_dims: int,
    n_classes: int,
    in_channels: int = 1,
    architecture: str = "densenet121",
    dropout: float = 0.0,
) -> nn.Module:
    """Build an untrained network. Only known architectures: a bundle never names code to run."""
    if architecture not in NETWORKS:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(NETWORKS)}")
    if spatial_dims not in (2, 3):
        raise ValueError("spatial_dims must be 2 or 3")
    model = NETWORKS[architecture].build(spatial_dims, n_classes, in_channels, dropout)
    setattr(model, _TAG, architecture)
    return model


def network_of(model: nn.Module) -> Network:
    """The registry entry of a model :func:`create_network` built (through DDP's or
    torch.compile's wrapper too). A MONAI DenseNet built elsewhere has DenseNet121's parts."""
    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or model
    name = getattr(inner, _TAG, None)
    if isinstance(name, str) and name in NETWORKS:
        return NETWORKS[name]
    if isinstance(getattr(inner, "features", None), nn.Module) and isinstance(
        getattr(inner, "class_layers", None), nn.Sequential
    ):
        return NETWORKS["densenet121"]
    raise ValueError(f"{type(inner).__name__} is not a network of the registry (nets.NETWORKS)")


def embed(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the pooled feature vector before the classifier, in one forward pass.

    x: (B, C, H, W) or (B, C, D, H, W) -> logits (B, K), embedding (B, F), F the
    architecture's ``embedding_size`` (1,024 for DenseNet121, 384 for densenet-small).
    """
    return network_of(model).embed(model, x)


# torchvision's DenseNet keys -> MONAI's: MONAI wraps each dense layer's modules in `.layers`.
# MONAI has this mapping only inside its download helper (densenet._load_state_dict, for the
# old "norm.1" spelling); here it also covers today's "norm1" and a file given by path.
# timm's and TorchXRayVision's DenseNet121 use torchvision's names.
_TV_DENSE_LAYER = re.compile(r"^(.*denselayer\d+)\.(norm|relu|conv)\.?([12])\.(.+)$")
_TV_HEAD = "classifier."  # torchvision's linear head; MONAI's is class_layers.out


def monai_key(key: str) -> str:
    """A DenseNet121 state-dict key in MONAI's layout: torchvision's spellings (also timm's and
    TorchXRayVision's) and DataParallel's ``module.`` mapped, MONAI's own kept."""
    key = key.removeprefix("module.")  # saved from DataParallel / DDP
    m = _TV_DENSE_LAYER.match(key)
    if m:
        return f"{m.group(1)}.layers.{m.group(2)}{m.group(3)}.{m.group(4)}"
    if key.startswith(_TV_HEAD):
        return "class_layers.out." + key.removeprefix(_TV_HEAD)
    return key


def sum_input_channels(weight: torch.Tensor) -> torch.Tensor:
    """A first convolution's weight (out, C, *kernel) for one input channel: summed over the C
    channels (timm's ``adapt_input_conv``), so a grey image copied into every channel and the
    grey image itself give the same response."""
    return weight.sum(dim=1, keepdim=True)


def load_initial_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor]
) -> dict[str, list[str]]:
    """Copy every tensor of ``state`` that fits ``model``; the rest is reported, not guessed.

    ``state`` is a workbench bundle's weights or a DenseNet121 state dict in torchvision's key
    layout (e.g. ImageNet weights, given by path: nothing is downloaded). The classifier head
    never carries over when the number of classes differs (it is rebuilt). An RGB first
    convolution feeding a one-channel model is summed over its colour channels, which keeps
    its response to a grey image. Returns {"loaded": [...], "skipped": [...]} by key.
    """
    target = model.state_dict()
    loaded, skipped = [], []
    for key, value in state.items():
        name = monai_key(key)
        if name not in target:
            skipped.append(key)
            continue
        want = target[name]
        stem = name.endswith("conv0.weight") and value.dim() == want.dim() >= 2
        if stem and (value.shape[1], want.shape[1]) == (3, 1):  # RGB stem into a grey model
            value = sum_input_channels(value)
        if tuple(value.shape) != tuple(want.shape):
            skipped.append(key)
            continue
        target[name] = value.to(want.dtype)
        loaded.append(name)
    model.load_state_dict(target)
    return {"loaded": loaded, "skipped": skipped}


def freeze_early_blocks(model: nn.Module, blocks: int) -> list[str]:
    """Freeze the stem and the first ``blocks`` dense blocks (and their transitions).

    Frozen modules keep their weights and their BatchNorm statistics (they stay in eval
    mode: see :func:`keep_frozen_in_eval`). Returns the names of the frozen modules.
    """
    if blocks <= 0:
        return []
    frozen = []
    for name, module in network_of(model).backbone(model).named_children():
        m = re.search(r"(\d+)$", name)
        index = int(m.group(1)) if m else 0
        if index <= blocks and not name.startswith("norm5"):
            for p in module.parameters():
                p.requires_grad_(False)
            frozen.append(name)
    return frozen


def keep_frozen_in_eval(model: nn.Module) -> None:
    """After ``model.train()``: put modules without trainable parameters back in eval mode,
    so a frozen block's BatchNorm statistics do not drift."""
    for module in network_of(model).backbone(model).children():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
