"""The command line: one clear line on error, non-zero exit; the stages chained by hand."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import run_cli
from workbench.cli import main


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
