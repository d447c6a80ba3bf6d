"""Study: the image with window / level presets, zoom and the heat-map overlay; the calibrated
probabilities with the prediction set, the operating points and the out-of-distribution warning;
the saliency sanity checks; similar prior cases; and the review form (agree, or disagree with a
corrected label and a reason)."""

from __future__ import annotations

import logging
import time
from typing import Any

import pandas as pd
import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

from workbench.config import Settings
from workbench.predict.results import probability_text
from workbench.review import reviews as review_store
from workbench.ui import data, imaging
from workbench.ui.auth import Reviewer, require_page
from workbench.ui.common import OPEN_PREDICTION, format_top_k, page_file, settings, styled
from workbench.ui.worklist import blind_viewer

log = logging.getLogger(__name__)

METHOD_NAMES = {"gradcam": "Grad-CAM", "ig": "Integrated Gradients", "occlusion": "Occlusion"}
ASSESSMENTS = ("Agree", "Disagree")
CONFIDENCE = {1: "1 unsure", 2: "2", 3: "3", 4: "4", 5: "5 certain"}
# Viewer settings follow the reviewer from study to study (and across pages).
VIEWER_DEFAULTS = {"wl_center": 0.5, "wl_width": 1.0, "heat_alpha": 0.4, "zoom": 1.0}
CUSTOM = "Custom"


# DICOM ViewPosition codes as a reader says them; frontal views first.
VIEW_NAMES = {"PA": "PA", "AP": "AP", "LL": "Lateral (LL)", "RL": "Lateral (RL)", "LAT": "Lateral"}
VIEW_ORDER = ("PA", "AP", "LL", "RL", "LAT")


def view_name(view: str) -> str:
    return VIEW_NAMES.get(view.upper(), view or "Image")


def view_rank(view: str) -> tuple[int, str]:
    code = view.upper()
    return (VIEW_ORDER.index(code) if code in VIEW_ORDER else len(VIEW_ORDER), code)


def _reset_viewer(hu_default: tuple[str, float, float]) -> None:
    for key, value in VIEWER_DEFAULTS.items():
        st.session_state[key] = value
    st.session_state["wl_preset"] = "File default"
    name, center, width = hu_default
    st.session_state["hu_preset"] = name
    st.session_state["hu_center"], st.session_state["hu_width"] = center, width


def _apply_preset(
    preset_key: str = "wl_preset",
    presets: dict[str, tuple[float, float]] = imaging.PRESETS,
    center_key: str = "wl_center",
    width_key: str = "wl_width",
) -> None:
    chosen = st.session_state.get(preset_key)
    if chosen in presets:
        st.session_state[center_key], st.session_state[width_key] = presets[chosen]


def _sync_preset(
    preset_key: str, presets: dict[str, tuple[float, float]], center_key: str, width_key: str
) -> None:
    """Make the preset box name the preset the sliders are at, or "Custom"."""
    current = (float(st.session_state[center_key]), float(st.session_state[width_key]))

    def at(cw: tuple[float, float]) -> bool:
        return abs(cw[0] - current[0]) < 1e-6 and abs(cw[1] - current[1]) < 1e-6

    chosen = st.session_state.get(preset_key)
    if chosen not in presets or not at(presets[chosen]):
        st.session_state[preset_key] = next((n for n, cw in presets.items() if at(cw)), CUSTOM)


