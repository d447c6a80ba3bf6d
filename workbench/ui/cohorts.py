"""Cohorts and models: each cohort's studies per split and label, and the test metrics that the
models trained on it carry in their bundle metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from workbench.catalog.cohorts import cohort_summary
from workbench.catalog.ingest import quarantine_report
from workbench.config import Settings
from workbench.model.bundle_info import BundleInfo, list_bundles
from workbench.ui import data
from workbench.ui.auth import require_page
from workbench.ui.common import settings

SPLIT_ORDER = ("train", "calibration", "test", data.UNASSIGNED)


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "—"
    if isinstance(value, int | float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_ci(value: Any, ci: Any) -> str:
    text = fmt(value)
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(isinstance(v, float) for v in ci):
        text += f" ({ci[0]:.2f}–{ci[1]:.2f})"
    return text


def counts_table(summary: data.CohortSummary) -> pd.DataFrame:
    """Studies per label (rows) and split (columns), with totals."""
    splits = [s for s in SPLIT_ORDER if any(k[0] == s for k in summary.counts)]
    splits += sorted({k[0] for k in summary.counts} - set(splits))
    labels = sorted({k[1] for k in summary.counts})
    frame = pd.DataFrame(
        [[summary.counts.get((sp, lab), 0) for sp in splits] for lab in labels],
        index=pd.Index(labels, name="Label"),
        columns=splits,
    )
    frame["total"] = frame.sum(axis=1)
    frame.loc["total"] = frame.sum(axis=0)
    return frame.reset_index()


def metrics_panel(bundle: BundleInfo) -> None:
    wb = bundle.contract
    test = wb.test_metrics
    detail = wb.test_detail
    if not test:
        st.info(f"{bundle.ref} carries no test metrics.")
        return
    cols = st.columns(4)
    cols[0].metric("Accuracy", fmt(test.get("accuracy")))
    cols[1].metric("AUROC (macro)", fmt(test.get("auroc_macro")))
    cols[2].metric("ECE before calibration", fmt(test.get("ece_before")))
    cols[3].metric("ECE after calibration", fmt(test.get("ece_after")))
    notes = [f"test studies: {detail['n']}" if "n" in detail else None]
    if detail.get("accuracy_ci"):
        notes.append(f"accuracy 95% CI {fmt_ci(detail.get('accuracy'), detail['accuracy_ci'])}")
    if detail.get("auroc_macro_ci"):
        notes.append(f"AUROC 95% CI {fmt_ci(detail.get('auroc_macro'), detail['auroc_macro_ci'])}")
    st.caption(" · ".join(n for n in notes if n))
    per_class = detail.get("per_class") or {}
    if per_class:
        st.dataframe(
            pd.DataFrame(
                {
                    "Class": list(per_class),
                    "Test studies": [m.get("n") for m in per_class.values()],
                    "AUROC (95% CI)": [
                        fmt_ci(m.get("auroc"), m.get("auroc_ci")) for m in per_class.values()
                    ],
                    "Sensitivity (95% CI)": [
                        fmt_ci(m.get("sensitivity"), m.get("sensitivity_ci"))
                        for m in per_class.values()
                    ],
                    "Specificity (95% CI)": [
                        fmt_ci(m.get("specificity"), m.get("specificity_ci"))
                        for m in per_class.values()
                    ],
                }
            ),
            hide_index=True,
            width="stretch",
        )
    facts = [
        f"created {wb.created or '—'}",
        f"calibration {wb.calibration_method}",
        f"input {wb.spatial_dims}D {wb.image_size} px",
        f"code {wb.code_version or '—'}",
        f"cohort hash {str(wb.cohort_hash or '—')[:16]}",
    ]
    st.caption(" · ".join(facts))


def content_table(s: Settings, cohort: str) -> None:
    """Modalities, manufacturers, sites, views, sizes, transfer syntaxes, photometric."""
    summary = cohort_summary(s, cohort)
    rows = [
        {"facet": facet, "value": value, "count": n}
        for facet, values in summary.counts.items()
        if facet not in ("label", "split")
        for value, n in sorted(values.items(), key=lambda t: -t[1])
    ]
    st.caption(f"{summary.instances} instances (counts are per instance)")
    st.dataframe(rows, hide_index=True, width="stretch")
    if summary.series_with_problems:
        st.warning(
            f"{summary.series_with_problems} series have inconsistent geometry and are left "
            "out of the volumes; `workbench quarantine` lists them."
        )


def quarantine_panel(s: Settings) -> None:
    """Files ingest could not read, and series left out of the volumes, with their reasons."""
    files, series = quarantine_report(s)
    if not files and not series:
        return
    st.subheader("Quarantine")
    st.caption(
        "Kept out of the catalog with a reason; `workbench quarantine --retry` tries the files "
        "again (after installing a codec, say). File names only: folders may name patients."
    )
    if files:
        st.dataframe(
            [{"reason": f.reason, "file": Path(f.path).name, "detail": f.detail} for f in files],
            hide_index=True,
            width="stretch",
        )
    for p in series:
        st.warning(f"Study {p.study_key} ({p.modality}): " + "; ".join(p.problems))


def main() -> None:
    require_page("cohorts")
    s = settings()
    st.title("Cohorts and models")
    summaries = data.cohort_summaries(s)
    bundles = list_bundles(s.models_dir)
    if not summaries:
        st.info("No cohorts yet. Ingest a folder of studies with `workbench ingest --cohort NAME`.")
    for summary in summaries:
        with st.container(border=True):
            st.subheader(f"Cohort {summary.name}")
            split = (
                f"split with seed {summary.split_seed}, fractions "
                + " / ".join(f"{f:g}" for f in summary.split_fractions or ())
                if summary.split_seed is not None
                else "not split yet"
            )
            per_split = ", ".join(
                f"{sp} {summary.patients_per_split[sp]}"
                for sp in SPLIT_ORDER
                if sp in summary.patients_per_split
            )
            st.caption(
                f"{summary.studies} studies · {summary.patients} patients ({per_split}) · "
                f"{split} · created {summary.created_at:%Y-%m-%d %H:%M} UTC"
            )
            st.dataframe(counts_table(summary), hide_index=True, width="stretch")
            with st.expander("What the cohort is made of (from the DICOM headers)"):
                content_table(s, summary.name)
            trained = [b for b in bundles if b.contract.cohort == summary.name]
            if not trained:
                st.caption("No model has been trained on this cohort yet.")
                continue
            refs = {b.ref: b for b in trained}
            ref = st.selectbox(
                "Model trained on this cohort", list(refs), key=f"cohort_model_{summary.name}"
            )
            metrics_panel(refs[ref])
    quarantine_panel(s)
    others = [b for b in bundles if b.contract.cohort not in {c.name for c in summaries}]
    if others:
        st.subheader("Other models")
        refs = {b.ref: b for b in others}
        ref = st.selectbox("Model", list(refs), key="cohort_model_other")
        metrics_panel(refs[ref])


if __name__ == "__main__":
    main()
