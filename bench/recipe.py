"""Recipe benchmark (issue 14): does the default training recipe beat a naive loop and a
classical baseline on images that are not only our own synthetic chest cohort?

Tasks (each written as DICOM and ingested through ``workbench.catalog.ingest.ingest``):
  * ``large``: real anatomy (pydicom's bundled CT and MR slices, see ``--sources``), binary,
    a large plainly visible planted disc (radius 8-12% of the side, contrast 40-60%);
  * ``small``: the same anatomy, binary, a small low-contrast disc (3-5%, 20-35%);
  * ``multiclass``: the same anatomy, ``no_finding`` / ``disc`` / ``bar`` (softmax);
  * ``multilabel``: the same anatomy, any subset of ``disc`` and ``bar`` (sigmoids);
  * ``synth``: the synthetic DX chest cohort (``workbench.dicom.synth``).

Methods, in the same run on the same patient-level split (the one the recipe stores):
  * ``recipe``: ``workbench.train.training.train`` with the default ``TrainConfig`` (only cohort,
    name, image size, device and precision set): metrics are read from the bundle it writes;
    it holds some train patients out for early stopping and fits its calibration, thresholds
    and operating points on the calibration split, as it always does;
  * ``naive``: the MONAI-tutorial loop: DenseNet121 from ``workbench.model.nets``, Adam lr 1e-4,
    fixed epochs, no cache, no augmentation, no early stopping, no calibration, trained on the
    whole train split, evaluated on the test split (argmax, or 0.5 per label);
  * ``logreg``: scikit-learn logistic regression on the eval-preset images average-pooled to
    32 x 32 pixels (standardised), fitted on the train split (argmax, or 0.5 per label).
  Neither baseline uses the calibration split.

Every method is scored at study level (logits, or for ``logreg`` probabilities, averaged over
a study's images) with the workbench's own metric functions: test AUROC (macro) with a 95%
bootstrap CI, accuracy, sensitivity and specificity at the method's operating point (mean over
the finding classes, i.e. every class but the negative one; for the recipe, the bundle's
operating points: per class the threshold that reaches the target sensitivity on the
calibration split for softmax models, Youden's J per label for sigmoid ones), ECE before and
after calibration (top-label, 15 bins) with bias-corrected 95% bootstrap CIs
(``workbench.metrics.calibration_report``; for sigmoid problems the mean over labels of
each label's binary ECE, as the recipe records it, with per-label CIs in the JSON), optimiser
steps, the fit's seconds and the whole method's wall time. The recipe's test probabilities are
recomputed from its bundle as a check that the baselines are scored the way the bundle was
(``check`` in the JSON).

Usage::

    python bench/recipe.py --quick                  # smoke run, a few minutes on 2 cores
    python bench/recipe.py [--tasks large,small] [--studies 400] [--image-size 96]
                           [--naive-epochs 10] [--small] [--workdir DIR] [--out FILE]

``--small`` adds ``recipe-small``: the same default recipe with ``--architecture
densenet-small`` (the compact network the demo trains), on the same split.

``--quick``: 40 studies per task at 64 px, one recipe epoch without the saliency sanity
checks (minutes of fixed cost per run on 2 cores), two naive epochs: it checks the script,
its numbers mean nothing.

Prints one markdown table (with machine and date) and writes it with everything else as JSON
to ``--out`` (default ``bench/results/recipe-<date>.json``). Works in a temporary folder
unless ``--workdir`` is given; never touches the repository's ``studies/`` or ``models/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.utils import set_determinism
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from workbench.catalog.cohorts import CohortItem, cohort_items
from workbench.catalog.ingest import ingest
from workbench.config import Settings
from workbench.dicom.plant import PACKAGE_SOURCES, package_source, planted_cohort
from workbench.dicom.synth import synthesize_cohort
from workbench.errors import NotFoundError
from workbench.metrics import calibration_report, classification_metrics, label_metrics
from workbench.model.bundle import code_version, load_bundle
from workbench.model.data import InputSpec, eval_transforms, to_records
from workbench.model.nets import create_network
from workbench.model.problems import Problem, resolve_problem
from workbench.model.runtime import forward_dataset, hardware_of, mean_by_study
from workbench.posthoc.calibration import sigmoid, softmax
from workbench.train.config import Architecture, TrainConfig
from workbench.train.training import train

ROOT = Path(__file__).resolve().parents[1]
#: pydicom test files of real anatomy beyond :data:`PACKAGE_SOURCES` that fit a planted cohort
#: (single-frame grayscale, roughly square): two axial head CTs (512 px, JPEG 2000) and an
#: axial abdominal MR (300 x 484). Left out: the other MR_small files (the same pixels in
#: other encodings), the NM whole-body scans (1024 x 256: a finding sized by the short side is
#: 2 px at 96 px), the 16 px DICOMDIR thumbnails, colour / palette ultrasound, the fractal
#: secondary capture (``image_dfl.dcm``, not anatomy), dose grids and segmentations.
EXTRA_SOURCES = ("693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm", "examples_overlay.dcm")
DEFAULT_SOURCES = (*PACKAGE_SOURCES, *EXTRA_SOURCES)
METHODS = ("recipe", "recipe-small", "naive", "logreg")
N_RESAMPLES = 200  # bootstrap resamples, as the recipe uses for its test metrics
NAIVE_LR, NAIVE_BATCH = 1e-4, 16
LOGREG_PIXELS = 32


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "planted" | "synth"
    task: str = "binary"  # planted_cohort's task
    radius: tuple[float, float] = (0.06, 0.1)
    contrast: tuple[float, float] = (0.35, 0.6)
    about: str = ""


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("large", "planted", "binary", (0.08, 0.12), (0.4, 0.6), "binary, large disc"),
        TaskSpec("small", "planted", "binary", (0.03, 0.05), (0.2, 0.35), "binary, small disc"),
        TaskSpec("multiclass", "planted", "multiclass", about="none / disc / bar"),
        TaskSpec("multilabel", "planted", "multilabel", about="subsets of disc, bar"),
        TaskSpec("synth", "synth", about="synthetic DX chest cohort"),
    )
}


@dataclass
class Scores:
    """One method's test results at study level (the table's row, and more for the JSON)."""

    auroc: float | None
    auroc_ci: Sequence[float | None]
    accuracy: float | None
    sensitivity: float | None
    specificity: float | None
    operating_point: str
    ece_before: dict[str, Any] | None  # {"value", "ci_low", "ci_high"}; ci None: no CI
    ece_after: dict[str, Any] | None
    steps: int | None
    train_seconds: float | None  # fitting only (recipe: its training loop, as it records it)
    seconds: float  # the whole method: training, calibration, audit, test evaluation
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- data


def make_settings(home: Path) -> Settings:
    """A home as the test suite makes one (fixed pseudonym key), on the CPU in fp32."""
    # `tests` is not an installed package and `make bench` runs us without PYTHONPATH.
    sys.path.insert(0, str(ROOT))
    from tests.conftest import make_settings as test_settings

    return dataclasses.replace(test_settings(home), device="cpu", precision="fp32")


def available_sources(names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The sources that this pydicom bundles (or that exist as paths), and why others don't."""
    kept, missing = [], {}
    for name in names:
        if Path(name).exists():
            kept.append(name)
            continue
        try:
            package_source(name)
            kept.append(name)
        except NotFoundError as err:
            missing[name] = str(err)
    return kept, missing


