"""A DICOMweb client for a PACS: QIDO-RS to find, WADO-RS to retrieve, STOW-RS to store results.

Built on ``dicomweb_client.DICOMwebClient``; this module adds what a workbench needs around it:
credentials from the environment or a private file (never the command line), a session with
basic auth, a timeout and urllib3 retries with exponential backoff, typed search results, and
one-line :class:`DicomwebError` messages (no PHI, no password) for the CLI to print.

Retrieved instances are written as DICOM Part-10 files named by a hash of their SOPInstanceUID,
in the transfer syntax the server stored them in (no transcoding, so the pixels are the PACS's).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from workbench.errors import WorkbenchError

logger = logging.getLogger(__name__)

ENV_USER = "WORKBENCH_DICOMWEB_USER"
ENV_PASSWORD = "WORKBENCH_DICOMWEB_PASSWORD"
ENV_CREDENTIALS_FILE = "WORKBENCH_DICOMWEB_CREDENTIALS"

RETRY_STATUSES = (502, 503, 504)
# Ask for every instance in the transfer syntax it is stored in: lossless, and no server-side
# transcoding whose decoder might differ from ours.
ORIGINAL_TRANSFER_SYNTAX = (("application/dicom", "*"),)
_DATE = re.compile(r"^\d{8}$")
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})

# QIDO-RS attributes, by tag as they appear in DICOM JSON
_STUDY_UID = "0020000D"
_SOP_UID = "00080018"
_N_STUDY_INSTANCES = "00201208"
_MODALITIES_IN_STUDY = "00080061"


class DicomwebError(WorkbenchError):
    """A user-facing DICOMweb problem, in one line without PHI or secrets.

    ``status`` is the HTTP status when the server answered one.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServerUnreachableError(DicomwebError):
    """The server could not be reached, timed out, or broke off a transfer."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never print the password, even in a debugger or a log
        return f"Credentials(username={self.username!r}, password='***')"


@dataclass(frozen=True)
class StudyRef:
    """A study as QIDO-RS lists it."""

    study_uid: str
    n_instances: int | None
    modalities: tuple[str, ...]


# --- credentials ----------------------------------------------------------------------------

#: The environment variables credentials come from (read by workbench.config).
CREDENTIAL_ENV = (ENV_USER, ENV_PASSWORD, ENV_CREDENTIALS_FILE)


def load_credentials(env: Mapping[str, str]) -> Credentials | None:
    """Credentials from the environment (``env``: ``config.environment_values(*CREDENTIAL_ENV)``),
    or None when none are configured.

    ``WORKBENCH_DICOMWEB_USER`` + ``WORKBENCH_DICOMWEB_PASSWORD`` win; otherwise
    ``WORKBENCH_DICOMWEB_CREDENTIALS`` names a file whose first line is ``user:password`` and
    which other users may not read. Credentials never come from the command line (they would
    show in ``ps`` and in shell history).
    """
    user, password = env.get(ENV_USER), env.get(ENV_PASSWORD)
    if user or password:
        if not (user and password):
            missing = ENV_PASSWORD if user else ENV_USER
            raise DicomwebError(f"{missing} is not set: set both {ENV_USER} and {ENV_PASSWORD}")
        return Credentials(user, password)
    path_text = env.get(ENV_CREDENTIALS_FILE)
    if not path_text:
        return None
    return _credentials_from_file(Path(path_text).expanduser())


def _credentials_from_file(path: Path) -> Credentials:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise DicomwebError(
            f"cannot open the credentials file {path} ({err.strerror or 'not readable'})"
        ) from None
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode  # of the file opened, not of a swapped path
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            raise DicomwebError(
                f"the credentials file {path} is readable or writable by every user; "
                f"restrict it with: chmod 600 {path}"
            )
        first = fh.readline(4096).decode("utf-8", errors="replace").rstrip("\r\n")
    user, sep, password = first.partition(":")
    if not (sep and user.strip() and password):
        # Say nothing about what the line holds: it may be the password.
        raise DicomwebError(f"the first line of the credentials file {path} must be user:password")
    return Credentials(user.strip(), password)


# --- the client -----------------------------------------------------------------------------


def uid_hash(uid: str) -> str:
    """A file or folder name for a DICOM UID that does not reveal it (sha256, 32 hex digits)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:32]


