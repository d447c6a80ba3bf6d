"""Rendering the report's one dict: the HTML (Jinja2 template), the PDF (WeasyPrint), the
plots and cases.csv. Every number shown carries its JSON key (:func:`key_path` / :func:`lookup`)."""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from workbench.catalog.subgroups import SUBGROUP_ATTRS
from workbench.evaluation.cases import Case
from workbench.evaluation.jsonout import DECIMALS

TEMPLATE = "report.html.j2"


TEMPLATE_DIR = Path(__file__).parent / "templates"

SECTION_TITLES: tuple[str, ...] = (
    "Model and data lineage",
    "Performance",
    "Calibration",
    "Subgroups",
    "Reader agreement",
    "Test-retest consistency",
)


def _escape(segment: str) -> str:
    return segment.replace("~", "~0").replace(".", "~1")


def _unescape(segment: str) -> str:
    return segment.replace("~1", ".").replace("~0", "~")


def key_path(*segments: str | int) -> str:
    """The dotted key of a value in the report dict (``.`` in a name is written ``~1``)."""
    return ".".join(_escape(str(s)) for s in segments)


def lookup(data: Any, key: str) -> Any:
    """The value at a dotted key (see :func:`key_path`); list items by index."""
    value = data
    for raw in key.split("."):
        seg = _unescape(raw)
        value = value[int(seg)] if isinstance(value, list) else value[seg]
    return value


def format_number(value: Any) -> str:
    """How the HTML shows a number: floats to 3 decimals, integers as they are."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{float(value):.3f}"


def make_plots(data: Mapping[str, Any], cases: Sequence[Case]) -> dict[str, str]:
    """The report's figures as PNG data URIs, drawn from the report dict (and, for the ROC
    curves, the cases' probabilities)."""
    classes = data["performance"]["classes"]
    probs = np.asarray([c.probabilities for c in cases], dtype=np.float64)
    labels = np.asarray([c.label_index for c in cases], dtype=np.int64)
    cal = data["calibration"]
    return {
        "roc": _roc_plot(probs, labels, classes),
        "confusion": _confusion_plot(np.asarray(data["performance"]["confusion_matrix"]), classes),
        "reliability": _reliability_plot(
            cal["reliability_before"], cal["reliability_after"], cal["method"]
        ),
    }


def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig


def _roc_plot(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> str:
    from sklearn.metrics import roc_curve

    fig = _figure(4.2, 3.6)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
    for k, c in enumerate(classes):
        y = labels == k
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, probs[:, k])
        ax.plot(fpr, tpr, lw=1.5, label=c)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title("ROC, one class vs rest", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def _confusion_plot(cm: np.ndarray, classes: Sequence[str]) -> str:
    fig = _figure(3.8, 3.4)
    ax = fig.add_subplot()
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if frac[i, j] > 0.5 else "k")
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(ticks, classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title("Confusion matrix (row-normalised colour)", fontsize=10)
    return _png(fig)


def _reliability_plot(
    before: Mapping[str, list[float]], after: Mapping[str, list[float]], method: str
) -> str:
    fig = _figure(7.0, 3.2)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, curve, title in (
        (axes[0], before, "before calibration (softmax)"),
        (axes[1], after, f"after calibration ({method})"),
    ):
        lo, hi = np.asarray(curve["bin_lower"]), np.asarray(curve["bin_upper"])
        ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
        ax.bar(
            lo,
            curve["accuracy"],
            width=hi - lo,
            align="edge",
            color="#4c78a8",
            alpha=0.8,
            edgecolor="white",
            label="accuracy",
        )
        ax.plot(
            curve["confidence"],
            curve["accuracy"],
            "o",
            color="#e45756",
            ms=4,
            label="mean confidence",
        )
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-label probability)")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8, loc="upper left")
    return _png(fig)


def render_html(data: Mapping[str, Any], plots: Mapping[str, str] | None = None) -> str:
    """The report page: every number comes from the normalised dict ``data``; ``plots`` are
    PNG data URIs (see :func:`make_plots`)."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
    from markupsafe import Markup

    def num(*segments: str | int) -> Markup:
        key = key_path(*segments)
        return Markup('<span class="num" data-key="{}">{}</span>').format(
            key, format_number(lookup(data, key))
        )

    def ci(*segments: str | int) -> Markup:
        lo, hi = lookup(data, key_path(*segments))
        if lo is None or hi is None:
            return Markup('<span class="ci">(n/a)</span>')
        return Markup('<span class="ci">({} – {})</span>').format(
            num(*segments, 0), num(*segments, 1)
        )

    env = Environment(
        loader=FileSystemLoader(TEMPLATE_DIR),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    globals_: dict[str, Any] = {
        "num": num,
        "ci": ci,
        "titles": SECTION_TITLES,
        "subgroup_attrs": SUBGROUP_ATTRS,
    }
    env.globals.update(globals_)
    return env.get_template(TEMPLATE).render(data=data, plots=plots or {})


def write_pdf(html: str, path: Path, base_url: Path) -> int:
    """Render the HTML to PDF with WeasyPrint; returns the number of pages."""
    import logging

    from weasyprint import HTML

    # WeasyPrint logs every CSS property it ignores; keep the user's terminal quiet.
    logging.getLogger("weasyprint").setLevel(logging.ERROR)
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    document = HTML(string=html, base_url=str(base_url)).render()
    document.write_pdf(path)
    return len(document.pages)


def write_cases_csv(path: Path, classes: Sequence[str], cases: Sequence[Case]) -> None:
    """One row per evaluated study, pseudonymous only."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["study_key", "patient", "split", "site", "sex", "age_band", "manufacturer", "view"]
            + ["true_label"]
            + ["predicted_label", "correct", *[f"p_{c}" for c in classes], "reviewer_labels"]
            + ["calibration_map"]
        )
        for c in sorted(cases, key=lambda c: c.study_key):
            w.writerow(
                [c.study_key, c.patient, c.split or "", c.site, c.sex, c.age_band]
                + [c.manufacturer, c.view, c.label]
                + [c.predicted_label, int(c.predicted_label == c.label)]
                + [f"{p:.{DECIMALS}f}" for p in c.probabilities]
                + [";".join(f"{r}:{label}" for r, label in c.reviews)]
                + [c.calibration_map or ""]
            )
