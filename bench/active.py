"""Label efficiency of ``workbench suggest`` (issue 16): test AUROC against the number of
labels, random selection against active selection, over several seeds.

A proxy, said plainly: the network is trained once with the default recipe on a small seed
set of labelled studies and then frozen; each strategy grows the labelled set batch by batch
from the unlabelled pool, and at every size a logistic regression on the frozen network's
study embeddings (scikit-learn) is refitted and scored on the test split. What the loop does in
practice (fine-tune the network at every size) costs minutes per point on 2 CPU cores; the
proxy isolates what the selection contributes for a fixed representation.

Strategies (each the same code ``workbench suggest`` runs: ``review.suggest.uncertainty`` and
``review.suggest.diverse_order``):
  * ``random``: a uniform draw from the pool;
  * ``entropy``: the highest entropy of the current classifier's probabilities;
  * ``entropy+coreset``: suggest's default, k-center greedy from the 3 x batch most uncertain;
  * ``coreset``: k-center greedy alone.

Task: one of ``bench/recipe.py``'s (default ``multiclass``: pydicom's real CT and MR anatomy
with a planted disc or bar, or nothing). The patient-level split is the workbench's own: the
pool is the train and calibration splits, the test split is never selected from.

Usage::

    python bench/active.py [--task multiclass] [--studies 400] [--image-size 96] [--seed-set 20]
                           [--batch 20] [--budget 200] [--seeds 5] [--out FILE]

Prints one markdown table (mean and sd of test AUROC per label count and strategy, with machine
and date) and writes everything as JSON (default ``bench/results/active-<date>.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe  # noqa: E402 - bench/recipe.py: the tasks and the machine record

from workbench.catalog.cohorts import cohort_items, split_cohort  # noqa: E402
from workbench.db.store import Cohort, CohortMember, session_scope  # noqa: E402
from workbench.metrics import macro_auroc  # noqa: E402
from workbench.model.bundle import load_bundle  # noqa: E402
from workbench.review.suggest import diverse_order, study_outputs, uncertainty  # noqa: E402
from workbench.train.config import TrainConfig  # noqa: E402
from workbench.train.training import train  # noqa: E402

STRATEGIES = ("random", "entropy", "entropy+coreset", "coreset")
POOL_FACTOR = 3


def pick(
    strategy: str,
    rng: np.random.Generator,
    probs: np.ndarray,
    unlabelled: np.ndarray,
    labelled: np.ndarray,
    emb: np.ndarray,
    n: int,
) -> np.ndarray:
    """Indices (into ``emb``) of the next ``n`` studies to label."""
    if strategy == "random":
        return rng.choice(unlabelled, size=min(n, len(unlabelled)), replace=False)
    scores = uncertainty([probs], "entropy", sigmoid=False)
    if strategy == "entropy":
        return unlabelled[np.argsort(-scores, kind="stable")[:n]]
    chosen = diverse_order(
        scores,
        emb[unlabelled],
        emb[labelled],
        n,
        POOL_FACTOR,
        int(rng.integers(1 << 30)),
        diversity_only=strategy == "coreset",
    )
    return unlabelled[np.asarray(chosen, dtype=np.int64)]


def curve(
    strategy: str,
    seed: int,
    emb: np.ndarray,
    y: np.ndarray,
    pool: np.ndarray,
    test: np.ndarray,
    seed_set: int,
    batch: int,
    budget: int,
    k: int,
) -> list[dict[str, Any]]:
    """Test AUROC at every labelled-set size for one strategy and seed."""
    rng = np.random.default_rng(seed)
    # the same seed set for every strategy of a seed: one study of each class, then at random
    first = [int(rng.choice(pool[y[pool] == c])) for c in range(k)]
    rest = rng.choice(np.setdiff1d(pool, first), size=seed_set - k, replace=False)
    labelled = np.array([*first, *rest], dtype=np.int64)
    out = []
    while True:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
        clf.fit(emb[labelled], y[labelled])
        probs_test = _full(clf.predict_proba(emb[test]), clf.classes_, k)
        out.append({"labels": len(labelled), "auroc": macro_auroc(probs_test, y[test])})
        if len(labelled) >= budget:
            return out
        unlabelled = np.setdiff1d(pool, labelled)
        if not len(unlabelled):  # the pool is spent before the budget
            return out
        probs = _full(clf.predict_proba(emb[unlabelled]), clf.classes_, k)
        new = pick(strategy, rng, probs, unlabelled, labelled, emb, batch)
        labelled = np.concatenate([labelled, new])


def _full(p: np.ndarray, classes: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((len(p), k))
    out[:, classes] = p
    return out


def seed_model(settings: Any, cohort: str, ids: list[int], image_size: int, seconds: float) -> Any:
    """The default recipe trained on the seed studies only (a cohort of their own)."""
    with session_scope(settings.database_url) as s:
        s.add(Cohort(name="seed"))
        s.flush()
        s.add_all(CohortMember(cohort_name="seed", study_id=i) for i in ids)
    split_cohort(settings, "seed", 0)
    cfg = TrainConfig(
        cohort="seed",
        name="seed-model",
        image_size=image_size,
        architecture="densenet-small",
        time_budget=seconds,
        device="cpu",
        precision="fp32",
        label_randomization_epochs=0,
        sanity_images=0,
    )
    started = time.perf_counter()
    train(settings, cfg, progress=False)
    return load_bundle(settings.models_dir, "seed-model"), time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--task", default="multiclass", choices=[t for t in recipe.TASKS if t != "multilabel"]
    )
    ap.add_argument("--studies", type=int, default=400)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--seed-set", type=int, default=20)
    ap.add_argument("--seed-model-studies", type=int, default=60)
    ap.add_argument("--seed-model-seconds", type=float, default=240.0)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sources, _ = recipe.available_sources(recipe.DEFAULT_SOURCES)
        settings, cohort, info = recipe.build_task(
            recipe.TASKS[a.task], Path(tmp), a.studies, 0, sources, 128
        )
        settings = dataclasses.replace(settings, device="cpu", precision="fp32")
        split_cohort(settings, cohort, 0)
        items = [i for i in cohort_items(settings, cohort) if i.images and i.label]
        classes = sorted({i.label for i in items if i.label})
        index = {c: n for n, c in enumerate(classes)}
        y = np.array([index[i.label] for i in items if i.label])
        pool = np.array([n for n, i in enumerate(items) if i.split != "test"])
        test = np.array([n for n, i in enumerate(items) if i.split == "test"])
        rng = np.random.default_rng(1234)
        seed_ids = rng.choice(pool, size=a.seed_model_studies, replace=False)
        bundle, seed_seconds = seed_model(
            settings, cohort, [items[int(n)].study_id for n in seed_ids], a.image_size,
            a.seed_model_seconds,
        )  # fmt: skip
        outputs = study_outputs(bundle, items, "fp32")
        order = {int(s): r for r, s in enumerate(outputs.study_ids)}
        emb = outputs.embeddings[[order[i.study_id] for i in items]]
        # the seed model's own studies are labelled already: the pool is the rest
        pool = np.setdiff1d(pool, seed_ids)
        results: dict[str, list[list[dict[str, Any]]]] = {s: [] for s in STRATEGIES}
        for strategy in STRATEGIES:
            for seed in range(a.seeds):
                results[strategy].append(
                    curve(strategy, seed, emb, y, pool, test, a.seed_set, a.batch, a.budget,
                          len(classes))
                )  # fmt: skip
    sizes = [p["labels"] for p in results["random"][0]]
    summary = {
        s: {
            n: {
                "mean": float(np.mean([c[j]["auroc"] for c in runs])),
                "sd": float(np.std([c[j]["auroc"] for c in runs], ddof=1)),
            }
            for j, n in enumerate(sizes)
        }
        for s, runs in results.items()
    }
    machine = recipe.machine()
    when = datetime.now(UTC)
    lines = [
        f"Label efficiency, task `{a.task}` ({a.studies} studies, test split {len(test)}), "
        f"frozen seed model ({a.seed_model_studies} studies, {seed_seconds:.0f} s), "
        f"logistic regression on its embeddings; test AUROC mean ± sd over {a.seeds} seeds. "
        f"{machine['cpu']}, {machine['capability']}, {when:%Y-%m-%d}.",
        "",
        "| labels | " + " | ".join(STRATEGIES) + " |",
        "|---" * (len(STRATEGIES) + 1) + "|",
    ]
    for n in sizes:
        cells = [f"{summary[s][n]['mean']:.3f} ± {summary[s][n]['sd']:.3f}" for s in STRATEGIES]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    out = a.out or Path(__file__).parent / "results" / f"active-{when:%Y%m%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "task": a.task,
                "info": info,
                "args": {k: str(v) for k, v in vars(a).items()},
                "classes": classes,
                "seed_model_seconds": seed_seconds,
                "summary": {s: {str(n): v for n, v in d.items()} for s, d in summary.items()},
                "runs": results,
                "machine": machine,
                "date": when.isoformat(timespec="seconds"),
                "seconds": time.perf_counter() - started,
                "table": table,
            },
            indent=2,
        )
    )
    print(f"JSON in {out}")


if __name__ == "__main__":
    main()
