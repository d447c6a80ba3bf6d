"""Commands that judge models: ``report``, ``compare``, ``promote``."""

from __future__ import annotations

import argparse
from pathlib import Path

from workbench.config import get_settings
from workbench.evaluation.jsonout import dump_json


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this group's commands to the parser."""
    s = sub.add_parser("report", help="write the consistency report (HTML, PDF, JSON, CSV)")
    s.add_argument("model")
    s.add_argument("--cohort", required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument(
        "--retest",
        action="store_true",
        help="first compute test-retest consistency (forward passes: the same study twice, "
        "small intensity, noise and rotation changes) and keep it beside the bundle",
    )
    s.add_argument(
        "--retest-saliency",
        choices=["gradcam", "ig", "occlusion", "none"],
        default="gradcam",
        help="saliency method whose rank correlation --retest measures",
    )

    s = sub.add_parser(
        "compare",
        help="compare two models on the locked test split of a cohort",
        description="Both models predict the cohort's test split; prints macro AUROC with the "
        "paired bootstrap CI of the difference, the top-1 flip rate, score and threshold "
        "shifts and the change per subgroup.",
    )
    s.add_argument("old", help="NAME or NAME/VERSION")
    s.add_argument("new", help="NAME or NAME/VERSION")
    s.add_argument("--cohort", required=True)
    s.add_argument("--out", type=Path, help="write the comparison JSON here")
    s.add_argument("--resamples", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)

    s = sub.add_parser(
        "promote",
        help="make a model the one in use for a task, if it is not worse than the current one",
        description="Compares NAME/VERSION with the model promoted for the task (or --against) "
        "on the test split of the candidate's training cohort (or --cohort) and refuses when "
        "macro AUROC drops by more than --margin, or the lower bound of the paired bootstrap "
        "95%% CI of NEW-OLD is below -margin. Either decision is an audit event.",
    )
    s.add_argument("model", help="NAME/VERSION (or NAME: its latest version)")
    s.add_argument("--task", help="registry key (default: the model's name)")
    s.add_argument("--against", help="compare with this model instead of the promoted one")
    s.add_argument("--margin", type=float, default=0.02)
    s.add_argument("--reason", default="", help="why, for the audit trail")
    s.add_argument("--cohort", help="whose test split to compare on")
    s.add_argument("--out", type=Path, help="write the comparison JSON here")
    s.add_argument("--resamples", type=int, default=1000)


def cmd_report(a: argparse.Namespace) -> None:
    from workbench.evaluation.report import build_report

    settings = get_settings()
    if getattr(a, "retest", False):
        from workbench.evaluation.consistency import write_retest

        path = write_retest(settings, a.model, a.cohort, explain=a.retest_saliency)
        print(f"test-retest: {path}")
    paths = build_report(settings, a.model, a.cohort, a.out)
    print("report: " + ", ".join(str(p) for p in paths))


def cmd_compare(a: argparse.Namespace) -> None:
    from workbench.evaluation.compare import compare_bundles, format_table

    data = compare_bundles(get_settings(), a.old, a.new, a.cohort, a.resamples, a.seed)
    print(format_table(data))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(dump_json(data), encoding="utf-8")
        print(f"comparison JSON in {a.out}")


def cmd_promote(a: argparse.Namespace) -> None:
    from workbench.evaluation.compare import format_table
    from workbench.review.promotion import PromotionRefused, promote

    try:
        decision = promote(
            get_settings(),
            a.model,
            task=a.task,
            against=a.against,
            margin=a.margin,
            reason=a.reason,
            cohort=a.cohort,
            n_resamples=a.resamples,
        )
    except PromotionRefused as err:
        if err.comparison is not None:
            print(format_table(err.comparison))
            if a.out:
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(dump_json(err.comparison), encoding="utf-8")
        raise
    if decision.comparison is not None:
        print(format_table(decision.comparison))
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(dump_json(decision.comparison), encoding="utf-8")
    print(decision.message)


COMMANDS = {"report": cmd_report, "compare": cmd_compare, "promote": cmd_promote}
