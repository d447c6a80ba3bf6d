from __future__ import annotations

from typing import cast

import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet, DenseNet121

from workbench.predict.explain import (
    deletion_insertion,
    gradcam_layer,
    gradcam_layer_for,
    map_similarity,
    randomized_copy,
    saliency,
    sanity_checks,
)
from workbench.predict.heatmap import overlay

METHODS = ("gradcam", "ig", "occlusion", "gradient")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def net2d() -> torch.nn.Module:
    torch.manual_seed(0)
    return DenseNet121(spatial_dims=2, in_channels=1, out_channels=3).eval()


@pytest.fixture(scope="module")
def net3d() -> torch.nn.Module:
    torch.manual_seed(0)
    return DenseNet121(spatial_dims=3, in_channels=1, out_channels=3).eval()


def _check_map(s: np.ndarray, shape: tuple[int, ...]) -> None:
    assert s.shape == shape
    assert s.dtype == np.float32
    assert np.all(np.isfinite(s))
    assert s.min() >= 0.0 and s.max() <= 1.0
    assert s.max() == pytest.approx(1.0)
    assert s.std() > 1e-3  # not constant


@pytest.mark.parametrize("method", METHODS)
def test_saliency_2d(net2d: torch.nn.Module, method: str) -> None:
    image = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    _check_map(saliency(net2d, image, target=1, method=method, ig_steps=8), (64, 64))  # type: ignore[arg-type]


@pytest.mark.parametrize("method", METHODS)
def test_saliency_3d(net3d: torch.nn.Module, method: str) -> None:
    image = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    kwargs: dict = {"ig_steps": 4, "internal_batch_size": 4}
    if method == "occlusion":
        kwargs = {"internal_batch_size": 32}  # the default 3D window: 8 voxels, 343 passes
    # For gradcam, DenseNet121's last block is 1x1x1 at 32^3: a finer, earlier block is used.
    s = saliency(net3d, image, target=2, method=method, **kwargs)  # type: ignore[arg-type]
    _check_map(s, (32, 32, 32))


class _CountingNet(torch.nn.Module):
    """Counts the images the wrapped network is run on."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += int(x.shape[0])
        return self.net(x)


@pytest.mark.parametrize(("shape", "passes"), [((64, 64), 15**2), ((32, 32, 32), 7**3)])
def test_default_occlusion_takes_225_passes_in_2d_and_343_in_3d(
    shape: tuple[int, ...], passes: int
) -> None:
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(shape)), 2)).eval()
    counting = _CountingNet(net)
    image = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(3))
    saliency(counting, image, target=1, method="occlusion", internal_batch_size=64)
    assert counting.images == passes + 1  # Captum also runs the unperturbed image once


def test_channels_last_matches_and_state_is_preserved() -> None:
    torch.manual_seed(0)
    model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=3)
    image = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    # simulate a caller mid-training: existing grads, some None
    model(torch.rand(2, 1, 64, 64)).sum().backward()
    model.eval()
    params = list(model.parameters())
    params[0].grad = None
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    weights = [p.detach().clone() for p in params]

    ref = {m: saliency(model, image, 0, m, ig_steps=8) for m in ("gradcam", "ig")}  # type: ignore[arg-type]
    for p, g, w in zip(params, grads, weights, strict=True):
        assert (p.grad is None) if g is None else torch.equal(cast(torch.Tensor, p.grad), g)
        assert torch.equal(p.detach(), w)
    assert not model.training

    cl = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    for m in ("gradcam", "ig"):
        s = saliency(cl, image.to(memory_format=torch.channels_last), 0, m, ig_steps=8)  # type: ignore[arg-type]
        np.testing.assert_allclose(s, ref[m], atol=1e-3)
    s = saliency(cl, image, 0, "occlusion", internal_batch_size=32)
    _check_map(s, (64, 64))

    # train mode is left alone too; works inside a caller's no_grad block
    model.train()
    with torch.no_grad():
        saliency(model, torch.rand(1, 1, 64, 64), 0, "gradcam")
    assert model.training


def test_occlusion_odd_size_is_fully_covered(net2d: torch.nn.Module) -> None:
    image = torch.rand(1, 1, 50, 70, generator=torch.Generator().manual_seed(3))
    _check_map(saliency(net2d, image, 0, "occlusion", internal_batch_size=64), (50, 70))


def test_an_occlusion_map_does_not_depend_on_how_many_windows_share_a_pass(
    net2d: torch.nn.Module,
) -> None:
    image = torch.rand(1, 1, 48, 40, generator=torch.Generator().manual_seed(5))
    one_by_one = saliency(net2d, image, 1, "occlusion", internal_batch_size=1)
    default = saliency(net2d, image, 1, "occlusion")  # 32 windows a pass in 2D
    np.testing.assert_allclose(default, one_by_one, atol=1e-4)
    assert default.max() == 1.0  # a real map, not an empty one that trivially matches


def test_the_gradcam_layer_for_an_input_is_the_one_saliency_uses_with_its_grid() -> None:
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2).eval()
    # norm5's cells are 32 px: the stride-16 block, denseblock3, has cells of 16 px
    for side, grid in ((96, 6), (128, 8), (224, 14)):
        x = torch.rand(1, 1, side, side)
        assert gradcam_layer_for(net, x) == (net.features.denseblock3, (grid, grid)), side
    x96 = torch.rand(1, 1, 96, 96)
    layer = net.features.denseblock3
    np.testing.assert_array_equal(saliency(net, x96, 1), saliency(net, x96, 1, layer=layer))
    assert not np.array_equal(
        saliency(net, x96, 1), saliency(net, x96, 1, layer=net.features.norm5)
    )
    # 32^3 volumes: denseblock3 is 2 x 2 x 2, too few cells; denseblock2 is 4 x 4 x 4
    net3 = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).eval()
    layer3, grid3 = gradcam_layer_for(net3, torch.rand(1, 1, 32, 32, 32))
    assert (layer3, grid3) == (net3.features.denseblock2, (4, 4, 4))


def test_gradcam_layer() -> None:
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    assert gradcam_layer(net) is net.features.norm5

    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU())
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x).mean(dim=(2, 3)))

    plain = Plain()
    assert gradcam_layer(plain) is plain.features
    with pytest.raises(ValueError, match="Grad-CAM layer"):
        gradcam_layer(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)))
    assert gradcam_layer_for(plain, torch.rand(1, 1, 16, 16)) == (plain.features, (14, 14))
    with pytest.raises(ValueError):
        saliency(net, torch.rand(1, 64, 64), 0)
    with pytest.raises(ValueError):
        saliency(net, torch.rand(1, 1, 64, 64), 0, "lime")  # type: ignore[arg-type]


def _square_batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images; class 1 has a bright 16x16 square in the top-left corner."""
    x = torch.rand(n, 1, 64, 64, generator=g) * 0.3
    y = torch.randint(0, 2, (n,), generator=g)
    x[y == 1, :, 2:18, 2:18] += 0.7
    return x, y