def build_task(
    spec: TaskSpec,
    folder: Path,
    n_studies: int,
    seed: int,
    sources: Sequence[str],
    synth_size: int,
) -> tuple[Settings, str, dict[str, Any]]:
    """Write the task's DICOM under ``folder/dicom`` and ingest it as a cohort of a new home."""
    src = folder / "dicom"
    if spec.kind == "synth":
        synth = synthesize_cohort(src, n_studies, seed, "DX", image_size=synth_size)
        labels_csv = synth.labels_csv
        info: dict[str, Any] = {"source": "workbench.dicom.synth DX", "image_size": synth_size}
    else:
        planted = planted_cohort(
            src,
            n_studies,
            seed,
            task=spec.task,  # type: ignore[arg-type]
            sources=sources,
            radius=spec.radius,
            contrast=spec.contrast,
        )
        labels_csv = planted.labels_csv
        info = {
            "sources": list(planted.sources),
            "radius": list(spec.radius),
            "contrast": list(spec.contrast),
            "class_counts": planted.class_counts,
        }
    settings = make_settings(folder / "home")
    cohort = f"bench-{spec.name}"
    summary = ingest(settings, src, labels_csv, cohort, progress=False)
    if summary.quarantined:
        raise RuntimeError(f"{spec.name}: {summary.quarantined} files quarantined at ingest")
    info.update(studies=n_studies, seed=seed, ingested=summary.ingested)
    return settings, cohort, info


