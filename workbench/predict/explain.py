"""Saliency maps for image classifiers (Captum), their sanity checks and faithfulness scores
(overlays are drawn by :mod:`workbench.predict.heatmap`).

All attribution is done by Captum: Grad-CAM (``LayerGradCam`` on a feature block with
cells of at most 16 px, see :func:`gradcam_layer_for`, upsampled with
``LayerAttribution.interpolate``), Integrated Gradients,
Occlusion and plain gradients (``Saliency``).  This module only picks the layer / window
sizes, reduces the result to one spatial map in [0, 1] and blends it onto the grey image.

It also checks the maps (:func:`sanity_checks`): the model-parameter randomisation test of
Adebayo et al. 2018 (a map that barely changes when the weights are re-initialised explains
the image, not the model: reported as the Spearman rank correlation of the two maps) and the
deletion / insertion faithfulness scores of Petsiuk et al. 2018 (how fast the class
probability falls as the most salient pixels are removed, and rises as they are restored),
each beside the same score for a random map. The label-randomisation test needs a model
trained on shuffled labels; training provides it and calls :func:`map_similarity`.

Gradients are taken with ``torch.autograd.grad`` inside Captum, which never accumulates
into parameters' ``.grad``; :func:`saliency` additionally snapshots and restores every
parameter's ``.grad`` so that a caller in the middle of a training step is unaffected.
The model's train/eval mode is left exactly as given (eval mode is the caller's job).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, cast

import numpy as np
import torch
from captum.attr import (
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    Occlusion,
    Saliency,
)
from scipy.stats import spearmanr

from workbench.model.nets import network_of
from workbench.model.runtime import autocast

ExplainMethod = Literal["gradcam", "ig", "occlusion", "gradient"]

_METHODS = ("gradcam", "ig", "occlusion", "gradient")


# Grad-CAM needs a grid of at least this many cells per side to point anywhere useful, and
# cells no wider than this many input pixels to place a map on a small finding: DenseNet121's
# last block has 32 px cells, and a 32 px cell upsampled holds half its mass only within a
# 16 px radius. At 128 px its stride-16 block (denseblock3) localised nodules better and
# passed the sanity checks better than norm5 (BENCHMARKS.md, Saliency).
MIN_GRADCAM_GRID = 4
MAX_GRADCAM_CELL = 16

# gradcam_layer_for's answers, per model and input shape (weak: a freed model drops out)
_LAYER_CACHE: weakref.WeakKeyDictionary[
    torch.nn.Module, dict[tuple[int, ...], tuple[torch.nn.Module, tuple[int, ...]]]
] = weakref.WeakKeyDictionary()


def gradcam_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The last convolutional feature block: where :func:`gradcam_layer_for` starts looking
    for the layer Grad-CAM explains (it goes back to finer blocks for small findings).

    For MONAI DenseNets (DenseNet121 etc.) this is ``model.features.norm5``: the batch
    norm that closes ``denseblock4`` and feeds the classifier head
    (``relu -> global average pool -> linear``) directly, so Grad-CAM's channel weights
    are the head's own class weights, as in the original CAM.  In eval mode
    ``denseblock4``'s output differs from it by a per-channel affine map, which shifts the
    pre-ReLU Grad-CAM map by a spatial constant: the two agree wherever that map is
    positive, and on a toy "bright square" task norm5 concentrated more of the map on the
    square (about 0.94 vs 0.89 of the mass in the square's half).  Each network of the
    registry names this layer itself (``nets.Network.gradcam_layer``); other models must
    expose a ``.features`` module whose output is the final convolutional feature map;
    it is returned as is.
    """
    try:
        return network_of(model).gradcam_layer(model)
    except (ValueError, AttributeError):
        pass
    features = getattr(model, "features", None)
    if isinstance(features, torch.nn.Module):  # not from the registry: its last feature map
        return features
    raise ValueError(
        f"cannot choose a Grad-CAM layer for {type(model).__name__}: expected a network of "
        "the registry (nets.NETWORKS) or a model exposing a `.features` module (its last "
        "convolutional feature map); pass `layer=` explicitly"
    )


