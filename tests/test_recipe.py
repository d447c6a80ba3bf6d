"""The default recipe: a step budget with warm-up, a schedule that fits it, early stopping on
held-out training patients (never the calibration split), temperature as the calibration
floor, and a plain warning when the shipped calibration is weak."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import Pipeline
from workbench.catalog.cohorts import cohort_items, holdout_patients
from workbench.posthoc.calibration import TEMPERATURE_FLOOR, Calibrator, softmax
from workbench.train.config import TrainConfig
from workbench.train.recipe import (
    DEFAULT_CAP_EPOCHS,
    DEFAULT_MAX_STEPS,
    PATIENCE_STEPS,
    Budget,
    stop_reason,
)


def _budget(**kw: object) -> Budget:
    return Budget.plan(TrainConfig(cohort="c", name="n", **kw), steps_per_epoch=10)  # type: ignore[arg-type]


def test_the_default_budget_is_capped_in_steps_not_epochs() -> None:
    b = _budget()
    assert b.horizon == DEFAULT_MAX_STEPS and b.warmup == 100 and b.patience == PATIENCE_STEPS
    assert _budget(max_steps=300).horizon == 300
    assert _budget(epochs=4).horizon == 40  # a fixed number of epochs spreads the schedule
    assert _budget(epochs=4, max_steps=25).horizon == 25
    assert Budget.plan(TrainConfig(cohort="c", name="n"), steps_per_epoch=200).patience == 600


def test_a_large_cohorts_default_cap_leaves_its_patience_room_to_stop_training() -> None:
    # 750 steps an epoch (12,000 training images at batch 16): a fixed cap of 2,000 steps
    # was under 3 epochs, less than the 3-epoch patience, so early stopping never fired.
    big = Budget.plan(TrainConfig(cohort="c", name="n"), steps_per_epoch=750)
    assert big.patience == 3 * 750 and big.horizon == DEFAULT_CAP_EPOCHS * 750
    for step in range(0, 750 * 4, 750):  # the best score at the end of epoch 4 ...
        big.observe(step, None, 1.0 - step / 10_000)
    stop = next(s for s in range(big.horizon + 1) if big.should_stop(s))
    assert stop < big.horizon  # ... and patience, not the cap, ends the run
    assert "no better validation score" in stop_reason(big, stop, TrainConfig("c", "n"))
    # A small cohort keeps the 2,000-step cap; the cap follows --max-steps and --epochs.
    assert Budget.plan(TrainConfig("c", "n"), steps_per_epoch=200).horizon == DEFAULT_MAX_STEPS
    assert Budget.plan(TrainConfig("c", "n", max_steps=900), steps_per_epoch=750).horizon == 900
    assert Budget.plan(TrainConfig("c", "n", epochs=2), steps_per_epoch=750).horizon == 1500


def test_the_learning_rate_warms_up_then_follows_a_cosine_to_the_horizon() -> None:
    b = Budget(horizon=1000, warmup=50, patience=100)
    f = [b.factor(s) for s in range(1001)]
    assert f[0] == pytest.approx(1 / 50) and f[49] == pytest.approx(1.0, abs=0.01)
    assert all(x <= y + 1e-12 for x, y in zip(f[:49], f[1:50], strict=True))  # rising
    assert all(x >= y - 1e-12 for x, y in zip(f[50:-1], f[51:], strict=True))  # then falling
    assert f[500] == pytest.approx(0.05 + 0.95 * 0.5, rel=1e-3)
    assert f[1000] == pytest.approx(0.05)


def test_a_plateau_lowers_the_rate_and_a_long_one_stops_training() -> None:
    b = Budget(horizon=10_000, warmup=0, patience=100)
    assert b.observe(10, 0.70, 0.60)
    assert not b.observe(40, 0.69, 0.65) and b.reductions == 0
    assert not b.observe(60, 0.69, 0.65) and b.reductions == 1 and b.reduced_at == 60
    assert b.factor(61) == pytest.approx(0.3 * Budget(10_000, 0, 100).factor(61))
    assert not b.should_stop(109)
    assert not b.observe(110, 0.69, 0.66) and b.reductions == 2
    assert not b.should_stop(150)  # the second reduction gets half the patience to help
    assert b.should_stop(160)
    # The criterion is the validation loss, whatever the AUROC does.
    assert not b.observe(165, 0.95, 0.61)
    assert b.observe(170, 0.60, 0.50) and b.best_step == 170 and b.best_auroc == 0.60
    assert not b.should_stop(200) and b.should_stop(10_000)


def test_a_rising_validation_loss_during_warm_up_is_not_a_plateau() -> None:
    # The benchmark's history: untrained 0.69 at step 12, worse while the rate warms up.
    b = Budget(horizon=2000, warmup=100, patience=150)
    assert b.observe(12, 0.52, 0.69)
    for step, loss in ((48, 0.93), (72, 1.56), (96, 1.17), (144, 0.87)):
        assert not b.observe(step, 0.6, loss)
    assert b.reductions == 0 and not b.should_stop(240)
    assert not b.observe(175, 0.6, 0.80) and b.reductions == 1  # 75 steps after the warm-up
    assert not b.should_stop(249) and b.should_stop(250)


def test_the_horizon_shrinks_to_what_the_time_budget_allows() -> None:
    b = Budget(horizon=2000, warmup=10, patience=100)
    b.fit_time(step=100, elapsed=50.0, budget=None)
    assert b.horizon == 2000
    b.fit_time(step=100, elapsed=50.0, budget=200.0)  # 0.5 s a step: 300 more steps
    assert b.horizon == 400
    b.fit_time(step=390, elapsed=210.0, budget=200.0)
    assert b.horizon == 390 and b.should_stop(390)


def test_a_slow_first_step_does_not_cut_the_run_and_the_warm_up_follows_the_horizon() -> None:
    b = _budget(time_budget=240.0)  # the demo's budget: cap 2,000, automatic warm-up of 100
    assert (b.horizon, b.warmup) == (2000, 100)
    b.fit_time(step=1, elapsed=20.0, budget=240.0)  # a cold first step: 20 s
    assert b.horizon == 12 and b.warmup == 100  # one step is too few to plan the warm-up on
    b.fit_time(step=5, elapsed=24.0, budget=240.0)  # then 1 s a step
    assert b.horizon == 5 + int(216 / 4.8) and b.warmup == max(6, b.horizon // 20)
    b.fit_time(step=50, elapsed=69.0, budget=240.0)
    assert b.horizon == 50 + int(171 / 1.38)
    fixed = _budget(time_budget=240.0, warmup_steps=40)
    fixed.fit_time(step=5, elapsed=5.0, budget=240.0)
    assert fixed.warmup == 40  # an explicit warm-up is kept


def test_holdout_patients_takes_a_share_of_every_label_and_is_seeded(
    pipeline: Pipeline,
) -> None:
    items = cohort_items(pipeline.settings, pipeline.cohort, "train")
    held = holdout_patients(items, 0.25, seed=0)
    assert held == holdout_patients(items, 0.25, seed=0)
    labels = {i.label for i in items}
    assert {i.label for i in items if i.patient in held} == labels
    assert 0 < len(held) < len({i.patient for i in items})


def test_early_stopping_and_calibration_use_disjoint_patients_from_the_bundle_record(
    pipeline: Pipeline,
) -> None:
    meta = json.loads((pipeline.bundle / "configs" / "metadata.json").read_text())["workbench"]
    keys = {s: set(v) for s, v in meta["split"]["study_keys"].items()}
    assert set(keys) == {"train", "validation", "calibration", "test"}
    assert all(keys[s] for s in keys)
    for a in keys:
        for b in keys:
            assert a == b or not keys[a] & keys[b], (a, b)
    assert {s: len(v) for s, v in keys.items()} == meta["split"]["studies"]
    # ... and by patient: no patient of the validation split is in the calibration split.
    items = {i.study_key: i.patient for i in cohort_items(pipeline.settings, pipeline.cohort)}
    val_patients = {items[k] for k in keys["validation"]}
    cal_patients = {items[k] for k in keys["calibration"]}
    assert not val_patients & cal_patients
    tr = meta["training"]
    assert tr["validation_fraction"] == 0.15 and len(tr["history"]) == 2
    assert tr["history"][-1]["step"] == tr["steps"] and tr["stopped"]
    assert meta["calibration_fit"]["check"]["target"] == 0.05


def test_temperature_is_the_floor_on_a_large_calibration_split() -> None:
    rng = np.random.default_rng(3)
    n, k = TEMPERATURE_FLOOR + 50, 3
    z = rng.normal(size=(n, k)) * 2
    y = np.array([rng.choice(k, p=p) for p in softmax(z)])  # calibrated already
    res = Calibrator(["a", "b", "c"]).fit(z, y)
    assert res.map_.method != "none"
    assert any("floor" in note for note in res.notes_)
    small = Calibrator(["a", "b", "c"]).fit(z[:60], y[:60])
    assert not any("floor" in note for note in small.notes_)


def test_the_weight_average_starts_at_the_weights_and_ramps_its_decay() -> None:
    import torch

    from workbench.train.recipe import weight_average

    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = weight_average(net, 0.995)
    assert ema is not None
    weight = net[0].weight
    with torch.no_grad():
        weight.fill_(1.0)
    ema.update_parameters(net)  # the first update copies
    assert torch.equal(ema.module[0].weight, weight)
    with torch.no_grad():
        weight.fill_(3.0)
    ema.update_parameters(net)  # n = 1: decay (1 + 1) / (10 + 1)
    d = 2 / 11
    assert torch.allclose(ema.module[0].weight, torch.full_like(weight, d * 1 + (1 - d) * 3))
    net[1].num_batches_tracked.fill_(7)
    ema.update_parameters(net)  # integer buffers are copied, not averaged
    assert int(ema.module[1].num_batches_tracked) == 7


def test_the_weight_average_is_steadier_than_the_noisy_weights_it_follows() -> None:
    import torch

    from workbench.train.recipe import weight_average

    torch.manual_seed(0)
    net = torch.nn.Linear(50, 1, bias=False)
    ema = weight_average(net, 0.99)
    assert ema is not None
    for _ in range(400):  # SGD noise around a fixed optimum of zero
        with torch.no_grad():
            net.weight.copy_(torch.randn_like(net.weight))
        ema.update_parameters(net)
    raw = float(net.weight.norm())
    averaged = float(ema.module.weight.norm())
    assert averaged < raw / 4, (averaged, raw)  # ~ raw x sqrt((1 - d) / (1 + d)) = 0.07 raw


def test_a_zero_decay_keeps_the_raw_weights_and_a_bad_one_is_refused() -> None:
    import torch

    from workbench.train.recipe import TrainingError, weight_average

    assert weight_average(torch.nn.Linear(2, 2), 0.0) is None
    with pytest.raises(TrainingError, match="--ema-decay"):
        weight_average(torch.nn.Linear(2, 2), 1.0)