# --------------------------------------------------------------------------- scoring


def study_targets(items: Sequence[CohortItem], problem: Problem, ids: np.ndarray) -> np.ndarray:
    """Each study's target (class index, or (K,) 0/1 row) in the order of ``ids``."""
    by_id = {i.study_id: problem.target(i.label) for i in items}
    return np.stack([np.asarray(by_id[int(s)]) for s in ids])


def findings(problem: Problem) -> list[int]:
    """Indices of the classes that are findings (all but a softmax model's negative class)."""
    return [k for k, c in enumerate(problem.classes) if c != problem.negative or problem.sigmoid]


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(kept)) if kept else None


def ece_of(problem: Problem, probs: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """ECE with its 95% CI (softmax), or the mean of per-label binary ECEs with each label's
    CI beside it (sigmoid: column j scored as [1 - p, p], as the recipe does)."""
    if not problem.sigmoid:
        return dict(calibration_report(probs, targets, n_resamples=N_RESAMPLES)["ece"])
    per_label = {}
    for j, c in enumerate(problem.classes):
        two = np.stack([1 - probs[:, j], probs[:, j]], axis=1)
        y = np.asarray(targets)[:, j].astype(int)
        per_label[c] = calibration_report(two, y, n_resamples=N_RESAMPLES)["ece"]
    value = float(np.mean([e["value"] for e in per_label.values()]))
    return {"value": value, "ci_low": None, "ci_high": None, "per_label": per_label}


def score(
    problem: Problem,
    raw: np.ndarray,
    calibrated: np.ndarray | None,
    targets: np.ndarray,
    steps: int | None,
    train_seconds: float | None,
    seconds: float,
    extra: dict[str, Any] | None = None,
) -> Scores:
    """Scores of study-level probabilities at argmax (softmax) or 0.5 per label (sigmoid)."""
    probs = calibrated if calibrated is not None else raw
    if problem.sigmoid:
        k = len(problem.classes)
        m = label_metrics(
            probs,
            targets,
            problem.classes,
            [0.5] * k,
            exclusive=problem.kind == "ovr",
            n_resamples=N_RESAMPLES,
        )
        rule = "0.5 per label"
    else:
        m = classification_metrics(probs, targets, problem.classes, n_resamples=N_RESAMPLES)
        rule = "argmax"
    per = [m["per_class"][problem.classes[k]] for k in findings(problem)]
    return Scores(
        auroc=m["auroc_macro"],
        auroc_ci=list(m["auroc_macro_ci"]),
        accuracy=m["accuracy"],
        sensitivity=_mean([p["sensitivity"] for p in per]),
        specificity=_mean([p["specificity"] for p in per]),
        operating_point=rule,
        ece_before=ece_of(problem, raw, targets),
        ece_after=ece_of(problem, calibrated, targets) if calibrated is not None else None,
        steps=steps,
        train_seconds=None if train_seconds is None else round(train_seconds, 1),
        seconds=round(seconds, 1),
        extra={"n_test_studies": int(len(targets)), **(extra or {})},
    )


# --------------------------------------------------------------------------- methods


def run_recipe(
    settings: Settings,
    cohort: str,
    image_size: int,
    quick: bool,
    architecture: Architecture = "densenet121",
    overrides: dict[str, Any] | None = None,
) -> tuple[Scores, Path]:
    """The default recipe (with ``architecture`` and ``overrides``, TrainConfig fields, its
    only changes); its figures come from the bundle's metadata."""
    changed = "".join(f"-{k}-{v}" for k, v in (overrides or {}).items())
    cfg = TrainConfig(
        cohort=cohort,
        name=f"{cohort}-recipe"
        + ("" if architecture == "densenet121" else f"-{architecture}")
        + changed.replace(".", "_"),
        architecture=architecture,
        image_size=image_size,
        device="cpu",
        precision="fp32",
    )
    cfg = dataclasses.replace(cfg, **(overrides or {}))
    if quick:
        # A smoke run: one epoch, and no saliency sanity checks (with the shuffled-label model
        # they cost minutes whatever the cohort's size; the full run keeps the defaults).
        cfg = dataclasses.replace(cfg, epochs=1, sanity_images=0)
    t = time.perf_counter()
    result = train(settings, cfg, progress=False)
    seconds = time.perf_counter() - t
    meta = json.loads((result.bundle / "configs" / "metadata.json").read_text())
    wb = meta["workbench"]
    detail = wb["metrics"]["test_detail"]
    training = wb.get("training", {})
    classes = list(wb["classes"])
    negative = meta["workbench"].get("negative_class")
    sigmoid_problem = wb.get("problem") in ("ovr", "multilabel")
    if sigmoid_problem:
        # per-label thresholds (Youden's J on the calibration split), as test_detail applied them
        per = [detail["per_class"][c] for c in classes]
        rule = wb.get("threshold_rule", "per-label thresholds")
        ece_before = {"value": detail["ece_before"], "ci_low": None, "ci_high": None}
        ece_after = {"value": detail["ece_after"], "ci_low": None, "ci_high": None}
    else:
        trust = wb.get("trust") or {}
        points = (trust.get("trust_report") or {}).get("operating_points_test") or {}
        target = (trust.get("operating_points") or {}).get("target_sensitivity")
        per = [points[c] for c in classes if c != negative and c in points]
        rule = f"sens>={target} on calibration split" if per else "argmax"
        if not per:  # no operating points stored: the argmax figures
            per = [detail["per_class"][c] for c in classes if c != negative]
        cal = detail["calibration"]
        ece_before, ece_after = cal["before"]["ece"], cal["after"]["ece"]
    kept = {k: v for k, v in training.items() if not isinstance(v, dict | list)}
    scores = Scores(
        auroc=detail["auroc_macro"],
        auroc_ci=list(detail["auroc_macro_ci"]),
        accuracy=detail["accuracy"],
        sensitivity=_mean([p.get("sensitivity") for p in per]),
        specificity=_mean([p.get("specificity") for p in per]),
        operating_point=rule,
        ece_before=ece_before,
        ece_after=ece_after,
        steps=training.get("steps"),
        train_seconds=training.get("train_seconds"),
        seconds=round(seconds, 1),
        extra={
            "n_test_studies": detail.get("n"),
            "bundle_summary": result.metrics,
            "argmax_sensitivity": None
            if sigmoid_problem
            else _mean([detail["per_class"][c]["sensitivity"] for c in classes if c != negative]),
            "training": kept,
            "history": training.get("history"),  # validation loss / AUROC per epoch
            "calibration_fit": wb.get("calibration_fit"),
            "split": wb.get("split"),
        },
    )
    return scores, result.bundle


def recheck_recipe(
    settings: Settings,
    scores: Scores,
    bundle_path: Path,
    problem: Problem,
    items: Sequence[CohortItem],
    test: Sequence[CohortItem],
) -> None:
    """Recompute the recipe's test probabilities from its bundle and score them here: the
    AUROC must match the bundle's (the baselines are scored the same way), and sigmoid
    problems get their per-label ECE CIs."""
    bundle = load_bundle(settings.models_dir, bundle_path.parent.name)
    if tuple(bundle.classes) != problem.classes:
        raise RuntimeError(f"bundle classes {bundle.classes} != {problem.classes}")
    records = to_records(test, problem.classes, target=problem.target)
    out = forward_dataset(
        bundle.network,
        Dataset(records, eval_transforms(bundle.spec)),
        torch.device("cpu"),
        "fp32",
        bundle.spec.spatial_dims,
    )
    ids, logits = mean_by_study(out["study_ids"], out["logits"])
    targets = study_targets(items, problem, ids)
    raw = sigmoid(logits) if problem.sigmoid else softmax(logits)
    calibrated = np.asarray(bundle.calibration.apply(logits))
    here = score(problem, raw, calibrated, targets, None, None, 0.0)
    same = (
        here.auroc is not None
        and scores.auroc is not None
        and abs(here.auroc - scores.auroc) < 1e-6
    )
    scores.extra["check"] = {"auroc_recomputed": here.auroc, "matches_bundle": same}
    if problem.sigmoid:
        scores.ece_before = {**here.ece_before, "value": scores.ece_before["value"]}  # type: ignore[index, dict-item]
        scores.ece_after = {**here.ece_after, "value": scores.ece_after["value"]}  # type: ignore[index, dict-item]


def run_naive(
    problem: Problem,
    items: Sequence[CohortItem],
    train_items: Sequence[CohortItem],
    test: Sequence[CohortItem],
    image_size: int,
    epochs: int,
    seed: int,
) -> Scores:
    """The MONAI tutorial loop: eval preset on every read (no cache), no augmentation, Adam
    1e-4, fixed epochs, the last model, no calibration."""
    set_determinism(seed=seed)
    t = time.perf_counter()
    transform = eval_transforms(InputSpec(image_size, 2))
    records = to_records(train_items, problem.classes, target=problem.target)
    loader = DataLoader(
        Dataset(records, transform),
        batch_size=NAIVE_BATCH,
        shuffle=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(seed),
    )
    model = create_network(2, len(problem.classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=NAIVE_LR)
    loss_fn: nn.Module = nn.BCEWithLogitsLoss() if problem.sigmoid else nn.CrossEntropyLoss()
    model.train()
    steps = 0
    for _ in range(epochs):
        for batch in loader:
            y = batch["label"].float() if problem.sigmoid else batch["label"].long()
            optimizer.zero_grad()
            loss = loss_fn(model(batch["image"]), y)
            loss.backward()
            optimizer.step()
            steps += 1
    trained = time.perf_counter() - t
    test_records = to_records(test, problem.classes, target=problem.target)
    out = forward_dataset(model, Dataset(test_records, transform), torch.device("cpu"), "fp32", 2)
    ids, logits = mean_by_study(out["study_ids"], out["logits"])
    raw = sigmoid(logits) if problem.sigmoid else softmax(logits)
    seconds = time.perf_counter() - t
    extra = {"epochs": epochs, "lr": NAIVE_LR, "batch_size": NAIVE_BATCH, "optimizer": "Adam"}
    targets = study_targets(items, problem, ids)
    return score(problem, raw, None, targets, steps, trained, seconds, extra)


def pixels(records: Sequence[dict[str, Any]], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image through the eval preset, average-pooled to 32 x 32, flattened; study ids."""
    transform = eval_transforms(InputSpec(image_size, 2))
    rows = []
    for r in records:
        x = torch.as_tensor(transform(dict(r))["image"]).float()
        small = nn.functional.adaptive_avg_pool2d(x, (LOGREG_PIXELS, LOGREG_PIXELS))
        rows.append(small.flatten().numpy())
    return np.stack(rows), np.asarray([r["study_id"] for r in records], dtype=np.int64)


def run_logreg(
    problem: Problem,
    items: Sequence[CohortItem],
    train_items: Sequence[CohortItem],
    test: Sequence[CohortItem],
    image_size: int,
) -> Scores:
    """Standardised 32 x 32 pixels into a logistic regression (one per label for sigmoid
    problems), fitted on the train split's images, probabilities averaged per study."""
    t = time.perf_counter()
    train_records = to_records(train_items, problem.classes, target=problem.target)
    x_train, _ = pixels(train_records, image_size)
    y_train = np.stack([np.asarray(r["label"]) for r in train_records])
    x_test, test_ids = pixels(to_records(test, problem.classes, target=problem.target), image_size)
    k = len(problem.classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence / single-class notes: the scores show it
        if problem.sigmoid:
            clf: Pipeline = make_pipeline(
                StandardScaler(), OneVsRestClassifier(LogisticRegression(max_iter=2000))
            )
            clf.fit(x_train, y_train.astype(int))
            probs = clf.predict_proba(x_test)
            fitted = clf[-1].estimators_
            iters = [int(np.max(getattr(e, "n_iter_", [0]))) for e in fitted]
        else:
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            clf.fit(x_train, y_train.astype(int))
            probs = np.zeros((len(x_test), k))
            probs[:, clf[-1].classes_] = clf.predict_proba(x_test)  # absent classes keep 0
            iters = [int(np.max(clf[-1].n_iter_))]
    fitted_at = time.perf_counter() - t
    ids, study_probs = mean_by_study(test_ids, probs)
    seconds = time.perf_counter() - t
    extra = {"pixels": f"{LOGREG_PIXELS}x{LOGREG_PIXELS}", "steps_are": "lbfgs iterations"}
    targets = study_targets(items, problem, ids)
    return score(problem, study_probs, None, targets, max(iters), fitted_at, seconds, extra)


# --------------------------------------------------------------------------- report


def _num(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _with_ci(value: float | None, lo: float | None, hi: float | None) -> str:
    if value is None:
        return "n/a"
    if lo is None or hi is None:
        return _num(value)
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def _ece(e: dict[str, Any] | None) -> str:
    if e is None:
        return "n/a"
    text = _with_ci(e.get("value"), e.get("ci_low"), e.get("ci_high"))
    return f"{text} ‡" if "per_label" in e else text


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Recipe benchmark, {results['date']}: {m['cpu']} ({m['capability']}), {m['cores']} "
        f"cores, torch {m['torch']} ({m['torch_threads']} threads); {results['studies']} "
        f"studies per task, {results['image_size']} px, naive {results['naive_epochs']} epochs"
        + (", QUICK smoke run" if results["quick"] else ""),
        "",
        "| task | method | test n | AUROC macro [95% CI] | accuracy | sens / spec | "
        "operating point | ECE before [95% CI] | ECE after [95% CI] | steps | train s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, task in results["tasks"].items():
        if "error" in task:
            lines.append(f"| {name} | (failed) | | {task['error']} | | | | | | | | |")
            continue
        extra = [m for m in task["methods"] if m not in METHODS]
        for method in [*METHODS, *extra]:
            s = task["methods"].get(method)
            if s is None:
                continue
            lo, hi = (list(s["auroc_ci"]) + [None, None])[:2]
            lines.append(
                f"| {name} | {method} | {s['extra'].get('n_test_studies', '')} | "
                f"{_with_ci(s['auroc'], lo, hi)} | {_num(s['accuracy'])} | "
                f"{_num(s['sensitivity'], 2)} / {_num(s['specificity'], 2)} | "
                f"{s['operating_point']} | {_ece(s['ece_before'])} | {_ece(s['ece_after'])} | "
                f"{s['steps'] if s['steps'] is not None else 'n/a'} | "
                f"{_num(s['train_seconds'], 1)} | {s['seconds']} |"
            )
    lines += [
        "",
        "sens / spec: mean over the finding classes (all but the negative one) at the "
        "operating point; logreg steps are lbfgs iterations; naive and logreg have no "
        "calibration (ECE after n/a). ‡ sigmoid problems: mean of per-label binary ECEs, "
        "per-label 95% CIs in the JSON; their accuracy is the exact-match ratio. train s: "
        "the fit alone; wall s: the whole method (the recipe's includes its calibration, "
        "trust fitting, saliency checks and bundle).",
    ]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {
        "cpu": hardware_of(torch.device("cpu")).name,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# --------------------------------------------------------------------------- main


def run_task(
    spec: TaskSpec, folder: Path, args: argparse.Namespace, seed: int, sources: list[str]
) -> dict[str, Any]:
    synth_size = 128 if args.quick else 256
    t = time.perf_counter()
    settings, cohort, info = build_task(spec, folder, args.studies, seed, sources, synth_size)
    info["build_seconds"] = round(time.perf_counter() - t, 1)
    out: dict[str, Any] = {"about": spec.about, "data": info, "methods": {}}
    recipe, bundle_path = run_recipe(settings, cohort, args.image_size, args.quick)
    # The split the recipe stored; every method (and every variant) uses it.
    items = [i for i in cohort_items(settings, cohort) if i.label]
    problem = resolve_problem("auto", [i.label for i in items])
    by_split = {s: [i for i in items if i.split == s] for s in ("train", "calibration", "test")}
    out["problem"] = {"kind": problem.kind, "classes": list(problem.classes)}
    out["split_studies"] = {s: len(v) for s, v in by_split.items()}
    recheck_recipe(settings, recipe, bundle_path, problem, items, by_split["test"])
    out["methods"]["recipe"] = dataclasses.asdict(recipe)
    if args.small:  # the same recipe with the compact network, on the same split
        small, path = run_recipe(settings, cohort, args.image_size, args.quick, "densenet-small")
        recheck_recipe(settings, small, path, problem, items, by_split["test"])
        out["methods"]["recipe-small"] = dataclasses.asdict(small)
    for overrides in args.variants:  # the recipe with some fields changed, same split
        variant, path = run_recipe(
            settings, cohort, args.image_size, args.quick, overrides=overrides
        )
        # scored as the recipe is: the check, and for sigmoid problems per-label ECE CIs
        recheck_recipe(settings, variant, path, problem, items, by_split["test"])
        label = ",".join(f"{k}={v}" for k, v in overrides.items())
        out["methods"][f"recipe {label}"] = dataclasses.asdict(variant)
    train, test = by_split["train"], by_split["test"]
    if "naive" in args.methods:
        naive = run_naive(problem, items, train, test, args.image_size, args.naive_epochs, seed)
        out["methods"]["naive"] = dataclasses.asdict(naive)
    if "logreg" in args.methods:
        logreg = run_logreg(problem, items, train, test, args.image_size)
        out["methods"]["logreg"] = dataclasses.asdict(logreg)
    return out


def variant_fields(text: str, ap: argparse.ArgumentParser) -> dict[str, Any]:
    """``FIELD=VALUE[,FIELD=VALUE...]`` as TrainConfig fields and values of their types."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for part in text.split(","):
        name, _, raw = part.partition("=")
        if name not in fields or not raw:
            ap.error(f"--variant {text!r}: expected FIELD=VALUE with TrainConfig fields")
        kind = str(fields[name].type)  # the annotation's text (postponed annotations)
        if raw == "None" and "None" in kind:
            out[name] = None
        elif kind.startswith("bool"):
            out[name] = raw.lower() in ("1", "true", "yes")
        else:
            number = next((n for n in (int, float) if kind.startswith(n.__name__)), None)
            out[name] = number(raw) if number else raw
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description="Recipe benchmark (issue 14): the default training recipe against a naive "
        "MONAI loop and a logistic regression, on planted real anatomy and the synthetic cohort."
    )
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"subset of {','.join(TASKS)}")
    ap.add_argument("--studies", type=int, default=None, help="studies per task (400; quick 40)")
    ap.add_argument("--image-size", type=int, default=None, help="input size (96; quick 64)")
    ap.add_argument("--naive-epochs", type=int, default=None, help="naive loop (10; quick 2)")
    ap.add_argument(
        "--sources",
        default=",".join(DEFAULT_SOURCES),
        help="pydicom test-file names (or paths) of the real anatomy",
    )
    ap.add_argument("--seed", type=int, default=0, help="data seed (task i uses seed + i)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 epoch")
    ap.add_argument(
        "--small",
        action="store_true",
        help="also the recipe with --architecture densenet-small (method recipe-small)",
    )
    ap.add_argument(
        "--methods",
        default="recipe,naive,logreg",
        help="recipe always runs; drop naive and/or logreg to save time",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="FIELD=VALUE[,FIELD=VALUE]",
        help="also the recipe with TrainConfig fields changed (repeatable), e.g. "
        "ema_decay=0.995 or rotate=45,scale=0.15: an ablation measured on the same split in "
        "the same run",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="keep the work here")
    ap.add_argument("--out", type=Path, default=None, help="JSON path")
    args = ap.parse_args()
    args.studies = args.studies or (40 if args.quick else 400)
    args.image_size = args.image_size or (64 if args.quick else 96)
    args.naive_epochs = args.naive_epochs or (2 if args.quick else 10)
    args.methods = {m.strip() for m in args.methods.split(",") if m.strip()}
    unknown_methods = args.methods - {"recipe", "naive", "logreg"}
    if unknown_methods:
        ap.error(f"--methods: unknown {', '.join(sorted(unknown_methods))}")
    args.variants = [variant_fields(v, ap) for v in args.variant]
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        ap.error(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    sources, missing = available_sources([s for s in args.sources.split(",") if s])
    if not sources:
        ap.error("none of --sources is available")
    date = time.strftime("%Y-%m-%d")
    out_path = args.out or ROOT / "bench" / "results" / f"recipe-{date}.json"
    warnings.filterwarnings("ignore", category=UserWarning)  # pydicom / MONAI chatter

    results: dict[str, Any] = {
        "date": date,
        "machine": machine(),
        "code_version": code_version(),
        "quick": args.quick,
        "studies": args.studies,
        "image_size": args.image_size,
        "naive_epochs": args.naive_epochs,
        "seed": args.seed,
        "sources": sources,
        "sources_missing": missing,
        "tasks": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as tmp:
        root = args.workdir.resolve() if args.workdir else Path(tmp)
        for repo_dir in (ROOT / "studies", ROOT / "models"):
            if root == repo_dir or repo_dir in root.parents:
                ap.error(f"--workdir must not be inside {repo_dir}")
        started = time.perf_counter()
        for n, name in enumerate(names):
            t = time.perf_counter()
            spec = TASKS[name]
            print(f"[{name}] building and training ...", file=sys.stderr, flush=True)
            try:
                task = run_task(spec, root / name, args, args.seed + n, sources)
            except Exception as err:  # one task failing should not lose the others
                task = {"error": f"{type(err).__name__}: {err}"}
            task["seconds"] = round(time.perf_counter() - t, 1)
            results["tasks"][name] = task
            print(f"[{name}] done in {task['seconds']} s", file=sys.stderr, flush=True)
        results["seconds"] = round(time.perf_counter() - started, 1)
        results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    text = table(results)
    results["table"] = text
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(text)
    print(f"\nwritten: {out_path}")


if __name__ == "__main__":
    main()
