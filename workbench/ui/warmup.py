"""Work the app does once per server process, on its first script run, so that no reviewer's
click pays for it."""

from __future__ import annotations

import functools
import gc


@functools.cache
def settle_imports() -> None:
    """Move everything the imports created (the page modules, pandas, SQLAlchemy, NumPy,
    Streamlit itself: some 150,000 objects) out of the garbage collector's sight.

    Streamlit runs a full collection after every script run (``runner.postScriptGC``), on the
    script thread and holding the GIL: about 0.1 s on a 2-core machine with these imports,
    twice per click that changes page (the run the click stops, then the new page), while the
    server cannot send the page's images. Those objects live as long as the process anyway;
    frozen (:func:`gc.freeze`), a collection only walks what the runs themselves create.
    """
    gc.collect()
    gc.freeze()
