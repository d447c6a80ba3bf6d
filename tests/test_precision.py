"""Precision `auto`: chosen from the hardware's units, confirmed by a timed probe of the real
training step, cached per machine, never slower than fp32; flags and environment honoured."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from workbench.model.runtime import (
    PROBE_FILE,
    Hardware,
    choose_precision,
    hardware_of,
    precision_candidates,
    resolve_precision,
    training_precision,
)

AVX2 = Hardware("cpu", "AMD EPYC", "AVX2", bf16_units=False, fp16_units=False)
SAPPHIRE = Hardware("cpu", "Xeon", "AVX512", bf16_units=True, fp16_units=False)
H100 = Hardware("cuda", "H100", "sm_90", bf16_units=True, fp16_units=True)
T4 = Hardware("cuda", "T4", "sm_75", bf16_units=False, fp16_units=True)
P100 = Hardware("cuda", "P100", "sm_60", bf16_units=False, fp16_units=False)


def test_the_decision_never_chooses_a_precision_slower_than_fp32() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        seconds = {"fp32": rng.uniform(0.05, 5.0)}
        for p in ("bf16", "fp16"):
            if rng.random() < 0.7:
                seconds[p] = seconds["fp32"] * rng.uniform(0.1, 10.0)
        chosen = choose_precision(seconds)
        assert seconds[chosen] <= seconds["fp32"]
        faster = {p: s for p, s in seconds.items() if s <= 0.9 * seconds["fp32"]}
        if faster:  # the fastest one that clearly beats fp32
            assert chosen == min(faster, key=faster.__getitem__)
        else:
            assert chosen == "fp32"


def test_the_issues_avx2_timings_choose_fp32() -> None:
    # 96 px, batch 16 on 2 AVX2 cores: bf16 autocast 6.3-7.5 s a step, fp32 0.62-0.79 s.
    assert choose_precision({"fp32": 0.70, "bf16": 6.9}) == "fp32"
    assert choose_precision({"fp32": 0.70, "bf16": 0.66}) == "fp32"  # within the noise margin
    assert choose_precision({"fp32": 0.70, "bf16": 0.25}) == "bf16"


def test_a_decision_without_an_fp32_time_is_refused() -> None:
    with pytest.raises(ValueError, match="fp32"):
        choose_precision({"bf16": 0.1})


def test_only_precisions_with_hardware_units_are_probed() -> None:
    assert precision_candidates(AVX2, 2) == ["fp32"]
    assert precision_candidates(SAPPHIRE, 2) == ["fp32", "bf16"]
    assert precision_candidates(SAPPHIRE, 3) == ["fp32"]  # CPU bf16 3D backward overflowed
    assert precision_candidates(H100, 3) == ["fp32", "bf16"]
    assert precision_candidates(T4, 2) == ["fp32", "fp16"]
    assert precision_candidates(P100, 2) == ["fp32"]


def test_this_machines_hardware_is_read_from_torch() -> None:
    hw = hardware_of(torch.device("cpu"))
    assert hw.capability == torch.backends.cpu.get_cpu_capability()
    caps = torch.cpu.get_capabilities()
    assert hw.bf16_units == bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    # Without units auto never trains in an emulated bf16.
    if not hw.bf16_units:
        assert resolve_precision("auto", torch.device("cpu"), 2, training=True) == "fp32"
    assert resolve_precision("auto", torch.device("cpu"), 2, training=False) == "fp32"


def test_a_real_probe_runs_once_and_is_cached_in_the_home(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    first = training_precision("auto", cpu, 2, 32, 4, tmp_path)
    hw = hardware_of(cpu)
    assert set(first.probe) == set(precision_candidates(hw, 2))
    assert all(s > 0 for s in first.probe.values())
    assert first.precision == choose_precision(first.probe)
    assert not first.cached and first.reason and hw.capability in first.hardware
    cache = json.loads((tmp_path / PROBE_FILE).read_text())
    assert len(cache) == 1 and torch.__version__ in next(iter(cache))
    again = training_precision("auto", cpu, 2, 32, 4, tmp_path)
    assert again.cached and again.probe == first.probe and again.precision == first.precision
    # Another input shape is another entry.
    training_precision("auto", cpu, 2, 40, 4, tmp_path)
    assert len(json.loads((tmp_path / PROBE_FILE).read_text())) == 2


def test_a_damaged_probe_cache_is_measured_again(tmp_path: Path) -> None:
    (tmp_path / PROBE_FILE).parent.mkdir(parents=True)
    (tmp_path / PROBE_FILE).write_text("{not json")
    choice = training_precision("auto", torch.device("cpu"), 2, 32, 4, tmp_path)
    assert not choice.cached and "fp32" in choice.probe


def test_an_explicit_precision_is_kept_without_a_probe(tmp_path: Path) -> None:
    choice = training_precision("fp32", torch.device("cpu"), 2, 32, 4, tmp_path)
    assert choice.precision == "fp32" and choice.probe == {} and choice.reason == "asked for"
    assert not (tmp_path / PROBE_FILE).exists()
    with pytest.raises(ValueError, match="CUDA"):
        training_precision("fp16", torch.device("cpu"), 2, 32, 4, tmp_path)


def test_workbench_precision_fp32_makes_workbench_train_train_in_fp32(tmp_path: Path) -> None:
    home = tmp_path / "home"
    src = tmp_path / "src"
    assert run_cli(["synth", str(src), "--studies", "24", "--seed", "3"], home).returncode == 0
    r = run_cli(["ingest", str(src), "--labels", str(src / "labels.csv"), "--cohort", "c"], home)
    assert r.returncode == 0, r.stderr
    args = ["train", "--cohort", "c", "--name", "m", "--epochs", "1", "--image-size", "32"]
    args += ["--batch-size", "4", "--sanity-images", "0", "--label-randomization-epochs", "0"]
    r = run_cli(args, home, WORKBENCH_PRECISION="fp32", WORKBENCH_DEVICE="cpu")
    assert r.returncode == 0, r.stderr
    meta = json.loads(next((home / "models" / "m").glob("v*/configs/metadata.json")).read_text())
    tr = meta["workbench"]["training"]
    assert tr["precision"] == "fp32" and tr["precision_choice"]["reason"] == "asked for"
    assert tr["device"] == "cpu"
    # A flag still wins over the environment.
    r = run_cli(args + ["--precision", "auto"], home, WORKBENCH_PRECISION="fp32")
    assert r.returncode == 0, r.stderr
    metas = sorted((home / "models" / "m").glob("v*/configs/metadata.json"))
    choice = json.loads(metas[-1].read_text())["workbench"]["training"]["precision_choice"]
    assert "fp32" in choice["probe"] and choice["reason"] != "asked for"
    listed = run_cli(["models"], home)
    assert "precision fp32 (asked for)" in listed.stdout
