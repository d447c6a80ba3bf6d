"""A study's shape comes from its data: one-slice CT and MR studies are 2D images, a mixed
cohort is refused with counts (or trained on the chosen shape), and an error inside a
transform or the network names the study."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_settings, run_cli
from workbench.catalog.cohorts import MIN_VOLUME_SLICES, cohort_items
from workbench.catalog.ingest import ingest
from workbench.dicom.plant import planted_cohort
from workbench.dicom.synth import synthesize_cohort
from workbench.model.data import (
    InputSpec,
    StudyInputError,
    eval_transforms,
    make_dataset,
    to_records,
)
from workbench.train.config import TrainConfig
from workbench.train.recipe import TrainingError
from workbench.train.training import select_shape, train

SMALL = {"image_size": 32, "batch_size": 4, "sanity_images": 0, "label_randomization_epochs": 0}


@pytest.fixture(scope="module")
def one_slice(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """24 one-slice studies of real anatomy (pydicom's CT_small and MR_small), half with a
    planted lesion, ingested into cohort "slices"."""
    root = tmp_path_factory.mktemp("shapes")
    src = root / "src"
    planted_cohort(src, 24, seed=1, task="binary")
    settings = make_settings(root / "home")
    ingest(settings, src, src / "labels.csv", "slices", progress=False)
    return root, src


def test_one_slice_ct_and_mr_studies_are_2d_images(one_slice: tuple[Path, Path]) -> None:
    settings = make_settings(one_slice[0] / "home")
    items = cohort_items(settings, "slices")
    assert {i.modality for i in items} == {"CT", "MR"}
    assert all(i.depths == (1,) and i.spatial_dims == 2 for i in items)


def test_a_cohort_of_one_slice_ct_and_mr_studies_trains_on_the_2d_path(
    one_slice: tuple[Path, Path],
) -> None:
    settings = make_settings(one_slice[0] / "home")
    cfg = TrainConfig(cohort="slices", name="slices", epochs=1, device="cpu", **SMALL)
    result = train(settings, cfg, progress=False)
    wb = json.loads((result.bundle / "configs" / "metadata.json").read_text())["workbench"]
    assert wb["spatial_dims"] == 2 and wb["modality"] in ("CT", "MR")
    shape = wb["training"]["shape"]
    assert shape["spatial_dims"] == 2 and shape["requested"] == "auto" and not shape["left_out"]
    r = run_cli(
        ["predict", "slices", "--cohort", "slices", "--split", "test", "--max", "2"],
        one_slice[0] / "home",
    )
    assert r.returncode == 0, r.stderr
    assert "not scored" not in r.stdout


def test_a_mixed_cohort_is_refused_in_one_line_with_counts_or_trains_on_the_chosen_shape(
    one_slice: tuple[Path, Path], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    settings = make_settings(home)
    ct = tmp_path / "ct"
    synthesize_cohort(ct, n_studies=4, seed=2, modality="CT", image_size=32)
    ingest(settings, one_slice[1], one_slice[1] / "labels.csv", "mixed", progress=False)
    ingest(settings, ct, ct / "labels.csv", "mixed", progress=False)
    args = ["train", "--cohort", "mixed", "--name", "m", "--epochs", "1", "--image-size", "32"]
    args += ["--batch-size", "4", "--sanity-images", "0", "--label-randomization-epochs", "0"]
    r = run_cli(args, home, WORKBENCH_PRECISION="fp32")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "24 2D studies" in lines[0] and "4 3D volumes" in lines[0]
    assert "--spatial-dims" in lines[0]
    items = cohort_items(settings, "mixed")
    kept, dims, record = select_shape(items, "2", "mixed")
    assert dims == 2 and len(kept) == 24 and record["left_out"] == {"3D volumes": 4}
    r = run_cli([*args, "--spatial-dims", "2"], home, WORKBENCH_PRECISION="fp32")
    assert r.returncode == 0, r.stderr
    assert "left out: 4 3D volumes" in r.stdout
    meta = json.loads(next((home / "models" / "m").glob("v*/configs/metadata.json")).read_text())
    assert meta["workbench"]["training"]["shape"]["left_out"] == {"3D volumes": 4}
    with pytest.raises(TrainingError, match="no 3D study"):
        select_shape([i for i in items if i.spatial_dims == 2], "3", "mixed")


def test_a_short_stack_gives_its_middle_slice_to_a_2d_model(tmp_path: Path) -> None:
    stack = np.stack([np.full((6, 6), k, np.float16) for k in range(3)])
    np.save(tmp_path / "stack.npy", stack)
    x = eval_transforms(InputSpec(6, 2))({"image": str(tmp_path / "stack.npy")})["image"]
    assert x.shape == (1, 6, 6) and float(x.mean()) == pytest.approx(1.0)
    np.save(tmp_path / "vol.npy", np.zeros((MIN_VOLUME_SLICES, 6, 6), np.float16))
    with pytest.raises(StudyInputError, match="a volume of 8 slices for a 2D model"):
        eval_transforms(InputSpec(6, 2))({"image": str(tmp_path / "vol.npy"), "study_key": "K"})


def test_an_error_inside_a_transform_names_the_study_and_the_cause(
    one_slice: tuple[Path, Path], tmp_path: Path
) -> None:
    settings = make_settings(one_slice[0] / "home")
    items = cohort_items(settings, "slices")[:3]
    records = to_records(items, ["lesion", "no_lesion"])
    bad = dict(records[1], image=str(tmp_path / "missing.npy"))
    with pytest.raises(StudyInputError) as err:
        make_dataset([records[0], bad], InputSpec(32, 2), train=False)
    message = str(err.value)
    assert message.startswith(f"study {items[1].study_key}: FileNotFoundError")
    assert "\n" not in message and "object at 0x" not in message


def test_the_cli_prints_a_broken_cached_image_as_one_line_naming_the_study(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    settings = make_settings(home)
    src = tmp_path / "src"
    planted_cohort(src, 12, seed=3)
    ingest(settings, src, src / "labels.csv", "c", progress=False)
    victim = cohort_items(settings, "c")[5]
    victim.images[0].write_bytes(b"not an array")  # the cache damaged behind our back
    args = ["train", "--cohort", "c", "--name", "m", "--epochs", "1", "--image-size", "32"]
    args += ["--batch-size", "4", "--sanity-images", "0", "--label-randomization-epochs", "0"]
    r = run_cli(args, home, WORKBENCH_PRECISION="fp32")
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert errors[0].startswith(f"error: study {victim.study_key}: ValueError")
    debug = run_cli(args, home, WORKBENCH_PRECISION="fp32", WORKBENCH_DEBUG="1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert os.environ.get("WORKBENCH_DEBUG") is None
