"""Typed settings, read from the environment (``WORKBENCH_*``).

The home folder holds everything the workbench writes: the SQLite catalog, the decoded-pixel
cache, the pseudonymisation key and (by default) the model bundles.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from workbench.errors import UsageError

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]

#: Every environment variable the workbench reads, and what for. Only this module reads the
#: environment (tests/test_cli.py checks that no other module does): Settings here, the
#: secrets and switches below through :func:`environment_value`.
ENVIRONMENT: dict[str, str] = {
    "WORKBENCH_HOME": "the home folder (catalog, cache, pseudonym key, models)",
    "WORKBENCH_DATABASE_URL": "the catalog database (default: SQLite in the home)",
    "WORKBENCH_MODELS": "the model bundles' folder",
    "WORKBENCH_CACHE": "the decoded-pixel cache's folder",
    "WORKBENCH_DEVICE": "auto | cpu | cuda",
    "WORKBENCH_PRECISION": "auto | bf16 | fp16 | fp32",
    "WORKBENCH_MAX_PIXEL_MB": "quarantine files declaring more pixel data than this",
    "WORKBENCH_FRAMES": "multi-frame files: volume | first | a frame index",
    "WORKBENCH_MAX_FAILED_SIGNINS": "wrong passwords in a row that lock an account",
    "WORKBENCH_LOCKOUT_MINUTES": "how long a locked account stays locked",
    "WORKBENCH_IDLE_MINUTES": "an idle app session is signed out after this",
    "WORKBENCH_PSEUDONYM_KEY": "the pseudonymisation key (default: a file in the home)",
    "WORKBENCH_DEBUG": "show the traceback of every error",
    "WORKBENCH_NEW_PASSWORD": "`workbench users add / reset-password` without a prompt",
    "WORKBENCH_DEMO_PASSWORD": "the demo account's password (default: a random one)",
    "WORKBENCH_DICOMWEB_USER": "DICOMweb basic-auth user",
    "WORKBENCH_DICOMWEB_PASSWORD": "DICOMweb basic-auth password",
    "WORKBENCH_DICOMWEB_CREDENTIALS": "a private file holding user:password for DICOMweb",
    "RANK": "set by torchrun: this process's rank",
    "LOCAL_RANK": "set by torchrun: this process's rank on its machine",
    "WORLD_SIZE": "set by torchrun: the number of processes",
}


def environment_value(name: str) -> str | None:
    """The value of one of the :data:`ENVIRONMENT` variables, or None when it is not set."""
    if name not in ENVIRONMENT:
        raise KeyError(f"{name} is not one of the workbench's environment variables")
    return os.environ.get(name)


def environment_values(*names: str) -> dict[str, str]:
    """The :data:`ENVIRONMENT` variables among ``names`` that are set."""
    return {n: v for n in names if (v := environment_value(n)) is not None}


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment to start a child process with (this one's, plus ``extra``)."""
    return {**os.environ, **extra}


def debug_enabled() -> bool:
    """WORKBENCH_DEBUG is set: errors show their traceback."""
    return bool(environment_value("WORKBENCH_DEBUG"))


#: Ceiling on one file's declared pixel data, MiB (WORKBENCH_MAX_PIXEL_MB, --max-pixel-mb).
DEFAULT_MAX_PIXEL_MB = 512

#: A site gets a calibration map of its own only with at least this many calibration studies
#: (see site_calibration.SiteCalibrator); `train --site-min-studies` changes it.
SITE_MIN_STUDIES = 30


