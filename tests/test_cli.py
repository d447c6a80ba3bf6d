"""The command line: one clear line on error, non-zero exit; the stages chained by hand."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli
from workbench import cli
from workbench.cli import main
from workbench.cli import models as cli_models
from workbench.config import get_settings
from workbench.errors import UsageError, WorkbenchError
from workbench.train.config import LITERAL_FIELDS, NOT_ON_COMMAND_LINE, TrainConfig


def test_an_unknown_cohort_prints_one_line_and_exits_non_zero(tmp_path: Path) -> None:
    r = run_cli(["train", "--cohort", "nope", "--name", "m"], tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: no cohort named 'nope'; ingest with --cohort nope first"
    ]
    assert "Traceback" not in r.stderr


def test_an_augmentation_range_out_of_bounds_is_refused_in_one_line(tmp_path: Path) -> None:
    r = run_cli(["train", "--cohort", "nope", "--name", "m", "--rotate", "200"], tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: --rotate must be in [0, 180] degrees, not 200.0"
    ]


def test_a_missing_source_folder_is_a_clear_error(tmp_path: Path, capsys) -> None:
    os.environ.pop("WORKBENCH_DEBUG", None)
    code = main(["ingest", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("error: no such file or folder") and "\n" not in err


def _train_options() -> dict[str, argparse.Action]:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    return {a.dest: a for a in train._actions if a.dest != "help"}


def test_every_train_option_is_a_config_field_and_every_field_an_option() -> None:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    options = _train_options()
    assert set(options) <= fields, set(options) - fields
    assert fields - set(options) == NOT_ON_COMMAND_LINE
    for name, action in options.items():
        assert action.option_strings[0] == "--" + name.replace("_", "-")
        if name in LITERAL_FIELDS:
            assert tuple(action.choices or ()) == LITERAL_FIELDS[name], name


def test_train_without_options_gives_the_configs_defaults_and_the_environments_precision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORKBENCH_PRECISION", "fp32")
    monkeypatch.delenv("WORKBENCH_DEVICE", raising=False)
    settings = get_settings()
    a = cli.build_parser().parse_args(["train", "--cohort", "c", "--name", "n"])
    assert cli_models.train_config(a, settings) == TrainConfig("c", "n", precision="fp32")
    a = cli.build_parser().parse_args(
        ["train", "--cohort", "c", "--name", "n", "--precision", "bf16", "--lr", "3e-4"]
    )
    assert cli_models.train_config(a, settings) == TrainConfig("c", "n", precision="bf16", lr=3e-4)


def test_a_config_value_outside_its_choices_is_refused_by_name() -> None:
    with pytest.raises(UsageError, match="--balance must be one of weights, sampler, none"):
        TrainConfig("c", "n", balance="oversample")  # type: ignore[arg-type]


def _failing_command(monkeypatch: pytest.MonkeyPatch, err: Exception) -> None:
    def fail(_: argparse.Namespace) -> None:
        raise err

    monkeypatch.setitem(cli.COMMANDS, "models", fail)
    monkeypatch.delenv("WORKBENCH_DEBUG", raising=False)


def test_a_users_error_is_one_line_and_exit_status_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _failing_command(monkeypatch, WorkbenchError("the cohort has no labels\nsecond line"))
    assert main(["models"]) == 1
    assert capsys.readouterr().err == "error: the cohort has no labels\n"


def test_a_bug_shows_its_traceback_and_asks_for_a_report(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _failing_command(monkeypatch, KeyError("calibration"))
    assert main(["models"]) == cli.EXIT_BUG
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert "KeyError: 'calibration'" in err
    assert err.rstrip().endswith(f"error: {cli.BUG_LINE}")


def test_an_unreachable_database_is_the_users_error_not_a_bug(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    r = run_cli(
        ["quarantine"],
        tmp_path,
        WORKBENCH_DATABASE_URL=f"sqlite:///{tmp_path / 'a-file' / 'workbench.db'}",
    )
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_synth_then_ingest_from_the_command_line(tmp_path: Path) -> None:
    r = run_cli(["synth", str(tmp_path / "s"), "--studies", "6", "--seed", "2"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote 12 files: 6 studies" in r.stdout
    lab = str(tmp_path / "s" / "labels.csv")
    r = run_cli(["ingest", str(tmp_path / "s"), "--labels", lab, "--cohort", "x"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (
        r.stdout.strip()
        .splitlines()[-1]
        .startswith("ingested 12, already present 0, quarantined 0")
    )
    assert (tmp_path / "workbench.db").exists()


def test_commands_that_need_no_model_never_import_torch(tmp_path: Path) -> None:
    """The command groups import torch, MONAI and Captum only inside the handlers that use
    them (workbench/cli/__init__.py): listing users, checking the audit chain or asking for
    help must not pay seconds for them."""
    code = (
        "import sys\n"
        "from workbench.cli import build_parser, main\n"
        "build_parser().format_help()\n"
        "assert main(['users', 'list']) == 0\n"
        "assert main(['audit', 'verify']) == 0\n"
        "assert main(['quarantine']) == 0\n"
        "heavy = sorted(m for m in ('torch', 'monai', 'captum', 'sklearn') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WORKBENCH_")}
    environ["WORKBENCH_HOME"] = str(tmp_path)
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "heavy: []" in r.stdout


def test_every_command_has_one_handler_in_its_group() -> None:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(cli.COMMANDS)
    owners = [name for group in cli.GROUPS for name in group.COMMANDS]
    assert len(owners) == len(set(owners))  # no command registered by two groups
