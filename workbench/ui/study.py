"""Study: the image with window / level and the heat-map overlay, the calibrated probabilities,
and the review form (agree, or disagree with a corrected label and a reason)."""

from __future__ import annotations

import logging
import time

import pandas as pd
import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

from workbench.config import Settings
from workbench.ui import data, imaging
from workbench.ui.auth import Reviewer, require_page
from workbench.ui.common import OPEN_PREDICTION, format_top_k, page_file, percent, settings
from workbench.ui.worklist import blind_viewer

log = logging.getLogger(__name__)

METHOD_NAMES = {"gradcam": "Grad-CAM", "ig": "Integrated Gradients", "occlusion": "Occlusion"}
ASSESSMENTS = ("Agree", "Disagree")
CONFIDENCE = {1: "1 unsure", 2: "2", 3: "3", 4: "4", 5: "5 certain"}
# Viewer settings follow the reviewer from study to study (and across pages).
VIEWER_DEFAULTS = {"wl_center": 0.5, "wl_width": 1.0, "heat_alpha": 0.4}


# DICOM ViewPosition codes as a reader says them; frontal views first.
VIEW_NAMES = {"PA": "PA", "AP": "AP", "LL": "Lateral (LL)", "RL": "Lateral (RL)", "LAT": "Lateral"}
VIEW_ORDER = ("PA", "AP", "LL", "RL", "LAT")


def view_name(view: str) -> str:
    return VIEW_NAMES.get(view.upper(), view or "Image")


def view_rank(view: str) -> tuple[int, str]:
    code = view.upper()
    return (VIEW_ORDER.index(code) if code in VIEW_ORDER else len(VIEW_ORDER), code)


def _reset_viewer() -> None:
    for key, value in VIEWER_DEFAULTS.items():
        st.session_state[key] = value


def header(detail: data.PredictionDetail) -> None:
    st.title(f"Study {detail.study_key}")
    facts = [
        detail.site or "site unknown",
        detail.modality or "modality unknown",
        f"age {detail.age_years}" if detail.age_years is not None else None,
        f"patient {detail.patient_pseudonym}",
        f"model {detail.model_name} {detail.model_version}",
        f"predicted {detail.created_at:%Y-%m-%d %H:%M} UTC",
    ]
    st.caption(" · ".join(f for f in facts if f))


def navigation_buttons(s: Settings, reviewer: Reviewer, detail: data.PredictionDetail) -> None:
    back, nxt, _ = st.columns([1, 1, 3])
    if back.button("Worklist", icon=":material/arrow_back:", width="stretch"):
        st.switch_page(str(page_file("worklist")))
    queue = [
        r.prediction_id
        for r in data.worklist(s, detail.bundle_hash, viewer=blind_viewer(reviewer))
        if r.status == "unreviewed" and r.prediction_id != detail.prediction_id
    ]
    if nxt.button(
        "Next unreviewed", icon=":material/skip_next:", disabled=not queue, width="stretch"
    ):
        st.session_state[OPEN_PREDICTION] = queue[0]
        st.rerun()


