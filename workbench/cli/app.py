"""The ``app`` command: the review app (Streamlit), on loopback unless asked otherwise."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from workbench.config import child_environment, cookie_secret, get_settings

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this group's commands to the parser."""
    s = sub.add_parser("app", help="start the review app (Streamlit)")
    s.add_argument("--port", type=int, default=8501)
    s.add_argument("--address", default="127.0.0.1")


def streamlit_cmd(port: int, address: str) -> list[str]:
    app = Path(__file__).resolve().parent.parent / "streamlit_app.py"
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.port",
        str(port),
        "--server.address",
        address,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
    ]


def cmd_app(a: argparse.Namespace) -> None:
    settings = get_settings()
    if a.address not in LOOPBACK:
        print(
            f"warning: the app listens on {a.address}, reachable from other machines; put it "
            "behind TLS",
            file=sys.stderr,
        )
    # The cookie secret goes through the environment, not argv (argv is visible in `ps`).
    env = child_environment({"STREAMLIT_SERVER_COOKIE_SECRET": cookie_secret(settings)})
    print(f"review app on http://{a.address}:{a.port} (Ctrl-C to stop)")
    subprocess.run(streamlit_cmd(a.port, a.address), check=False, env=env)


COMMANDS = {"app": cmd_app}
