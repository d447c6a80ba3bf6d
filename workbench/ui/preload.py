"""Get the browser ready for the study page while the reviewer signs in.

Streamlit's frontend loads the code of most widget kinds lazily: a JavaScript module per kind
(``Slider.<hash>.js``, ``ImageList...``), imported the first time a page shows a widget of that
kind, behind a React ``Suspense`` boundary per element. The study page is the first page to
show sliders, images, metrics and a text area, so its first open waited for those modules to be
fetched, parsed and run, and then for React to reveal the suspended elements (React 18 holds
back the reveal of a suspended boundary for up to 500 ms after a fallback was shown). Importing
the modules ahead of time is not enough: React resolves a lazy component only by rendering it.

So the sign-in page renders one widget of each of those kinds in a container that CSS hides
(``display: none``: not shown, not focusable, not in the accessibility tree; Streamlit gives a
keyed container the class ``st-key-<key>``). By the time the reviewer has signed in, the
browser holds every module the study page needs and React has rendered each kind once. The
widgets are disabled, hold no data and are never read; only Streamlit's own code is loaded, so
nothing here depends on the user.
"""

from __future__ import annotations

import streamlit as st

#: The hidden container's key (and so its CSS class, ``st-key-review_widget_preload``).
PRELOAD_KEY = "review_widget_preload"
#: A 1 x 1 grey PNG: the smallest image that makes the frontend load its image component.
_PIXEL_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010800000000"
    "3a7e9b550000000a49444154789c636800000082008177cd72b60000000049454e44ae426082"
)


def preload_review_widgets() -> None:
    """Render, hidden, one widget of each kind the study page uses and earlier pages do not:
    slider and select slider, image, metric, text area."""
    st.html(f"<style>.st-key-{PRELOAD_KEY} {{ display: none !important; }}</style>")
    with st.container(key=PRELOAD_KEY):
        st.slider(
            "Preload slider",
            key=f"{PRELOAD_KEY}_slider",
            disabled=True,
            label_visibility="collapsed",
        )
        st.select_slider(
            "Preload select slider",
            options=(0, 1),
            key=f"{PRELOAD_KEY}_select_slider",
            disabled=True,
            label_visibility="collapsed",
        )
        st.image(_PIXEL_PNG, output_format="PNG")
        st.metric("Preload metric", 0, label_visibility="collapsed")
        st.text_area(
            "Preload text area",
            key=f"{PRELOAD_KEY}_text_area",
            disabled=True,
            label_visibility="collapsed",
        )