def trust_meta(s: Settings, detail: data.PredictionDetail) -> dict[str, Any]:
    # Read per render (a small JSON), not through st.cache_data: the shared caches hold
    # content-addressed pixels only (tests/test_security.py keeps it so).
    return data.bundle_trust(s, detail.model_name, detail.model_version)


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
    if nxt.button("Next unreviewed", icon=":material/skip_next:", width="stretch"):
        # The worklist is read when asked for, not on every render of the study page.
        queue = [
            r.prediction_id
            for r in data.worklist(s, detail.bundle_hash, viewer=blind_viewer(reviewer))
            if r.status == "unreviewed" and r.prediction_id != detail.prediction_id
        ]
        if queue:
            st.session_state[OPEN_PREDICTION] = queue[0]
            st.rerun()
        st.toast("No other study is waiting for your review.", icon=":material/done_all:")


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
    image = detail.images[idx]
    hu_default = imaging.hu_default(image.windows)
    reset.button(
        "Reset",
        icon=":material/restart_alt:",
        on_click=_reset_viewer,
        args=(hu_default,),
        help="File default window (level 0.50, width 1.00; for CT the file's own window), "
        "heat-map opacity 0.40, no zoom",
    )
    pixels = imaging.load_display(s, image.cache_key)
    if pixels is None:
        st.error(
            "The display pixels of this image are not in the cache; re-run ingest for this "
            "study to restore them."
        )
        return
    # CT with its modality values cached: presets and sliders in Hounsfield units, applied to
    # those values; otherwise on the display scale of the cached pixels.
    hu = imaging.load_hounsfield(s, image.hu_cache_key)
    if hu is not None and hu.shape != pixels.shape:
        hu = None
    methods = data.saliency_files(s, detail.bundle_hash, image)
    stored = detail.explain_method or ""
    if image.saliency_file and stored not in methods:
        methods[stored] = image.saliency_file
    method = stored
    if len(methods) > 1:
        method = st.radio(
            "Heat-map method",
            options=sorted(methods, key=lambda m: (m != stored, m)),
            format_func=lambda m: METHOD_NAMES.get(m, m),
            horizontal=True,
            key=f"heat_method_{detail.prediction_id}",
        )
    heat = imaging.load_saliency(s, methods.get(method))

    p1, p2 = st.columns([3, 1], vertical_alignment="bottom")
    c1, c2, c3 = st.columns(3)
    if hu is not None:
        presets = imaging.hu_presets(image.windows)
        (lo_c, hi_c), (lo_w, hi_w) = _hu_preset_box(hu_default, presets, p1)
    else:
        _sync_preset("wl_preset", imaging.PRESETS, "wl_center", "wl_width")
        p1.selectbox(
            "Window preset",
            [*imaging.PRESETS, CUSTOM],
            key="wl_preset",
            on_change=_apply_preset,
            help="Presets on the display scale: the file's own window is level 0.50, width 1.00",
        )
    factor = p2.select_slider(
        "Zoom", options=[1.0, 1.5, 2.0, 3.0, 4.0], key="zoom", format_func=lambda z: f"{z:g}×"
    )
    if hu is not None:
        center = c1.slider(
            "Window level (center, HU)",
            lo_c,
            hi_c,
            step=1.0,
            key="hu_center",
            persist_state="session",
        )
        width = c2.slider(
            "Window width (HU)", lo_w, hi_w, step=1.0, key="hu_width", persist_state="session"
        )
    else:
        center = c1.slider(
            "Window level (center)", 0.0, 1.0, step=0.01, key="wl_center", persist_state="session"
        )
        width = c2.slider(
            "Window width",
            imaging.MIN_WIDTH,
            imaging.MAX_WIDTH,
            step=0.01,
            key="wl_width",
            persist_state="session",
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
    raw = imaging.plane(hu if hu is not None else pixels, slice_idx)
    # zoom (a crop), then reduce to the browser's size, then window and blend: the per-pixel
    # work is done on the pixels that are shown
    shown = imaging.reduce(imaging.zoom(raw, factor))
    if hu is not None:
        plane = imaging.window_hu(shown, center, width)
        window_text = f"window level {center:.0f} HU / width {width:.0f} HU"
    else:
        plane = imaging.window_level(shown, center, width)
        window_text = f"window level {center:.2f} / width {width:.2f}"
    heat_plane = imaging.plane(heat, slice_idx) if heat is not None else None
    if heat_plane is not None and heat_plane.shape == raw.shape:
        heat_plane = imaging.reduce(imaging.zoom(heat_plane, factor))

    zoomed = f", zoom {factor:g}×" if factor > 1 else ""
    left, right = st.columns(2)
    left.image(
        imaging.png(imaging.to_grey(plane)),
        caption=f"{view_name(image.view)}: original, {window_text}{zoomed}",
        width="stretch",
        output_format="PNG",
    )
    if heat_plane is None or heat_plane.shape != plane.shape:
        right.info("No heat map is stored for this image.")
        return
    name = METHOD_NAMES.get(method, method or "saliency")
    right.image(
        imaging.png(imaging.blend(plane, heat_plane, alpha)),
        caption=(
            f"{view_name(image.view)}: heat-map overlay, {name} for “{image.saliency_target}”, "
            f"opacity {alpha:.0%}"
        ),
        width="stretch",
        output_format="PNG",
    )
    st.caption(
        "The heat map shows where the model looked for its top finding; it is not a "
        "segmentation and does not prove the finding."
    )
    saliency_checks(s, detail, method)


def _hu_preset_box(
    default: tuple[str, float, float],
    presets: dict[str, tuple[float, float]],
    box: Any,
) -> tuple[tuple[float, float], tuple[float, float]]:
    """The preset box of a CT image in HU (its file's windows, then the CT presets), with the
    HU window (default: ``default``) kept inside the sliders' ranges, which it returns:
    ((center min, max), (width min, max)).

    The HU window has session keys of its own ("hu_preset", "hu_center", "hu_width"): its
    values mean nothing on the display scale, and the other way round. Like the display
    window, it follows the reviewer from CT study to CT study.
    """
    name, center, width = default
    st.session_state.setdefault("hu_center", center)
    st.session_state.setdefault("hu_width", width)
    (lo_c, hi_c), (lo_w, hi_w) = imaging.hu_ranges(presets)
    # a window carried over from another study may lie outside this one's slider range
    st.session_state["hu_center"] = min(max(float(st.session_state["hu_center"]), lo_c), hi_c)
    st.session_state["hu_width"] = min(max(float(st.session_state["hu_width"]), lo_w), hi_w)
    _sync_preset("hu_preset", presets, "hu_center", "hu_width")
    box.selectbox(
        "Window preset",
        [*presets, CUSTOM],
        key="hu_preset",
        on_change=_apply_preset,
        args=("hu_preset", presets, "hu_center", "hu_width"),
        help="In Hounsfield units: the file's own windows, then common CT windows "
        f"(Radiopaedia, “Windowing (CT)”). This image opens on “{name}”.",
    )
    return (lo_c, hi_c), (lo_w, hi_w)


def saliency_checks(s: Settings, detail: data.PredictionDetail, method: str) -> None:
    """What the bundle's sanity checks measured for the shown method (Adebayo, Petsiuk)."""
    checks = trust_meta(s, detail).get("saliency_checks") or {}
    m = (checks.get("methods") or {}).get(method)
    if not m:
        return
    name = METHOD_NAMES.get(method, method)

    def num(key: str) -> str:
        v = m.get(key)
        return "n/a" if v is None else f"{float(v):.2f}"

    with st.expander(f"Is the {name} map trustworthy? (sanity checks)", expanded=False):
        st.markdown(
            f"Maps depend on the model: rank correlation with a randomised model "
            f"**{num('randomized_model_rank_corr')}** (near 0 is good; near 1 means the map "
            f"shows the image, not the model).  \n"
            f"Deletion AUC **{num('deletion_auc')}** vs **{num('random_deletion_auc')}** for a "
            f"random map (lower is better); insertion AUC **{num('insertion_auc')}** vs "
            f"**{num('random_insertion_auc')}** (higher is better)."
        )
        st.caption(
            f"Measured on {checks.get('n_images', '?')} test images when the model was built."
        )
        if method == "gradcam" and (res := gradcam_resolution(checks)):
            st.markdown(res)


def gradcam_resolution(checks: dict[str, Any]) -> str | None:
    """What the Grad-CAM map can resolve: its layer's grid and the size of one cell in the
    model's input pixels (None for bundles that did not record it)."""
    info = checks.get("gradcam") or {}
    grid, size = info.get("grid"), info.get("input")
    if not grid or not size or len(grid) != len(size):
        return None
    cells = " × ".join(str(int(g)) for g in grid)
    cell_px = " × ".join(f"{int(s) / int(g):.0f}" for s, g in zip(size, grid, strict=True))
    model_px = " × ".join(str(int(v)) for v in size)
    return (
        f"Resolution: this Grad-CAM map has {cells} cells (layer `{info.get('layer', '?')}`), "
        f"one cell per {cell_px} px of the model's {model_px} px input, spread by upsampling. "
        "It shows the region the model used, not the outline of a finding smaller than a cell."
    )


def ood_warning(detail: data.PredictionDetail) -> None:
    if not detail.ood_flag:
        return
    ood = detail.ood or {}
    reasons = [str(r) for r in ood.get("reasons") or []] or ["unusual input"]
    lines = "\n".join(f"- {r}" for r in reasons)
    score = ood.get("score")
    thr = ood.get("threshold")
    detail_text = (
        f"\n\nOut-of-distribution score {float(score):.2f} (flagged above {float(thr):.2f})."
        if score is not None and thr is not None
        else ""
    )
    tail = (
        "The model's scores are not valid for this study; read it without them."
        if detail.scored
        else "The model did not score this study."
    )
    st.error(
        f"**Out of distribution: this study is unlike the studies the model was built on.** "
        f"{tail}\n\n{lines}{detail_text}",
        icon=":material/warning:",
    )


def closeness_text(case: dict[str, Any]) -> str:
    """How close a prior case is, in words that tell neighbours apart: "closer than 97% of
    training neighbours" (the stored percentile, see :mod:`workbench.posthoc.similar`); a prediction
    stored before percentiles existed shows its cosine similarity to 4 decimals."""
    closer = case.get("closer_than")
    if closer is not None:
        return f"closer than {probability_text(float(closer) / 100.0)} of training neighbours"
    return f"similarity {float(case.get('similarity', 0.0)):.4f}"


def similar_cases(s: Settings, detail: data.PredictionDetail) -> None:
    cases = [c for c in detail.similar if c.get("study_key")][:5]
    if not cases:
        return
    st.subheader("Similar prior cases")
    st.caption(
        "The most similar training studies (by the model's image embedding), nearest first. "
        "“Closer than 97% of training neighbours”: this pair is nearer than 97% of the pairs "
        "each training study forms with its own 5 nearest training studies."
    )
    keys = data.thumbnail_keys(s, [str(c["study_key"]) for c in cases])
    cols = st.columns(5)
    for col, case in zip(cols, cases, strict=False):
        key = str(case["study_key"])
        text = f"{key} · {case.get('label') or 'no label'} · {closeness_text(case)}"
        pixels = imaging.load_display(s, keys[key]) if key in keys else None
        if pixels is None:
            col.caption(text)
        else:
            col.image(
                imaging.png(imaging.thumbnail(pixels)),
                caption=text,
                width="stretch",
                output_format="PNG",
            )


def findings(s: Settings, detail: data.PredictionDetail) -> None:
    st.subheader("Model output")
    if not detail.scored:
        st.info("No scores: the model refused this study (see the warning above).")
        return
    if detail.ood_flag:
        with st.expander("Scores (not valid for this study)", expanded=False):
            scores(s, detail)
        return
    scores(s, detail)


def scores(s: Settings, detail: data.PredictionDetail) -> None:
    a, b = st.columns(2)
    a.metric("Top finding", detail.top_finding)
    b.metric("Calibrated probability", probability_text(detail.priority))
    st.markdown(f"Predicted label: **{detail.predicted_label}**")
    pset = data.set_text(detail.prediction_set, detail.predicted_label)
    if pset:
        st.markdown(pset)
    ranked = sorted(detail.probabilities.items(), key=lambda kv: -kv[1])
    top = {label for label, _ in detail.top_k}
    st.dataframe(
        styled(
            pd.DataFrame(
                {
                    "Class": [c for c, _ in ranked],
                    "Probability": [p for _, p in ranked],
                    "Top-k": ["✓" if c in top else "" for c, _ in ranked],
                }
            )
        ),
        hide_index=True,
        width="stretch",
        column_config={"Probability": st.column_config.NumberColumn("Probability")},
    )
    st.caption(
        f"Top-{len(detail.top_k)}: {format_top_k(detail.top_k)} (calibrated, study level). "
        + data.calibration_text(detail.calibration_map)
    )
    if len(detail.images) > 1:
        with st.expander("Per-view probabilities"):
            st.dataframe(
                pd.DataFrame(
                    [
                        {
                            "View": im.view,
                            **{c: probability_text(p) for c, p in im.probabilities.items()},
                        }
                        for im in detail.images
                    ]
                ),
                hide_index=True,
                width="stretch",
            )
    operating_points(s, detail)


def operating_points(s: Settings, detail: data.PredictionDetail) -> None:
    points = trust_meta(s, detail).get("operating_points") or {}
    per_class = points.get("classes") or {}
    rows = [(c, p, per_class[c]) for c, p in detail.probabilities.items() if c in per_class]
    if not rows:
        return
    target = points.get("target_sensitivity")

    def pct(v: Any) -> str:
        return probability_text(None if v is None else float(v))

    st.markdown(
        "**Operating points**"
        + (f" (thresholds set for {pct(target)} sensitivity)" if target is not None else "")
    )
    st.dataframe(
        pd.DataFrame(
            {
                "Class": [c for c, _, _ in rows],
                "Probability": [probability_text(p) for _, p, _ in rows],
                "Threshold": [probability_text(float(op["threshold"])) for _, _, op in rows],
                "Above": ["above" if p >= float(op["threshold"]) else "below" for _, p, op in rows],
                "Sensitivity": [pct(op.get("sensitivity")) for _, _, op in rows],
                "Specificity": [pct(op.get("specificity")) for _, _, op in rows],
            }
        ),
        hide_index=True,
        width="stretch",
    )
    st.caption("Sensitivity and specificity each threshold gave on the calibration split.")


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
    mine = review_store.reviews_for(s, detail.prediction_id, reviewer=reviewer.name)
    current = mine[0] if mine else None
    st.subheader("Your review" if current is None else f"Your review (version {current.version})")
    others = review_store.other_readers(s, detail.prediction_id, reviewer.name)
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
                saved = review_store.save_review(
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
            except review_store.ReviewError as err:
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
    reviews = review_store.reviews_for(s, detail.prediction_id, reviewer=viewer)
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
    ood_warning(detail)
    left, right = st.columns([3, 2], gap="large")
    with left:
        viewer(s, detail)
        similar_cases(s, detail)
    with right:
        findings(s, detail)
        review_form(s, reviewer, detail)
        history(s, reviewer, detail)


if __name__ == "__main__":
    main()