def _display_url(url: str) -> str:
    """The URL as messages show it: scheme, host, port and path, never a query or userinfo."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}".rstrip("/")


def connect(
    url: str,
    credentials: Credentials | None,
    timeout: float = 30,
    retries: int = 3,
    backoff: float = 0.5,
) -> DICOMwebClient:
    """A DICOMweb client for ``url`` (the service root, e.g. ``http://pacs:8042/dicom-web``).

    The session carries basic auth and retries connection failures and HTTP 502 / 503 / 504
    ``retries`` times with exponential backoff (``backoff`` × 2^n seconds); every request has a
    ``timeout`` in seconds. Nothing is sent until the first search or retrieve.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DicomwebError(f"not an http(s) URL: {_display_url(url) or url!r}")
    if parts.username or parts.password:
        raise DicomwebError(
            "put DICOMweb credentials in the environment "
            f"({ENV_USER} / {ENV_PASSWORD} or {ENV_CREDENTIALS_FILE}), not in the URL"
        )
    if parts.query or parts.fragment:
        raise DicomwebError(f"the DICOMweb URL takes no query or fragment: {_display_url(url)}")
    session = requests.Session()
    if credentials is not None:
        session.auth = (credentials.username, credentials.password)
        if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
            logger.warning("sending DICOMweb credentials without TLS to %s", parts.hostname)
    retry = Retry(
        total=retries,
        connect=retries,
        read=0,  # a read that timed out is not retried: the server may still be working on it
        status=retries,
        backoff_factor=backoff,
        status_forcelist=RETRY_STATUSES,
        raise_on_status=False,  # hand back the last answer, so its status reaches the message
        respect_retry_after_header=True,
    )
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    client = DICOMwebClient(url.rstrip("/"), session=session, timeout=timeout)
    # One retry policy, urllib3's: the library's own would multiply the attempts.
    client.set_http_retry_params(retry=False)
    return client


@contextmanager
def _translated(client: DICOMwebClient, doing: str) -> Iterator[None]:
    """Turn requests' and the library's exceptions into one-line DicomwebErrors.

    Messages carry the service URL without its query (which may hold a patient ID) and never
    the exception text of requests (which quotes the full URL).
    """
    where = _display_url(client.base_url)
    try:
        yield
    except requests.HTTPError as err:
        status = err.response.status_code if err.response is not None else None
        reason = (err.response.reason or "") if err.response is not None else ""
        if status in (401, 403):
            if client._session.auth is None:
                raise DicomwebError(
                    f"the server at {where} asks for credentials (HTTP {status}): set "
                    f"{ENV_USER} and {ENV_PASSWORD}, or {ENV_CREDENTIALS_FILE}",
                    status,
                ) from None
            raise DicomwebError(
                f"the server refused the credentials for {where} (HTTP {status})", status
            ) from None
        if status == 404:
            raise DicomwebError(f"{doing}: not found at {where} (HTTP 404)", status) from None
        if status in RETRY_STATUSES:
            raise ServerUnreachableError(
                f"{doing}: {where} is unavailable (HTTP {status} {reason})".rstrip(), status
            ) from None
        raise DicomwebError(
            f"{doing}: {where} answered HTTP {status} {reason}".rstrip(), status
        ) from None
    except requests.Timeout:
        raise ServerUnreachableError(
            f"{doing}: {where} did not answer within {client._timeout} s"
        ) from None
    except requests.ConnectionError:
        raise ServerUnreachableError(
            f"{doing}: cannot reach the DICOMweb server at {where}"
        ) from None
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError):
        raise ServerUnreachableError(
            f"{doing}: the connection to {where} broke off mid-transfer"
        ) from None
    except requests.RequestException as err:
        raise DicomwebError(f"{doing}: request to {where} failed ({type(err).__name__})") from None
    except (ValueError, KeyError, pydicom.errors.InvalidDicomError) as err:
        raise DicomwebError(
            f"{doing}: unexpected answer from {where} ({type(err).__name__})"
        ) from None


