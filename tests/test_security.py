"""Security checks that need no network: loopback by default, per-installation secrets kept out
of git, no passwords or secrets in the tracked files, no password on a command line.

(Five wrong passwords locking an account is tested in ``test_users.py`` through the API and in
``test_app.py`` through the app.)
"""

from __future__ import annotations

import re
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli
from workbench import cli
from workbench.cli import app as cli_app
from workbench.cli import demo as cli_demo
from workbench.config import cookie_secret

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::1", "localhost"}

# A literal assigned to something named like a password or secret: `password = "..."`.
ASSIGNED = re.compile(
    r"\b\w*(passw(or)?d|secret|api_?key|token)\w*\s*=\s*[rbf]?[\"']([^\"'{}]{4,})[\"']", re.I
)
ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]+")  # `X_PASSWORD = "WORKBENCH_X_PASSWORD"` names a variable
# The same in config files, where `key: value` is an assignment too.
CONFIG_ASSIGNED = re.compile(r"(passw(or)?d|secret|api_?key|token)\w*\"?\s*[:=]\s*\S", re.I)
CONFIG_SUFFIXES = {".toml", ".yaml", ".yml", ".json", ".ini", ".cfg", ".env", ".conf"}
KEY_MATERIAL = re.compile(
    "-----BEGIN [A-Z ]*PRIVATE " + "KEY-----|AKIA[0-9A-Z]{16}|cookie_?secret\\s*=\\s*\\S", re.I
)
# Files a workbench home holds that must never be committed.
SECRET_FILES = {"cookie.secret", "pseudonym.key", "workbench.db"}
FIXTURE_MARK = "test fixture"  # how a test marks a made-up password on the same line


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_the_app_listens_on_loopback_by_default() -> None:
    args = cli.build_parser().parse_args(["app"])
    assert args.address in LOOPBACK
    cmd = cli_app.streamlit_cmd(args.port, args.address)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    # `streamlit run streamlit_app.py` by hand reads the project's config: loopback too.
    config = (ROOT / ".streamlit" / "config.toml").read_text()
    assert re.search(r'^address\s*=\s*"127\.0\.0\.1"', config, re.M)
    # The demo opens the app the same way.
    assert 'address="127.0.0.1"' in Path(cli_demo.__file__).read_text().replace(" ", "")


def test_the_cookie_secret_is_per_installation_private_and_ignored_by_git(settings) -> None:
    first = cookie_secret(settings)
    assert len(first) >= 64 and cookie_secret(settings) == first
    path = settings.cookie_secret_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    other = settings.home.parent / "other-home"
    from tests.conftest import make_settings

    assert cookie_secret(make_settings(other)) != first
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "cookie.secret"], cwd=ROOT, timeout=30
    ).returncode
    assert ignored == 0, "cookie.secret in the workbench home must be ignored by git"


def test_no_secret_or_password_literal_in_the_tracked_files() -> None:
    found = []
    for path in tracked_files():
        rel = path.relative_to(ROOT)
        if path.name in SECRET_FILES or path.suffix in {".key", ".pem", ".secret"}:
            found.append(f"{rel}: a secret file is tracked")
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            assigned = ASSIGNED.search(line)
            if assigned and ENV_NAME.fullmatch(assigned.group(3)):
                assigned = None
            hit = KEY_MATERIAL.search(line) or assigned
            if path.suffix in CONFIG_SUFFIXES:
                hit = hit or CONFIG_ASSIGNED.search(line)
            if not hit:
                continue
            if rel.parts[0] == "tests" and FIXTURE_MARK in line:
                continue  # a made-up password for a test, marked as such
            found.append(f"{rel}:{n}: {line.strip()[:80]}")
    assert found == []


def test_the_secret_scan_would_find_a_password_and_a_cookie_secret() -> None:
    assert ASSIGNED.search('db_password = "hunter22"')  # test fixture
    assert ASSIGNED.search("SECRET_TOKEN='abcd1234'")  # test fixture
    assert not ASSIGNED.search("password = os.environ['X']")
    assert KEY_MATERIAL.search('cookieSecret = "e3b0c44298fc1c149afb"')  # test fixture
    assert CONFIG_ASSIGNED.search('password: "x"')


def test_a_password_cannot_be_given_on_the_command_line(tmp_path: Path) -> None:
    for args in (
        ["users", "add", "grey", "--role", "clinician", "--password", "x" * 12],
        ["users", "reset-password", "grey", "--password", "x" * 12],
    ):
        r = run_cli(args, tmp_path)
        assert r.returncode == 2 and "unrecognized arguments" in r.stderr
    text = "".join(p.read_text() for p in Path(cli.__file__).parent.glob("*.py"))
    assert "--password" not in text and "--cookie-secret" not in text
    # The app gets its cookie secret through the environment, never argv (visible in `ps`).
    assert "cookieSecret" not in " ".join(cli_app.streamlit_cmd(8501, "127.0.0.1"))


def test_only_pixel_files_are_cached_across_sessions() -> None:
    """st.cache_data / st.cache_resource are shared by every user of the server: only the
    content-addressed pixel loader may use them (no study facts, names or reviews)."""
    cached = []
    for path in sorted((ROOT / "workbench").rglob("*.py")):
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines):
            if re.match(r"\s*@st\.cache_(data|resource)", line):
                cached.append(f"{path.relative_to(ROOT)}:{lines[n + 1].strip()}")
    assert cached == ["workbench/ui/imaging.py:def _load(path: str) -> np.ndarray:"]
