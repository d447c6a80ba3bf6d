"""A real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) for tests, on loopback only.

``OrthancServer`` writes a JSON config into a folder of its own (HTTP on a free 127.0.0.1 port,
basic auth with one random password, storage and index inside the folder, the DICOMweb plugin
at ``/dicom-web/``), starts ``Orthanc <config>`` as a subprocess and waits until ``GET /system``
answers. It can be killed (to simulate a server that dies) and started again on the same storage.

Use :func:`orthanc_server` as a context manager, or :func:`orthanc_fixture` to make a pytest
fixture. Both skip the test (``pytest.skip``) when the binary or the plugin is not installed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pytest
import requests

USER = "workbench"
START_TIMEOUT_S = 30.0
BINARY_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)


def find_orthanc() -> str | None:
    """The Orthanc binary: ``$ORTHANC_BINARY``, then ``PATH``, then Debian's ``/usr/sbin``."""
    env = os.environ.get("ORTHANC_BINARY")
    if env:
        return env if os.access(env, os.X_OK) else None
    found = shutil.which("Orthanc")
    if found:
        return found
    return next((p for p in BINARY_CANDIDATES if os.access(p, os.X_OK)), None)


def find_dicomweb_plugin() -> str | None:
    """The DICOMweb plugin: ``$ORTHANC_DICOMWEB_PLUGIN``, then Debian's paths."""
    env = os.environ.get("ORTHANC_DICOMWEB_PLUGIN")
    if env:
        return env if Path(env).is_file() else None
    return next((p for p in PLUGIN_CANDIDATES if Path(p).is_file()), None)


def skip_unless_orthanc() -> tuple[str, str]:
    """(binary, plugin), or skip the calling test with the reason."""
    binary, plugin = find_orthanc(), find_dicomweb_plugin()
    if binary is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    if plugin is None:
        pytest.skip(
            "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
        )
    return binary, plugin


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OrthancServer:
    """One Orthanc with its config and storage in ``workdir``; ports stay fixed across restarts."""

    def __init__(self, workdir: Path, binary: str, plugin: str) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = binary
        self.user = USER
        self.password = secrets.token_urlsafe(18)
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        config: dict[str, Any] = {
            "Name": "workbench-test",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "HttpThreadsCount": 4,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "StorageCompression": False,
            "OverwriteInstances": False,
            "HttpDescribeErrors": False,
        }
        # The config holds the password: keep it to its owner.
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(config, fh, indent=1)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.base_url}/dicom-web"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as ``(base_url, user, password, process)``."""
        return iter((self.base_url, self.user, self.password, self.process))

    def log_tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [self.binary, str(self.config_path)],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                r = requests.get(
                    f"{self.base_url}/system", auth=(self.user, self.password), timeout=2
                )
                if r.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL this Orthanc (by its PID): a server that dies without warning."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._close_log()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM this Orthanc (by its PID), then SIGKILL if it lingers."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._close_log()

    def restart(self) -> None:
        self.stop()
        self.start()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


@contextmanager
def orthanc_server(workdir: Path) -> Iterator[OrthancServer]:
    """A running Orthanc in ``workdir``; stopped on exit. Skips when Orthanc is missing."""
    binary, plugin = skip_unless_orthanc()
    server = OrthancServer(workdir, binary, plugin)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def orthanc_fixture(scope: str = "function") -> Callable[..., Any]:
    """Make a pytest fixture that yields a running :class:`OrthancServer`.

    ``orthanc = orthanc_fixture()`` in a test module (or ``scope="module"`` to share one).
    """

    @pytest.fixture(scope=scope)  # type: ignore[call-overload]
    def _orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
        with orthanc_server(tmp_path_factory.mktemp("orthanc")) as server:
            yield server

    return _orthanc  # type: ignore[no-any-return]