def viewer(s: Settings, detail: data.PredictionDetail) -> None:
    """View switch, window / level, heat-map opacity; original and overlay side by side."""
    if not detail.images:
        st.warning("This prediction has no images.")
        return
    for key, value in VIEWER_DEFAULTS.items():
        st.session_state.setdefault(key, value)
    order = sorted(range(len(detail.images)), key=lambda i: view_rank(detail.images[i].view))
    top, reset = st.columns([4, 1], vertical_alignment="bottom")
    idx = order[0]
    if len(order) > 1:
        idx = top.radio(
            "View",
            options=order,
            format_func=lambda i: view_name(detail.images[i].view),
            horizontal=True,
            key=f"view_{detail.prediction_id}",
        )
    reset.button(
        "Reset",
        icon=":material/restart_alt:",
        on_click=_reset_viewer,
        help="Window level 0.50, width 1.00, heat-map opacity 0.40",
    )
    image = detail.images[idx]
    pixels = imaging.load_display(s, image.cache_key)
    if pixels is None:
        st.error(
            "The display pixels of this image are not in the cache; re-run ingest for this "
            "study to restore them."
        )
        return
    heat = imaging.load_saliency(s, image.saliency_file)

    c1, c2, c3 = st.columns(3)
    center = c1.slider(
        "Window level (center)", 0.0, 1.0, step=0.01, key="wl_center", persist_state="session"
    )
    width = c2.slider(
        "Window width", imaging.MIN_WIDTH, 1.0, step=0.01, key="wl_width", persist_state="session"
    )
    alpha = c3.slider(
        "Heat-map opacity",
        0.0,
        1.0,
        step=0.05,
        key="heat_alpha",
        persist_state="session",
        help="0 shows the plain image",
    )

    slice_idx = 0
    if imaging.n_slices(pixels) > 1:
        n = imaging.n_slices(pixels)
        slice_idx = st.slider("Slice", 1, n, n // 2 + 1, key=f"slice_{detail.prediction_id}") - 1
    plane = imaging.window_level(imaging.plane(pixels, slice_idx), center, width)
    heat_plane = imaging.plane(heat, slice_idx) if heat is not None else None

    left, right = st.columns(2)
    left.image(
        imaging.to_grey_rgb(plane),
        caption=f"{view_name(image.view)}: original, window level {center:.2f} / width {width:.2f}",
        width="stretch",
        output_format="PNG",
    )
    if heat_plane is None or heat_plane.shape != plane.shape:
        right.info("No heat map is stored for this image.")
        return
    method = METHOD_NAMES.get(detail.explain_method or "", detail.explain_method or "saliency")
    right.image(
        imaging.blend(plane, heat_plane, alpha),
        caption=(
            f"{view_name(image.view)}: heat-map overlay, {method} for “{image.saliency_target}”, "
            f"opacity {alpha:.0%}"
        ),
        width="stretch",
        output_format="PNG",
    )
    st.caption(
        "The heat map shows where the model looked for its top finding; it is not a "
        "segmentation and does not prove the finding."
    )


def findings(detail: data.PredictionDetail) -> None:
    st.subheader("Model output")
    a, b = st.columns(2)
    a.metric("Top finding", detail.top_finding)
    b.metric("Calibrated probability", percent(detail.priority))
    st.markdown(f"Predicted label: **{detail.predicted_label}**")
    ranked = sorted(detail.probabilities.items(), key=lambda kv: -kv[1])
    top = {label for label, _ in detail.top_k}
    st.dataframe(
        pd.DataFrame(
            {
                "Class": [c for c, _ in ranked],
                "Probability": [round(100.0 * p, 1) for _, p in ranked],
                "Top-k": ["✓" if c in top else "" for c, _ in ranked],
            }
        ),
        hide_index=True,
        width="stretch",
        column_config={
            "Probability": st.column_config.ProgressColumn(
                "Probability", format="%.1f%%", min_value=0, max_value=100
            ),
        },
    )
    st.caption(f"Top-{len(detail.top_k)}: {format_top_k(detail.top_k)} (calibrated, study level)")
    if len(detail.images) > 1:
        with st.expander("Per-view probabilities"):
            st.dataframe(
                pd.DataFrame(
                    [
                        {"View": im.view, **{c: percent(p) for c, p in im.probabilities.items()}}
                        for im in detail.images
                    ]
                ),
                hide_index=True,
                width="stretch",
            )


def validate(assessment: str | None, label: str, comment: str, predicted: str) -> str | None:
    """Why the review cannot be submitted yet, or None."""
    if assessment not in ASSESSMENTS:
        return "Choose Agree or Disagree."
    if assessment == "Agree" and label != predicted:
        return (
            f"You agreed with the model but chose the label “{label}”; choose Disagree to "
            f"correct the predicted label “{predicted}”."
        )
    if assessment == "Disagree" and not comment.strip():
        return "Give a reason for disagreeing in the comment."
    return None


def review_form(s: Settings, reviewer: Reviewer, detail: data.PredictionDetail) -> None:
    key = f"review_{detail.prediction_id}"
    mine = data.reviews_for(s, detail.prediction_id, reviewer=reviewer.name)
    current = mine[0] if mine else None
    st.subheader("Your review" if current is None else f"Your review (version {current.version})")
    others = data.other_readers(s, detail.prediction_id, reviewer.name)
    if others and reviewer.role == "clinician":
        st.info(
            "Second read: another clinician has read this study. Their read is hidden from you "
            "so that the two reads stay independent."
        )
    # The time spent is measured from the first time this reader opened the study.
    opened = st.session_state.setdefault(f"{key}_opened", time.time())
    classes = list(detail.classes)
    start_label = current.label if current else detail.predicted_label
    with st.form(f"{key}_form", clear_on_submit=False):
        assessment = st.radio(
            "Do you agree with the model?",
            ASSESSMENTS,
            index=None
            if current is None
            else ASSESSMENTS.index("Agree" if current.agree else "Disagree"),
            horizontal=True,
            key=f"{key}_assessment",
            persist_state="session",
        )
        label = st.selectbox(
            "Label (correct it when you disagree)",
            classes,
            index=classes.index(start_label) if start_label in classes else 0,
            key=f"{key}_label",
            persist_state="session",
        )
        confidence = st.select_slider(
            "Confidence",
            options=list(CONFIDENCE),
            value=current.confidence if current and current.confidence else 3,
            format_func=lambda c: CONFIDENCE[c],
            key=f"{key}_confidence",
            persist_state="session",
        )
        comment = st.text_area(
            "Comment (required when you disagree)",
            max_chars=4000,
            key=f"{key}_comment",
            persist_state="session",
        )
        reason = ""
        if current is not None:
            reason = st.text_input(
                "Why do you change your review? (the earlier version is kept)",
                max_chars=1000,
                key=f"{key}_reason",
            )
        submitted = st.form_submit_button(
            "Submit review" if current is None else "Save new version", type="primary"
        )

    receipt_key = f"{key}_receipt"
    if submitted:
        problem = validate(assessment, str(label), comment, detail.predicted_label)
        if current is not None and not problem and not reason.strip():
            problem = "Say why you change your review."
        if problem:
            st.error(problem)
        else:
            try:
                saved = data.save_review(
                    s,
                    reviewer.name,
                    detail.prediction_id,
                    agree=assessment == "Agree",
                    label=str(label),
                    comment=comment,
                    role=reviewer.role,
                    confidence=int(confidence),
                    reason=reason,
                    seconds_spent=round(time.time() - float(opened), 1),
                )
            except data.ReviewError as err:
                st.error(f"The review was not saved: {err}. Your entries are kept above.")
            except (SQLAlchemyError, OSError) as err:
                log.warning("review of prediction %s not saved: %s", detail.prediction_id, err)
                reason_text = getattr(err, "orig", None) or err
                st.error(
                    f"The review was not saved: the database reported “{reason_text}”. "
                    "Your entries are kept above; submit again when the database is back."
                )
            else:
                st.session_state[receipt_key] = saved.id
                st.session_state[f"{key}_opened"] = time.time()  # a next version's own time
                st.rerun()  # show the form as the next version
    receipt = st.session_state.get(receipt_key)
    if receipt is not None:
        st.success(f"Review #{receipt} saved and recorded in the audit log.")


def history(s: Settings, reviewer: Reviewer, detail: data.PredictionDetail) -> None:
    """Every version of the reviews; a clinician sees only their own (reads are blind)."""
    viewer = blind_viewer(reviewer)
    reviews = data.reviews_for(s, detail.prediction_id, reviewer=viewer)
    if not reviews:
        return
    title = "Your reviews" if viewer else "Reviews of this prediction"
    with st.expander(f"{title} ({len(reviews)})", expanded=True):
        st.dataframe(
            pd.DataFrame(
                {
                    "When (UTC)": [f"{r.created_at:%Y-%m-%d %H:%M}" for r in reviews],
                    "Reviewer": [r.reviewer for r in reviews],
                    "Kind": [r.kind for r in reviews],
                    "Version": [r.version for r in reviews],
                    "Assessment": ["agreed" if r.agree else "disagreed" for r in reviews],
                    "Label": [r.label for r in reviews],
                    "Confidence": [r.confidence for r in reviews],
                    "Comment": [r.comment for r in reviews],
                    "Why changed": [r.reason for r in reviews],
                }
            ),
            hide_index=True,
            width="stretch",
        )


def main() -> None:
    reviewer = require_page("study")
    s = settings()
    chosen = st.session_state.get(OPEN_PREDICTION)
    detail = data.load_prediction(s, int(chosen)) if chosen is not None else None
    if detail is None:
        st.title("Study")
        st.info("Open a study from the worklist.")
        st.page_link(str(page_file("worklist")), label="Worklist", icon=":material/list:")
        return
    header(detail)
    navigation_buttons(s, reviewer, detail)
    left, right = st.columns([3, 2], gap="large")
    with left:
        viewer(s, detail)
    with right:
        findings(detail)
        review_form(s, reviewer, detail)
        history(s, reviewer, detail)


if __name__ == "__main__":
    main()
