"""Cached model inputs are keyed by the pixels and by every deterministic transform parameter,
so a changed preset never reuses tensors made by the old one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose, Resized

import workbench.model.data as data
from workbench.model.data import InputSpec, eval_transforms, make_dataset


def _records(tmp_path: Path) -> list[dict[str, object]]:
    out = []
    for k in range(2):
        path = tmp_path / f"img{k}.npy"
        np.save(path, np.random.default_rng(k).random((40, 30), dtype=np.float32))
        out.append(
            {"image": str(path), "label": k, "study_id": k, "view": "PA", "pixel_hash": f"h{k}"}
        )
    return out


def test_the_transform_hash_follows_every_deterministic_parameter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = InputSpec(64).transform_hash()
    assert base == InputSpec(64).transform_hash()  # stable
    assert InputSpec(48).transform_hash() != base
    assert InputSpec(64, spatial_dims=3).transform_hash() != base

    def nearest(spec: InputSpec) -> Compose:  # the same preset but another resize mode
        ts = list(eval_transforms(spec).transforms)
        ts[2] = Resized("image", spatial_size=spec.image_size, size_mode="longest", mode="nearest")
        return Compose(ts)

    monkeypatch.setattr(data, "eval_transforms", nearest)
    assert InputSpec(64).transform_hash() != base


def test_persisted_inputs_are_not_reused_after_the_preset_changes(tmp_path: Path) -> None:
    records = _records(tmp_path)
    cache = tmp_path / "transformed"
    small = make_dataset(records, InputSpec(32), train=False, persist_dir=cache)
    assert tuple(small[0]["image"].shape) == (1, 32, 32)
    folder = cache / InputSpec(32).transform_hash()
    assert len(list(folder.glob("*.pt"))) == 1  # written on first use

    large = make_dataset(records, InputSpec(48), train=False, persist_dir=cache)
    assert tuple(large[0]["image"].shape) == (1, 48, 48)  # not the stale 32 px tensor
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [InputSpec(32).transform_hash(), InputSpec(48).transform_hash()]
    )
    again = make_dataset(records, InputSpec(32), train=False, persist_dir=cache)
    assert np.array_equal(np.asarray(again[0]["image"]), np.asarray(small[0]["image"]))
    assert len(list(folder.glob("*.pt"))) == 1  # read back, not written again


def _params(spatial_dims: int, seed: int, **flags: bool) -> torch.Tensor:
    """Drawn parameters with the chosen on/off flags forced (affine, contrast, brightness,
    noise: positions 0 and the last six, see draw_augmentation)."""
    p = data.draw_augmentation(np.random.default_rng(seed), spatial_dims)
    names = {"affine": 0, "contrast": len(p) - 6, "brightness": len(p) - 4, "noise": len(p) - 2}
    for name, on in flags.items():
        p[names[name]] = float(on)
    return torch.from_numpy(p)


def test_batch_augmentation_with_every_change_off_leaves_the_images_unchanged() -> None:
    x = torch.rand(3, 1, 24, 24)
    off = torch.stack(
        [
            _params(2, s, affine=False, contrast=False, brightness=False, noise=False)
            for s in range(3)
        ]
    )
    assert torch.allclose(data.augment_batch(x, off), x, atol=1e-6)
    vol = torch.rand(2, 1, 8, 8, 8)
    off3 = torch.stack(
        [
            _params(3, s, affine=False, contrast=False, brightness=False, noise=False)
            for s in range(2)
        ]
    )
    assert torch.allclose(data.augment_batch(vol, off3), vol, atol=1e-6)


def test_flip_mirrors_each_axis_at_its_rate_and_exactly() -> None:
    rng = np.random.default_rng(0)
    drawn = np.stack([data.draw_augmentation(rng, 2, flip=0.3) for _ in range(4000)])
    mirrored = drawn[:, 2:4] < 0  # the scales (after the flag and the angle) carry the sign
    assert np.allclose(mirrored.mean(axis=0), 0.3, atol=0.03)
    assert (drawn[mirrored.any(axis=1), 0] == 1.0).all()  # a flip turns the affine on
    # flip 0 draws what the augmentation drew before flips existed
    again = [data.draw_augmentation(np.random.default_rng(s), 2) for s in range(5)]
    same = [data.draw_augmentation(np.random.default_rng(s), 2, flip=0.0) for s in range(5)]
    assert all(np.array_equal(a, b) for a, b in zip(again, same, strict=True))
    # mirrored and nothing else: exactly the flipped pixels (width is the affine's first axis)
    p = _params(2, 1, affine=True, contrast=False, brightness=False, noise=False).numpy().copy()
    p[1], p[2:4], p[4:6] = 0.0, [-1.0, 1.0], 0.0  # no rotation, mirror x, no shift
    x = torch.rand(1, 1, 12, 10)
    out = data.augment_batch(x, torch.from_numpy(p)[None])
    assert torch.allclose(out, x.flip(-1), atol=1e-5)


def test_affine_ranges_widen_what_is_drawn_and_default_to_the_standard_draw() -> None:
    import math

    standard = data.AffineRanges.of(None, None, None)
    assert standard == data.STANDARD_AFFINE
    again = [data.draw_augmentation(np.random.default_rng(s), 2) for s in range(5)]
    same = [data.draw_augmentation(np.random.default_rng(s), 2, affine=standard) for s in range(5)]
    assert all(np.array_equal(a, b) for a, b in zip(again, same, strict=True))
    wide = data.AffineRanges.of(45.0, 0.2, 0.15)
    for d, n_angles in ((2, 1), (3, 3)):
        rng = np.random.default_rng(1)
        drawn = np.stack([data.draw_augmentation(rng, d, affine=wide) for _ in range(2000)])
        angles = drawn[:, 1 : 1 + n_angles]
        scales = drawn[:, 1 + n_angles : 1 + n_angles + d]
        shifts = drawn[:, 1 + n_angles + d : 1 + n_angles + 2 * d]
        assert np.abs(angles).max() <= math.pi / 4 and np.abs(angles).max() > 0.7
        assert np.abs(scales - 1).max() <= 0.2 and np.abs(scales - 1).max() > 0.19
        assert np.abs(shifts).max() <= 0.15 and np.abs(shifts).max() > 0.14
    for bad in ((200.0, None, None), (None, 1.0, None), (None, None, 0.6), (-1.0, None, None)):
        with pytest.raises(ValueError, match="must be in"):
            data.AffineRanges.of(*bad)


def test_a_samples_augmentation_depends_on_its_parameters_not_on_its_batch() -> None:
    # Resumed runs and runs split over ranks put an image in other batches: its augmented
    # pixels must not change (noise included).
    x = torch.rand(4, 1, 32, 32)
    params = torch.stack(
        [_params(2, s, affine=True, contrast=True, brightness=True, noise=True) for s in range(4)]
    )
    whole = data.augment_batch(x, params)
    assert not torch.allclose(whole, x, atol=1e-3)  # it does change the images
    alone = data.augment_batch(x[2:3], params[2:3])
    assert torch.equal(whole[2:3], alone)
    pair = data.augment_batch(x[[3, 0]], params[[3, 0]])
    assert torch.equal(pair, whole[[3, 0]])


def test_training_samples_carry_parameters_drawn_from_seed_epoch_and_index(
    tmp_path: Path,
) -> None:
    records = _records(tmp_path)
    ds = make_dataset(records, InputSpec(32), train=True, seed=5)
    first = ds[1]["aug"]
    assert torch.equal(make_dataset(records, InputSpec(32), train=True, seed=5)[1]["aug"], first)
    assert not torch.equal(ds[0]["aug"], first)  # another index
    ds.epoch = 1
    assert not torch.equal(ds[1]["aug"], first)  # another epoch
    assert not isinstance(ds[1]["image"], data.MetaTensor)  # plain tensors collate cheaply
