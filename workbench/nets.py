"""Network factory: MONAI DenseNet121 in 2D or 3D, and the embedding it carries.

The model's contract (classes, input size, spatial dims) lives in the bundle, not here; this
module only builds networks from that contract.
"""

from __future__ import annotations

from typing import Literal

import torch
from monai.networks.nets import DenseNet121
from torch import nn

Architecture = Literal["densenet121"]
ARCHITECTURES: tuple[str, ...] = ("densenet121",)


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
    return DenseNet121(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=n_classes,
        dropout_prob=dropout,
    )


def embed(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the pooled feature vector before the classifier, in one forward pass.

    x: (B, C, H, W) or (B, C, D, H, W) -> logits (B, K), embedding (B, 1024) for DenseNet121.
    """
    features: nn.Module = model.features  # type: ignore[assignment]
    layers: nn.Sequential = model.class_layers  # type: ignore[assignment]
    # class_layers = relu -> adaptive pool -> flatten -> out (linear)
    pooled = layers[:-1](features(x))
    return layers[-1](pooled), pooled
