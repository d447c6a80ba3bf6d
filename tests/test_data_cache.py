"""Cached model inputs are keyed by the pixels and by every deterministic transform parameter,
so a changed preset never reuses tensors made by the old one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from monai.transforms import Compose, Resized

import workbench.data as data
from workbench.data import InputSpec, eval_transforms, make_dataset


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