@dataclass(frozen=True)
class Settings:
    """Where things live and how to compute. Build with :func:`get_settings`."""

    home: Path
    database_url: str
    models_dir: Path
    cache_dir: Path
    device: Device = "auto"
    precision: Precision = "auto"
    # Ceiling on one file's declared pixel data: larger files are quarantined (too_large)
    # before anything is allocated for them.
    max_pixel_mb: int = DEFAULT_MAX_PIXEL_MB
    # Multi-frame files at ingest: "volume" (every frame, one 3D array), "first", or a 0-based
    # frame index as text ("12"); a file without that frame is quarantined.
    frames: str = "volume"
    # Sign-in: this many wrong passwords in a row lock the account for lockout_minutes;
    # an app session idle for idle_minutes is signed out.
    max_failed_signins: int = 5
    lockout_minutes: float = 15.0
    idle_minutes: float = 30.0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def key_file(self) -> Path:
        return self.home / "pseudonym.key"

    @property
    def cookie_secret_file(self) -> Path:
        return self.home / "cookie.secret"


def get_settings() -> Settings:
    """Settings from the environment; defaults put everything under the current folder."""
    home = Path(os.environ.get("WORKBENCH_HOME", ".")).resolve()
    url = os.environ.get("WORKBENCH_DATABASE_URL") or f"sqlite:///{home / 'workbench.db'}"
    models = Path(os.environ.get("WORKBENCH_MODELS", home / "models")).resolve()
    cache = Path(os.environ.get("WORKBENCH_CACHE", home / "cache")).resolve()
    device = os.environ.get("WORKBENCH_DEVICE", "auto")
    precision = os.environ.get("WORKBENCH_PRECISION", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"WORKBENCH_DEVICE must be auto, cpu or cuda, not {device!r}")
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise UsageError(f"WORKBENCH_PRECISION must be auto, bf16, fp16 or fp32, not {precision!r}")
    try:
        max_pixel_mb = int(os.environ.get("WORKBENCH_MAX_PIXEL_MB", DEFAULT_MAX_PIXEL_MB))
    except ValueError as err:
        raise UsageError("WORKBENCH_MAX_PIXEL_MB must be a whole number of MiB") from err
    frames = os.environ.get("WORKBENCH_FRAMES", "volume")
    check_frames(frames)
    try:
        max_failed = int(os.environ.get("WORKBENCH_MAX_FAILED_SIGNINS", "5"))
        lockout = float(os.environ.get("WORKBENCH_LOCKOUT_MINUTES", "15"))
        idle = float(os.environ.get("WORKBENCH_IDLE_MINUTES", "30"))
    except ValueError as err:
        raise UsageError(
            "WORKBENCH_MAX_FAILED_SIGNINS, WORKBENCH_LOCKOUT_MINUTES and WORKBENCH_IDLE_MINUTES "
            "must be numbers"
        ) from err
    return Settings(
        home=home,
        database_url=url,
        models_dir=models,
        cache_dir=cache,
        device=device,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        max_pixel_mb=max_pixel_mb,
        frames=frames,
        max_failed_signins=max_failed,
        lockout_minutes=lockout,
        idle_minutes=idle,
    )


def check_frames(frames: str) -> str:
    """``frames`` if it is "volume", "first" or a frame index; otherwise ValueError."""
    if frames in ("volume", "first") or (frames.isdigit() and frames.isascii()):
        return frames
    raise UsageError(f"frames must be volume, first or a 0-based frame index, not {frames!r}")


def _secret_file(path: Path) -> bytes:
    """A random secret kept (mode 0600) at ``path``, generated the first time it is asked for."""
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


def cookie_secret(settings: Settings) -> str:
    """The app's cookie-signing secret: random, per installation, in the home (never committed)."""
    return _secret_file(settings.cookie_secret_file).decode()


def pseudonym_key(settings: Settings) -> bytes:
    """The installation's secret key for keyed-hash pseudonyms.

    ``WORKBENCH_PSEUDONYM_KEY`` wins; otherwise a random key is generated once per installation
    and kept (mode 0600) in the home folder. It is never committed (the home's files are ignored).
    """
    env = os.environ.get("WORKBENCH_PSEUDONYM_KEY")
    if env:
        return env.encode()
    return _secret_file(settings.key_file)
