"""A real PostgreSQL for tests, on loopback only, from the system's ``initdb`` and ``pg_ctl``.

``PostgresServer`` makes a throw-away cluster in a temporary folder of its own (``initdb`` with
one superuser and a random password, SCRAM authentication), starts it on a free 127.0.0.1 port
with its Unix socket inside that folder, and removes everything on ``stop``. PostgreSQL refuses
to run as root, so when the tests run as root the server runs as the ``postgres`` user
(``runuser -u postgres --``) in a folder chowned to it (pytest's own temp folders are private to
root, hence a folder of its own under the system temp dir).

Use :func:`postgres_server` as a context manager, or :func:`postgres_fixture` to make a pytest
fixture. Both skip the test (``pytest.skip``) when ``initdb`` is not installed.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

SUPERUSER = "workbench"
START_TIMEOUT_S = 60
SYSTEM_USER = "postgres"  # who runs the server when the tests run as root


def find_pg_bin() -> Path | None:
    """The folder with ``initdb`` and ``pg_ctl``: ``$PG_BIN``, ``PATH``, Debian's folders."""
    env = os.environ.get("PG_BIN")
    candidates = [env] if env else []
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(os.path.realpath(found)).parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for folder in candidates:
        if folder and all(os.access(Path(folder) / b, os.X_OK) for b in ("initdb", "pg_ctl")):
            return Path(folder)
    return None


def skip_unless_postgres() -> Path:
    folder = find_pg_bin()
    if folder is None:
        pytest.skip("PostgreSQL's initdb is not installed (apt-get install postgresql)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            pytest.skip(f"running as root and there is no {SYSTEM_USER!r} user to run PostgreSQL")
    return folder


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One throw-away PostgreSQL cluster; ``url(db)`` is a SQLAlchemy URL for psycopg 3."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.workdir = Path(tempfile.mkdtemp(prefix="workbench-pg-"))
        self.data = self.workdir / "data"
        self.log_path = self.workdir / "server.log"
        self.port = free_port()
        self.password = secrets.token_urlsafe(18)
        self._as_root = os.geteuid() == 0
        if self._as_root:
            ids = pwd.getpwnam(SYSTEM_USER)
            os.chown(self.workdir, ids.pw_uid, ids.pw_gid)
        os.chmod(self.workdir, 0o700)

    def _run(self, *args: str, timeout: float = START_TIMEOUT_S) -> None:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_root:
            cmd = ["runuser", "-u", SYSTEM_USER, "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.workdir)
        if r.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({r.returncode}): {r.stderr}\n{self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def start(self) -> None:
        pwfile = self.workdir / "pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.password + "\n")
        if self._as_root:
            ids = pwd.getpwnam(SYSTEM_USER)
            os.chown(pwfile, ids.pw_uid, ids.pw_gid)
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--pwfile",
                str(pwfile),
                "--auth",
                "scram-sha-256",
                "--encoding",
                "UTF8",
                "--no-instructions",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.workdir} "
            "-c max_connections=60 -c shared_buffers=32MB"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log_path),
            "-o",
            options,
            "-w",
            "-t",
            str(START_TIMEOUT_S),
            "start",
        )

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its folder."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; its SQLAlchemy URL."""
        import psycopg

        dsn = f"host=127.0.0.1 port={self.port} user={SUPERUSER} password={self.password} "
        with psycopg.connect(dsn + "dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A running PostgreSQL; stopped and removed on exit. Skips when PostgreSQL is missing."""
    server = PostgresServer(skip_unless_postgres())
    try:
        server.start()
        yield server
    finally:
        server.stop()


def postgres_fixture(scope: str = "function") -> Callable[..., Any]:
    """Make a pytest fixture that yields a running :class:`PostgresServer`.

    ``postgres = postgres_fixture("module")`` in a test module.
    """

    @pytest.fixture(scope=scope)  # type: ignore[call-overload]
    def _postgres() -> Iterator[PostgresServer]:
        with postgres_server() as server:
            yield server

    return _postgres  # type: ignore[no-any-return]