@contextmanager
def _preserve_grads(model: torch.nn.Module) -> Iterator[None]:
    """Restore every parameter's ``.grad`` (object and values) on exit."""
    saved = [
        (p, None if p.grad is None else p.grad.detach().clone(), p.grad) for p in model.parameters()
    ]
    try:
        yield
    finally:
        for p, values, grad in saved:
            if grad is None:
                p.grad = None
            else:
                grad.detach().copy_(cast(torch.Tensor, values))
                p.grad = grad


def _to_unit(attr: np.ndarray) -> np.ndarray:
    """Positive part, min-max scaled to [0, 1]; all-zero (or constant) maps become 0."""
    a = np.nan_to_num(attr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    a = np.maximum(a, 0.0)
    lo, hi = float(a.min()), float(a.max())
    if not hi > lo:
        return np.zeros(a.shape, dtype=np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)


def _output_shapes(
    model: torch.nn.Module, image: torch.Tensor, modules: Sequence[torch.nn.Module]
) -> list[tuple[torch.nn.Module, tuple[int, ...]]]:
    """(module, output spatial shape) for each of ``modules``, in the order they ran, from
    one forward pass of ``image``."""
    shapes: list[tuple[torch.nn.Module, tuple[int, ...]]] = []

    def hook(mod: torch.nn.Module, _inp: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            shapes.append((mod, tuple(out.shape[2:])))

    handles = [mod.register_forward_hook(hook) for mod in modules]
    try:
        with torch.no_grad():
            model(image)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _gradcam(
    model: torch.nn.Module, image: torch.Tensor, target: int, layer: torch.nn.Module
) -> torch.Tensor:
    """The upsampled, ReLU'd Grad-CAM map of ``layer``."""
    spatial = tuple(image.shape[2:])
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    inp = image.detach().clone().requires_grad_(True)
    raw = LayerGradCam(model, layer).attribute(inp, target=target)
    raw = cast(torch.Tensor, raw).detach()
    up = LayerAttribution.interpolate(raw.float(), spatial, interpolate_mode=mode)
    return torch.relu(up)[0, 0]


def _occlusion_window(side: int, spatial_dims: int = 2) -> tuple[int, int]:
    """Window ~side/8 in 2D (~side/4 in 3D) and stride ~window/2 (Captum truncates the last
    window at the border, so every pixel is covered whatever the remainder).

    The passes grow as (2 x side / window) ** dims: 15 ** 2 = 225 in 2D, but 15 ** 3 = 3,375
    in 3D (about 20 s for one 32^3 volume on two CPU cores, minutes at 96^3), so volumes get
    windows twice as wide: 7 ** 3 = 343 passes."""
    window = max(1, round(side / (8 if spatial_dims < 3 else 4)))
    return window, max(1, window // 2)


def saliency(
    model: torch.nn.Module,
    image: torch.Tensor,
    target: int,
    method: ExplainMethod = "gradcam",
    ig_steps: int = 32,
    internal_batch_size: int | None = None,
    *,
    layer: torch.nn.Module | None = None,
    occlusion_window: int | Sequence[int] | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """Saliency map of ``model``'s logit ``target`` for one image.

    ``image`` is (1, C, H, W) or (1, C, D, H, W).  Returns a float32 array of the image's
    spatial shape, finite, in [0, 1]: the positive part of the attribution, min-max scaled
    (an all-zero or spatially constant map is returned as all zeros).

    * ``gradcam``: Captum ``LayerGradCam`` on :func:`gradcam_layer_for` (or ``layer``),
      upsampled (bi/trilinear) to the image size, ReLU.  That is the deepest feature block
      with cells of at most MAX_GRADCAM_CELL pixels and at least MIN_GRADCAM_GRID cells per
      side: a coarser map cannot place itself on a small finding (DenseNet121's norm5 has
      32 px cells: 4 x 4 at 128 px, 1 voxel on 32^3 volumes).
    * ``ig``: Integrated Gradients from a black (zeros) baseline, ``ig_steps`` steps in
      batches of ``internal_batch_size`` (default 8); |attribution| summed over channels.
    * ``occlusion``: zero-valued windows ~1/8 of each side (``occlusion_window``
      overrides), stride half the window, ``internal_batch_size`` perturbations per
      forward pass (default 32 in 2D, 8 for volumes); the drop of the target logit, summed
      over channels.  Costs about 225 forward passes in 2D; volumes get windows ~1/4 of
      each side, 343 passes.  Batching 32 rather than 8 windows a pass gives the same map
      about 1.7x faster for DenseNet121 at 64 px on 2 CPU cores, little faster for the
      compact network at 128 px (BENCHMARKS.md, the suite on 2 AVX2 cores).
    * ``gradient``: Captum ``Saliency``, |d logit / d pixel| summed over channels.

    ``precision``: "bf16" runs the passes under autocast (about 2.5x faster on this CPU at
    224 px; the map is computed for display, the probabilities elsewhere stay fp32).
    """
    if method not in _METHODS:
        raise ValueError(f"unknown saliency method {method!r}; expected one of {_METHODS}")
    if not isinstance(image, torch.Tensor) or image.ndim not in (4, 5) or image.shape[0] != 1:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image)
        raise ValueError(f"image must be a (1, C, H, W) or (1, C, D, H, W) tensor, got {shape}")
    if not image.is_floating_point():
        raise ValueError(f"image must be a floating-point tensor, got {image.dtype}")
    spatial = tuple(int(s) for s in image.shape[2:])
    image = image.detach()

    with _preserve_grads(model), autocast(image.device, precision):
        if method == "gradient":
            with torch.enable_grad():
                grad = Saliency(model).attribute(image.clone(), target=target, abs=True)
            out = cast(torch.Tensor, grad).detach().float().sum(dim=1)[0].cpu().numpy()
        elif method == "gradcam":
            chosen = layer if layer is not None else gradcam_layer_for(model, image)[0]
            with torch.enable_grad():
                attr = _gradcam(model, image, target, chosen)
            out = attr.detach().float().cpu().numpy()
        elif method == "ig":
            with torch.enable_grad():
                ig_attr = IntegratedGradients(model).attribute(
                    image,
                    baselines=torch.zeros_like(image),
                    target=target,
                    n_steps=ig_steps,
                    internal_batch_size=internal_batch_size or 8,
                )
            out = cast(torch.Tensor, ig_attr).detach().abs().sum(dim=1)[0].float().cpu().numpy()
        else:
            if occlusion_window is None:
                pairs = (_occlusion_window(s, len(spatial)) for s in spatial)
                windows, strides = zip(*pairs, strict=True)
            else:
                ws = (
                    [int(occlusion_window)] * len(spatial)
                    if isinstance(occlusion_window, int)
                    else [int(w) for w in occlusion_window]
                )
                if len(ws) != len(spatial) or min(ws) < 1:
                    raise ValueError(f"occlusion_window must give {len(spatial)} sizes >= 1")
                windows = tuple(min(w, s) for w, s in zip(ws, spatial, strict=True))
                strides = tuple(max(1, w // 2) for w in windows)
            channels = int(image.shape[1])
            with torch.no_grad():
                occ = Occlusion(model).attribute(
                    image,
                    sliding_window_shapes=(channels, *windows),
                    strides=(channels, *strides),
                    baselines=0.0,
                    target=target,
                    perturbations_per_eval=max(
                        1, internal_batch_size or (32 if len(spatial) == 2 else 8)
                    ),
                )
            out = cast(torch.Tensor, occ).detach().sum(dim=1)[0].float().cpu().numpy()

    out = np.ascontiguousarray(out).reshape(spatial)
    return _to_unit(out)


def gradcam_layer_for(
    model: torch.nn.Module, image: torch.Tensor
) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The layer :func:`saliency`'s Grad-CAM explains for an input shaped like ``image``,
    and that layer's grid (cells per spatial side).

    Starting from :func:`gradcam_layer` and going back through ``model.features``: the
    deepest block whose grid has at least MIN_GRADCAM_GRID cells per side and whose cells
    span at most MAX_GRADCAM_CELL input pixels; failing that, the deepest with at least
    MIN_GRADCAM_GRID cells, then the deepest with more than one cell.  For a 2D
    DenseNet121 this is ``denseblock3`` (16 px cells: 6 x 6 at 96 px, 8 x 8 at 128 px,
    14 x 14 at 224 px) rather than ``norm5`` (32 px cells); on 32^3 volumes ``denseblock2``.

    The grid is the map's real resolution: a cell spans ``image side / grid`` pixels, and
    bilinear upsampling spreads each cell over about twice that width.  Answers are kept
    per model and input shape (the search costs one forward pass)."""
    key = tuple(int(v) for v in image.shape[1:])
    known = _LAYER_CACHE.setdefault(model, {})
    if key in known:
        return known[key]
    chosen = gradcam_layer(model)
    try:
        features: object = network_of(model).backbone(model)
    except (ValueError, AttributeError):
        features = getattr(model, "features", None)
    blocks = list(features.children()) if isinstance(features, torch.nn.Module) else []
    if not any(mod is chosen for mod in blocks):  # not a child of model.features: only itself
        blocks = [chosen]
    shapes = _output_shapes(model, image, blocks)
    idx = next(i for i, (mod, _) in enumerate(shapes) if mod is chosen)
    spatial = tuple(int(v) for v in image.shape[2:])
    candidates = list(reversed(shapes[: idx + 1]))  # the chosen layer first, then earlier

    def cell(shape: tuple[int, ...]) -> float:
        return max(s / g for s, g in zip(spatial, shape, strict=True))

    rules = (
        lambda sh: min(sh) >= MIN_GRADCAM_GRID and cell(sh) <= MAX_GRADCAM_CELL,
        lambda sh: min(sh) >= MIN_GRADCAM_GRID,
        lambda sh: int(np.prod(sh)) > 1,
    )
    for rule in rules:
        found = next(((mod, sh) for mod, sh in candidates if rule(sh)), None)
        if found is not None:
            known[key] = found
            return found
    known[key] = candidates[0]
    return candidates[0]


# --------------------------------------------------------------------------------------------
# Sanity checks and faithfulness
# --------------------------------------------------------------------------------------------


def map_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (0 when either is constant)."""
    a, b = np.ravel(a), np.ravel(b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    rho = spearmanr(a, b).statistic
    return float(rho) if np.isfinite(rho) else 0.0


def randomized_copy(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of ``model`` with every layer re-initialised (the end point of Adebayo et al.'s
    cascading randomisation), in the same train / eval mode."""
    import copy

    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in clone.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
    return clone


@torch.no_grad()
def _target_probability(
    model: torch.nn.Module, images: torch.Tensor, target: int, batch: int, precision: str
) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        with autocast(images.device, precision):
            logits = model(images[i : i + batch]).float()
        probs = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
        out.append(probs[:, min(target, probs.shape[1] - 1)].cpu().numpy())
    return np.concatenate(out)


def deletion_insertion(
    model: torch.nn.Module,
    image: torch.Tensor,
    heat: np.ndarray,
    target: int,
    steps: int = 16,
    batch: int = 16,
    precision: str = "fp32",
) -> tuple[float, float]:
    """(deletion AUC, insertion AUC) of a saliency map for one (1, C, ...) image.

    Deletion: the most salient pixels first are set to 0 in ``steps`` equal shares; the AUC of
    the target probability over the fraction removed (lower: the map found what mattered).
    Insertion: from a blurred copy (Gaussian, sigma a tenth of the image side: a black start
    rewards maps that scatter bright pixels), the most salient pixels first are restored
    (higher is better). Ties in the map are broken by position, the same for every method.
    """
    from scipy.ndimage import gaussian_filter

    flat = np.ravel(heat).astype(np.float64)
    order = np.argsort(-flat, kind="stable")
    n = flat.size
    masks = np.zeros((steps + 1, n), dtype=np.float32)  # 1 where the pixel is "shown"
    for s in range(steps + 1):
        masks[s, order[: round(n * s / steps)]] = 1.0
    m = torch.from_numpy(masks).to(image.device).view(steps + 1, 1, *image.shape[2:])
    sigma = [0, 0] + [max(image.shape[2:]) / 10] * (image.ndim - 2)
    blurred_np = gaussian_filter(image.detach().float().cpu().numpy(), sigma=sigma)
    blurred = torch.from_numpy(blurred_np).to(image.device, image.dtype)
    deleted = image * (1 - m)  # step s: the top s/steps removed
    inserted = blurred * (1 - m) + image * m  # step s: the top s/steps restored
    fractions = np.linspace(0, 1, steps + 1)
    p_del = _target_probability(model, deleted, target, batch, precision)
    p_ins = _target_probability(model, inserted, target, batch, precision)
    return float(np.trapezoid(p_del, fractions)), float(np.trapezoid(p_ins, fractions))


def _random_blobs(shape: tuple[int, ...], rng: np.random.Generator, cells: int = 8) -> np.ndarray:
    """A random map made of smooth blobs (uniform noise on a coarse grid, upsampled): the
    chance baseline for deletion / insertion. Per-pixel noise would delete scattered pixels,
    which hurts any model far more than removing a region, and flatters every method."""
    from scipy.ndimage import zoom

    coarse = rng.random(tuple(min(cells, s) for s in shape))
    return np.asarray(
        zoom(coarse, [s / c for s, c in zip(shape, coarse.shape, strict=True)], order=1)
    )


def sanity_checks(
    model: torch.nn.Module,
    images: Sequence[torch.Tensor],
    targets: Sequence[int],
    methods: Sequence[ExplainMethod] = ("gradcam", "ig", "occlusion", "gradient"),
    seed: int = 0,
    precision: str = "fp32",
    ig_steps: int = 16,
    label_randomized: torch.nn.Module | None = None,
) -> dict[str, dict[str, float]]:
    """Per method, averaged over the images (each (1, C, ...), in eval mode):

    * ``randomized_model_rank_corr``: Spearman correlation of the map from the trained model
      and from :func:`randomized_copy` (near 1: the map ignores the model; lower is better);
    * ``deletion_auc`` / ``insertion_auc`` and the same for a random map of equal size
      (``random_deletion_auc`` / ``random_insertion_auc``): a faithful map deletes lower and
      inserts higher than chance (:func:`_random_blobs`);
    * ``label_randomized_rank_corr`` when ``label_randomized`` is given: the same correlation
      with the maps of a model trained on shuffled labels (Adebayo et al.'s data randomisation
      test: a map that a model without real labels reproduces explains nothing learnt).
    """
    random_model = randomized_copy(model, seed).eval()
    rng = np.random.default_rng(seed)
    report: dict[str, dict[str, float]] = {}
    for method in methods:
        rows: list[dict[str, float]] = []
        for image, target in zip(images, targets, strict=True):
            kw = {"ig_steps": ig_steps, "precision": precision}
            heat = saliency(model, image, target, method, **kw)  # type: ignore[arg-type]
            rand_heat = saliency(random_model, image, target, method, **kw)  # type: ignore[arg-type]
            noise = _random_blobs(heat.shape, rng)
            d, i = deletion_insertion(model, image, heat, target, precision=precision)
            rd, ri = deletion_insertion(model, image, noise, target, precision=precision)
            row: dict[str, float] = {}
            if label_randomized is not None:
                shuffled = saliency(label_randomized, image, target, method, **kw)  # type: ignore[arg-type]
                row["label_randomized_rank_corr"] = map_similarity(heat, shuffled)
            rows.append(
                row
                | {
                    "randomized_model_rank_corr": map_similarity(heat, rand_heat),
                    "deletion_auc": d,
                    "insertion_auc": i,
                    "random_deletion_auc": rd,
                    "random_insertion_auc": ri,
                }
            )
        report[method] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} | {
            "n_images": float(len(rows))
        }
    return report
