"""Network factory: MONAI DenseNets in 2D or 3D, and the embedding they carry.

The model's contract (classes, input size, spatial dims, architecture) lives in the bundle,
not here; this module only builds networks from that contract. Two architectures, both MONAI's
``DenseNet`` class (so Grad-CAM, the embedding and freezing find the same ``features`` /
``class_layers`` modules in each):

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
from collections.abc import Mapping

import torch
from monai.networks.nets import DenseNet, DenseNet121
from torch import nn

from workbench.train_config import ARCHITECTURES

#: The architecture whose key layout imported weights and weights files must have.
PRETRAINED_ARCHITECTURE = "densenet121"


def create_network(
    spatial_dims: int,
    n_classes: int,
    in_channels: int = 1,
    architecture: str = "densenet121",
    dropout: float = 0.0,
) -> nn.Module:
    """Build an untrained network. Only known architectures: a bundle never names code to run."""
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}"
        )
    if spatial_dims not in (2, 3):
        raise ValueError("spatial_dims must be 2 or 3")
    if architecture == "densenet-small":
        return DenseNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=n_classes,
            init_features=32,
            growth_rate=16,
            block_config=(6, 12, 16),
            dropout_prob=dropout,
        )
    return DenseNet121(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=n_classes,
        dropout_prob=dropout,
    )


def embed(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the pooled feature vector before the classifier, in one forward pass.

    x: (B, C, H, W) or (B, C, D, H, W) -> logits (B, K), embedding (B, F): F = 1024 for
    DenseNet121, 384 for densenet-small.
    """
    features: nn.Module = model.features  # type: ignore[assignment]
    layers: nn.Sequential = model.class_layers  # type: ignore[assignment]
    # class_layers = relu -> adaptive pool -> flatten -> out (linear)
    pooled = layers[:-1](features(x))
    return layers[-1](pooled), pooled


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
    for name, module in model.features.named_children():  # type: ignore[union-attr]
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
    for module in model.features.children():  # type: ignore[union-attr]
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
