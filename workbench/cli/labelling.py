"""Commands that bring clinicians' reads where they teach most: ``suggest``."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from workbench.cli.common import actor
from workbench.config import get_settings
from workbench.errors import NotFoundError
from workbench.review.promotion import promoted_model
from workbench.review.worklist import STRATEGIES


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this group's commands to the parser."""
    s = sub.add_parser(
        "suggest",
        help="rank a cohort's unlabelled studies by what a read would teach the model",
        description="Runs the model (or an ensemble: --model more than once) over the "
        "cohort's unlabelled studies and picks --n that are uncertain and unlike what the "
        "model was trained on and each other (k-center greedy on its embeddings). The list "
        "is stored as the cohort's labelling worklist (HOME/suggestions/COHORT.json).",
    )
    s.add_argument("--cohort", required=True)
    s.add_argument("--n", type=int, default=50, help="studies to suggest (default %(default)s)")
    s.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="MODEL",
        help="NAME, NAME/VERSION or a bundle folder; twice or more: an ensemble (default: "
        "the model promoted for --task)",
    )
    s.add_argument("--task", help="without --model: the model promoted for this task")
    s.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="entropy",
        help="how unsure the model is (default %(default)s; ensemble-disagreement needs two "
        "models or more; coreset: diversity alone)",
    )
    s.add_argument(
        "--pool-factor",
        type=int,
        default=3,
        help="the diversity step picks from the N x this most uncertain (default %(default)s)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, help="also write the list as CSV here")


def cmd_suggest(a: argparse.Namespace) -> None:
    # imports torch: only this handler pays for it (see the package docs)
    from workbench.model.bundle import load_bundle
    from workbench.model.runtime import resolve_device
    from workbench.review.suggest import suggest

    settings = get_settings()
    refs = list(a.models or [])
    if not refs:
        promoted = promoted_model(settings, a.task)
        if promoted is None:
            raise NotFoundError("no --model given and none promoted (see `workbench promote`)")
        refs = [promoted]
    device = resolve_device(settings.device)
    bundles = [load_bundle(settings.models_dir, ref, device) for ref in refs]
    worklist = suggest(
        settings,
        a.cohort,
        a.n,
        bundles,
        strategy=a.strategy,
        pool_factor=a.pool_factor,
        seed=a.seed,
        actor=actor(),
    )
    for s in worklist.suggestions:
        size = "" if s.set_size is None else f"  set size {s.set_size}"
        print(f"{s.rank:4d}  {s.study_key}  score {s.score:.3f}  now {s.predicted}{size}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with a.out.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["rank", "study_key", "score", "predicted", "set_size"])
            for s in worklist.suggestions:
                w.writerow([s.rank, s.study_key, s.score, s.predicted, s.set_size])
    print(worklist.line())


COMMANDS = {"suggest": cmd_suggest}
