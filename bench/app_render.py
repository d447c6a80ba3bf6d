"""Study page render time in a real browser: first open and warm (second) open, medians of rounds.

Each round starts a fresh ``streamlit run streamlit_app.py`` and a fresh Chromium (nothing warm
on either side), signs in, opens the top study of the worklist (first open), goes back to the
worklist and opens it again (warm open). Each open is timed from the click on "Open study" to
the heat-map overlay decoded, two ways:
  * wall: around Playwright's calls, as ``tests/test_app_browser.py`` prints it (it includes
    Playwright's checks before the click and the 20-500 ms intervals at which it polls);
  * page: in the page, from the click event to the decoded overlay (``performance.now()``).

The data is the browser test's: the demo cohort (300 studies at 256 px) with a model trained for
one epoch and its test split predicted with Grad-CAM (about 4 minutes on 2 cores to build;
``--home`` reuses a home built by an earlier run, ``--keep`` keeps the one built now).
Usage: ``python bench/app_render.py [--rounds 5] [--home DIR] [--keep DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# `tests` is not an installed package and `make bench` runs us without PYTHONPATH.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load() -> float:
    return os.getloadavg()[0]


def one_round(demo_home: Path, work: Path) -> dict[str, float]:
    from playwright.sync_api import expect, sync_playwright

    from tests.test_app_browser import (
        CHROMIUM,
        CHROMIUM_ARGS,
        back_on_worklist,
        served_app,
        sign_in,
        timed_open,
    )

    expect.set_options(timeout=60_000)
    with served_app(demo_home, work) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1300})
            page.set_default_timeout(60_000)
            page.goto(url)
            sign_in(page)
            _, first_s, first_ms = timed_open(page)
            page.get_by_role("button", name="Worklist").click()
            back_on_worklist(page)
            _, warm_s, warm_ms = timed_open(page)
        finally:
            browser.close()
    return {
        "first_wall_ms": first_s * 1000,
        "first_page_ms": first_ms,
        "warm_wall_ms": warm_s * 1000,
        "warm_page_ms": warm_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--home", type=Path, help="a demo home built by an earlier run")
    ap.add_argument("--keep", type=Path, help="build the demo home here and keep it")
    args = ap.parse_args()

    from tests.test_app_browser import CHROMIUM, build_demo_home

    if not CHROMIUM.exists():
        print(json.dumps({"skipped": f"no Chromium at {CHROMIUM}"}))
        return
    with tempfile.TemporaryDirectory(prefix="app-render-") as tmp:
        home = args.home or args.keep or Path(tmp) / "home"
        if args.home is None:
            started = time.perf_counter()
            build_demo_home(home)
            print(f"demo home built in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        rounds = []
        for n in range(args.rounds):
            before = load()
            result = one_round(home, Path(tempfile.mkdtemp(prefix=f"round{n}-", dir=tmp)))
            rounds.append({**result, "load_1min": before})
            print(json.dumps({k: round(v, 2) for k, v in rounds[-1].items()}), file=sys.stderr)
    keys = ("first_wall_ms", "first_page_ms", "warm_wall_ms", "warm_page_ms")
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()} {os.cpu_count()} cpus",
                "rounds": args.rounds,
                "load_1min": [round(r["load_1min"], 2) for r in rounds],
                **{f"median_{k}": round(statistics.median(r[k] for r in rounds)) for k in keys},
                **{k: [round(r[k]) for r in rounds] for k in keys},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
