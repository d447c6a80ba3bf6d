"""The model contract: a bundle's metadata is one typed, versioned record, validated when a
bundle is read or written; an older bundle is upgraded in memory and predicts exactly as it
did; a newer one is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import Pipeline, run_cli
from workbench.catalog.cohorts import cohort_items
from workbench.model.bundle import load_bundle
from workbench.model.bundle_info import BundleError, list_bundles, read_bundle_info
from workbench.model.contract import CONTRACT_VERSION, ContractError, ModelContract
from workbench.predict.inference import predict_study

# What the workbench section of a bundle held before the typed record (version 1): no
# contract_version, no normalization / site maps / thresholds keys, thresholds (when any)
# under operating_point, and a key this version does not know.
V1_DROPPED = ("contract_version", "normalization", "site_calibration", "thresholds")


def _copy_as(src: Path, models: Path, name: str, edit) -> Path:  # noqa: ANN001 - a callable
    dst = models / name / "v1"
    shutil.copytree(src, dst)
    meta_path = dst / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    edit(meta["workbench"])
    meta["name"] = name
    meta_path.write_text(json.dumps(meta, indent=2))
    return dst


def _as_version_1(wb: dict) -> None:
    for key in V1_DROPPED:
        wb.pop(key, None)
    wb["operating_point"] = {"rule": "argmax"}
    wb["retired_field"] = {"kept": True}


def test_a_version_1_bundle_loads_upgraded_and_predicts_the_same_probabilities(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    old = _copy_as(pipeline.bundle, models, "old-format", _as_version_1)
    raw = json.loads((old / "configs" / "metadata.json").read_text())["workbench"]
    assert "contract_version" not in raw  # the fixture really is the old layout

    info = read_bundle_info(models, "old-format")
    assert info.contract.contract_version == CONTRACT_VERSION  # upgraded in memory
    assert info.contract.normalization is None and info.contract.thresholds is None
    assert info.contract.extra["retired_field"] == {"kept": True}  # nothing is lost
    assert json.loads((old / "configs" / "metadata.json").read_text())["workbench"] == raw

    new_bundle = load_bundle(pipeline.settings.models_dir, pipeline.model)
    old_bundle = load_bundle(models, "old-format")
    items = cohort_items(pipeline.settings, pipeline.cohort, "test")[:4]
    for item in items:
        a = predict_study(pipeline.settings, new_bundle, item, explain="none", precision="fp32")
        b = predict_study(pipeline.settings, old_bundle, item, explain="none", precision="fp32")
        assert b.probabilities == a.probabilities
        assert b.raw_probabilities == a.raw_probabilities


def test_old_thresholds_under_operating_point_are_upgraded() -> None:
    wb = {
        "classes": ["effusion", "nodule"],
        "image_size": 64,
        "spatial_dims": 2,
        "calibration": {"method": "none"},
        "problem": "multilabel",
        "operating_point": {"thresholds": {"effusion": 0.4, "nodule": 0.7}},
    }
    c = ModelContract.from_dict(wb)
    assert c.thresholds == {"effusion": 0.4, "nodule": 0.7}
    assert c.threshold_list() == [0.4, 0.7]
    assert c.sigmoid


def test_a_bundle_from_a_newer_workbench_is_refused_in_one_line(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    models = tmp_path / "models"

    def newer(wb: dict) -> None:
        wb["contract_version"] = CONTRACT_VERSION + 1

    _copy_as(pipeline.bundle, models, "from-the-future", newer)
    with pytest.raises(BundleError, match="newer than this workbench"):
        read_bundle_info(models, "from-the-future")
    assert list_bundles(models) == []  # listings leave it out rather than fail
    r = run_cli(
        ["predict", "from-the-future", "--cohort", pipeline.cohort],
        pipeline.settings.home,
        WORKBENCH_MODELS=str(models),
    )
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "upgrade the workbench" in r.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"classes": []}, "classes must be a non-empty list"),
        ({"spatial_dims": 4}, "spatial_dims must be 2 or 3"),
        ({"problem": "regression"}, "problem must be one of"),
        ({"calibration": {}}, "calibration has no method"),
        ({"negative_class": "absent"}, "negative_class 'absent' is not a class"),
        ({"image_size": "large"}, "malformed"),
    ],
)
def test_a_malformed_contract_says_what_is_wrong(change: dict, message: str) -> None:
    wb = {
        "classes": ["normal", "nodule"],
        "image_size": 64,
        "spatial_dims": 2,
        "calibration": {"method": "temperature", "temperature": 1.2},
        "contract_version": CONTRACT_VERSION,
        **change,
    }
    with pytest.raises(ContractError, match=message):
        ModelContract.from_dict(wb)


def test_a_contract_survives_writing_and_reading(pipeline: Pipeline) -> None:
    info = read_bundle_info(pipeline.settings.models_dir, pipeline.model)
    again = ModelContract.from_dict(json.loads(json.dumps(info.contract.to_dict())))
    assert again == info.contract
    written = json.loads((info.path / "configs" / "metadata.json").read_text())["workbench"]
    assert written["contract_version"] == CONTRACT_VERSION


def test_a_multilabel_contract_names_its_no_finding_class_outside_the_labels() -> None:
    c = ModelContract.from_dict(
        {
            "classes": ["bar", "disc"],
            "image_size": 96,
            "spatial_dims": 2,
            "calibration": {"method": "per_label"},
            "problem": "multilabel",
            "negative_class": "no_finding",
        }
    )
    assert c.negative_class == "no_finding" and c.sigmoid


def test_a_trained_bundle_reports_its_run_through_typed_fields(pipeline: Pipeline) -> None:
    info = read_bundle_info(pipeline.settings.models_dir, pipeline.model)
    run = info.contract.run
    assert run.epochs_run == len(info.contract.training["history"]) >= 1
    assert run.seconds is not None and run.seconds > 0
    assert run.precision in ("fp32", "bf16", "fp16") and run.where
    assert info.contract.split_seed is not None
    assert sum((info.contract.split_studies or {}).values()) > 0
    assert info.contract.test_detail["n"] > 0


SECTIONS = ("training", "split", "trust", "metrics", "calibration_fit", "extra", "calibration")


def test_only_the_contract_module_reads_the_contracts_sections_by_key() -> None:
    """The nested sections of a contract are read through its typed properties (``run``,
    ``test_metrics``, ``split_seed``...) everywhere but in model/contract.py."""
    import re

    import workbench

    owner = Path(workbench.__file__).parent / "model" / "contract.py"
    key_read = re.compile(
        r"\b(?:wb|contract|c|info\.contract|bundle\.contract)\.(?:"
        + "|".join(SECTIONS)
        + r")\s*(?:\.get\(|\[)"
    )
    offenders = [
        f"{path.name}:{n}: {line.strip()}"
        for path in Path(workbench.__file__).parent.rglob("*.py")
        if path != owner
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if key_read.search(line)
    ]
    assert offenders == []