@pytest.fixture(scope="module")
def square_model() -> torch.nn.Module:
    """A small MONAI DenseNet (same layer names as DenseNet121; 8x8 final feature map) trained
    to tell images with a bright square in the top-left corner from those without."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = DenseNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=2,
        init_features=16,
        growth_rate=8,
        block_config=(2, 2),
        bn_size=2,
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(50):
        x, y = _square_batch(16, g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_gradcam_localises_the_evidence(square_model: torch.nn.Module) -> None:
    model = square_model
    x, y = _square_batch(32, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.9
    half, quadrant = [], []
    for img in x[y == 1]:
        s = saliency(model, img[None], target=1, method="gradcam").astype(np.float64)
        half.append(s[:, :32].sum() / s.sum())
        quadrant.append(s[:32, :32].sum() / s.sum())
    assert np.mean(half) > 0.75 and np.min(half) > 0.6
    assert np.mean(quadrant) > 0.6  # a quarter of the image holds most of the map


def test_randomised_weights_change_the_maps_and_maps_beat_chance_at_deletion(
    square_model: torch.nn.Module,
) -> None:
    x, y = _square_batch(32, torch.Generator().manual_seed(2))
    images = [img[None] for img in x[y == 1][:6]]
    report = sanity_checks(square_model, images, [1] * len(images), ("gradcam", "gradient"))
    for method, r in report.items():
        # Adebayo et al.: a map that survives re-initialising the weights explains nothing
        assert r["randomized_model_rank_corr"] < 0.5, (method, r)
        assert r["deletion_auc"] < r["random_deletion_auc"], (method, r)
        assert r["insertion_auc"] > r["random_insertion_auc"], (method, r)
        assert r["n_images"] == len(images)
    # the same model gives the same map: the check is not noise
    heat = saliency(square_model, images[0], 1, "gradcam")
    assert map_similarity(heat, saliency(square_model, images[0], 1, "gradcam")) == 1.0


def test_randomized_copy_leaves_the_model_alone(square_model: torch.nn.Module) -> None:
    before = {k: v.clone() for k, v in square_model.state_dict().items()}
    clone = randomized_copy(square_model, seed=3)
    after = square_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    changed = [
        k
        for k, v in clone.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, before[k])
    ]
    assert any("classifier" in k or "class_layers" in k for k in changed) and len(changed) > 10


def test_deletion_of_the_evidence_drops_the_probability(square_model: torch.nn.Module) -> None:
    x, y = _square_batch(16, torch.Generator().manual_seed(4))
    image = x[y == 1][:1]
    truth = np.zeros((64, 64))
    truth[2:18, 2:18] = 1.0  # where the generator drew the square
    good = deletion_insertion(square_model, image, truth, 1)
    bad = deletion_insertion(square_model, image, 1.0 - truth, 1)
    assert good[0] < bad[0] and good[1] > bad[1]


def test_bf16_maps_agree_with_fp32(square_model: torch.nn.Module) -> None:
    x, y = _square_batch(8, torch.Generator().manual_seed(5))
    image = x[y == 1][:1]
    a = saliency(square_model, image, 1, "gradcam")
    b = saliency(square_model, image, 1, "gradcam", precision="bf16")
    assert map_similarity(a, b) > 0.9


def test_overlay() -> None:
    grey = np.linspace(0, 1, 20 * 30).reshape(20, 30)
    heat = np.zeros((20, 30))
    heat[5:10, 5:10] = 1.0
    rgb = overlay(grey, heat)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    pure = overlay(grey, heat, alpha=0.0)
    expected = np.round(grey * 255).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(pure[..., c], expected)
    # hot region is red-ish with jet, cold region blue-ish
    assert rgb[7, 7, 0] > rgb[7, 7, 2]
    assert overlay(grey, heat, alpha=1.0)[0, 0, 2] > overlay(grey, heat, alpha=1.0)[0, 0, 0]
    with pytest.raises(ValueError):
        overlay(grey, heat[:10])
    with pytest.raises(ValueError):
        overlay(grey, heat, alpha=1.5)