def _first(item: Mapping[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or []
    return values[0] if values else None


def _check_date(name: str, value: str | None) -> str:
    if value is None:
        return ""
    if not _DATE.match(value):
        raise DicomwebError(f"{name} must be a date as YYYYMMDD, not {value!r}")
    return value


def search_studies(
    client: DICOMwebClient,
    patient_id: str | None = None,
    study_uid: str | None = None,
    modality: str | None = None,
    date_from: str | None = None,
    date_to: str | None = None,
    limit: int | None = None,
) -> list[StudyRef]:
    """QIDO-RS: the studies that match every given filter, in the server's order.

    Dates are YYYYMMDD and inclusive; either end may be open. Without ``limit`` the search asks
    for every match in one request (paging with ``offset`` is unreliable on some servers when
    filtering on ModalitiesInStudy); a server that truncates says so in a logged warning.
    """
    filters: dict[str, str] = {}
    if patient_id:
        filters["PatientID"] = patient_id
    if study_uid:
        filters["StudyInstanceUID"] = study_uid
    if modality:
        filters["ModalitiesInStudy"] = modality.upper()
    lo, hi = _check_date("date_from", date_from), _check_date("date_to", date_to)
    if lo and hi and lo > hi:
        raise DicomwebError(f"the date range {lo}-{hi} is empty: date_from is after date_to")
    if lo or hi:
        filters["StudyDate"] = f"{lo}-{hi}"
    if limit is not None and limit < 1:
        raise DicomwebError("limit must be at least 1")
    with _translated(client, "searching for studies"):
        items = client.search_for_studies(
            search_filters=filters or None,
            fields=("NumberOfStudyRelatedInstances", "ModalitiesInStudy"),
            limit=limit,
        )
        refs: dict[str, StudyRef] = {}
        for item in items:
            uid = _first(item, _STUDY_UID)
            if not uid or uid in refs:
                continue
            n = _first(item, _N_STUDY_INSTANCES)
            modalities = tuple(str(m) for m in item.get(_MODALITIES_IN_STUDY, {}).get("Value", []))
            refs[str(uid)] = StudyRef(str(uid), int(n) if n is not None else None, modalities)
    return list(refs.values())[:limit] if limit else list(refs.values())


def count_instances(client: DICOMwebClient, study_uid: str) -> int:
    """QIDO-RS: how many instances the server holds for a study (for servers that do not
    report NumberOfStudyRelatedInstances)."""
    with _translated(client, "counting the instances of a study"):
        items = client.search_for_instances(study_instance_uid=study_uid, fields=(_SOP_UID,))
    return len({_first(item, _SOP_UID) for item in items} - {None})


def retrieve_study(client: DICOMwebClient, study_uid: str, dest: Path) -> int:
    """WADO-RS: write every instance of a study as a Part-10 file under ``dest``.

    Instances stream one at a time (memory holds one), keep the transfer syntax they are
    stored in, and are named ``<sha256 of SOPInstanceUID>.dcm``; each file appears whole
    (written aside, then renamed). Returns the number of distinct instances written.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()
    with _translated(client, "retrieving a study"):
        for ds in client.iter_study(study_uid, media_types=ORIGINAL_TRANSFER_SYNTAX):
            sop_uid = str(ds.get("SOPInstanceUID", "") or "")
            if not sop_uid:
                raise DicomwebError(
                    f"retrieving a study: {_display_url(client.base_url)} sent an instance "
                    "without a SOPInstanceUID"
                )
            name = f"{uid_hash(sop_uid)}.dcm"
            tmp = dest / f".{name}.tmp"
            ds.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, dest / name)
            written.add(name)
    return len(written)


@dataclass(frozen=True)
class StoreResult:
    """What the server says of a STOW-RS request: the SOPInstanceUIDs it stored."""

    stored: tuple[str, ...]


def store_instances(client: DICOMwebClient, datasets: Sequence[pydicom.Dataset]) -> StoreResult:
    """STOW-RS: store ``datasets`` (complete instances, each with its file meta) on the server.

    One request for all of them. Raises :class:`DicomwebError` when the request fails or when
    the server's answer lists any instance as failed (the message counts them and gives the
    first failure reason as the code the server sent, no UIDs). Connection failures are retried
    as for retrieval; a POST that reached the server is not sent again.
    """
    if not datasets:
        return StoreResult(())
    where = _display_url(client.base_url)
    with _translated(client, "storing instances"):
        answer = client.store_instances(list(datasets))
    failed = list(answer.get("FailedSOPSequence", None) or [])
    if failed:
        reason = failed[0].get("FailureReason")
        code = f" (failure reason 0x{int(reason):04X})" if reason is not None else ""
        raise DicomwebError(
            f"storing instances: {where} refused {len(failed)} of {len(datasets)}{code}"
        )
    stored = tuple(
        str(item.get("ReferencedSOPInstanceUID", ""))
        for item in answer.get("ReferencedSOPSequence", None) or []
    )
    asked = {str(ds.SOPInstanceUID) for ds in datasets}
    if stored and not asked <= set(stored):
        missing = len(asked - set(stored))
        raise DicomwebError(
            f"storing instances: {where} did not confirm {missing} of {len(datasets)} instances"
        )
    return StoreResult(stored or tuple(sorted(asked)))
