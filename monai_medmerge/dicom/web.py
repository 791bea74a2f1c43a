"""DICOMweb as a source of training data: QIDO-RS search, WADO-RS retrieval into a local cache, MONAI datalists.

:class:`DICOMwebSource` wraps ``dicomweb_client.DICOMwebClient`` (``pip install monai_medmerge[dicomweb]``) with
basic or bearer-token authentication, retries with exponential backoff on transient failures, and a cache of
retrieved series laid out as MONAI's DICOM series readers want it::

    <cache_dir>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm      one file per instance
    <cache_dir>/<StudyInstanceUID>/.<SeriesInstanceUID>.complete.json            written last: the series is complete

Each instance is written under a temporary name outside the series folder and renamed into it, so the folder never
holds half a file; a series counts as complete only once its marker exists, and a rerun after an interruption asks
the server only for the SOP instances not yet on disk. Instances without pixel data (structured reports, presentation
states, a damaged upload) are left out of the folder and reported. The cache is private: folders ``0700``, files
``0600``. Downloads are limited per instance and per series (:data:`DEFAULT_MAX_INSTANCE_BYTES`,
:data:`DEFAULT_MAX_SERIES_BYTES`), counted while the bytes arrive.

Credentials never travel in the URL: a URL with ``user:password@`` is refused (give ``username``/``password`` or
``token``; on the command line the environment variables ``DICOMWEB_USER``, ``DICOMWEB_PASSWORD``, ``DICOMWEB_TOKEN``).

:func:`datalist_from_dicomweb` goes from "these labels" to a MONAI datalist of cached series folders, with the same
label joining as folders on disk (:mod:`monai_medmerge.dicom.labels`).

Logs, errors and reports name studies and series by UID only; patient names, patient IDs and accession numbers are
never written (a search filter on them travels to the server only).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from monai.utils import optional_import
from tqdm import tqdm

from monai_medmerge.dicom.labels import check_layout, filter_series, join_labels, read_labels, write_datalist
from monai_medmerge.io import atomic_write, write_json

__all__ = [
    "DEFAULT_MAX_INSTANCE_BYTES",
    "DEFAULT_MAX_SERIES_BYTES",
    "DICOMwebAuthError",
    "DICOMwebConnectionError",
    "DICOMwebError",
    "DICOMwebLimitError",
    "DICOMwebSource",
    "RECORD_FIELDS",
    "datalist_from_dicomweb",
    "default_cache_dir",
    "describe_error",
    "format_size",
    "parse_size",
    "redact_url",
    "retrieve_records",
]

logger = logging.getLogger(__name__)

# QIDO-RS attributes every series record is built from (the record format of monai_medmerge.dicom.labels).
RECORD_FIELDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesDescription",
    "AccessionNumber",
    "PatientID",
    "NumberOfSeriesRelatedInstances",
)
# Results asked for per QIDO-RS request.
QIDO_PAGE = 1000
# Accept the instance in the transfer syntax the server stores it in: no transcoding on the server.
MEDIA_TYPES = (("application/dicom", "*"),)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# A UID becomes a folder or file name: refuse anything that could leave the cache (UIDs are digits and dots;
# letters, '-' and '_' are let through for servers that use non-standard identifiers).
_SAFE_UID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,127}$")
# A value the server may match itself (QIDO-RS): nothing that URL-encodes or is a wildcard.
_QIDO_SAFE = re.compile(r"^[0-9A-Za-z._-]+$")
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_MAX_MESSAGE = 300
# Download limits: a larger instance or series is refused while it streams (None: no limit).
DEFAULT_MAX_INSTANCE_BYTES = 512 * 2**20
DEFAULT_MAX_SERIES_BYTES = 8 * 2**30
# The cache holds patient images: readable by its owner only.
CACHE_DIR_MODE = 0o700
CACHE_FILE_MODE = 0o600
# How much of an instance is kept while it streams, to name its SOPInstanceUID when it is refused.
_HEAD_BYTES = 64 * 1024
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class DICOMwebError(RuntimeError):
    """A DICOMweb request failed; the message names the server (without credentials) and the UIDs involved."""


class DICOMwebAuthError(DICOMwebError):
    """The server refused the credentials (HTTP 401 or 403). Not retried."""


class DICOMwebConnectionError(DICOMwebError):
    """The server could not be reached, or kept answering with a transient error, after every retry."""


class DICOMwebLimitError(DICOMwebError):
    """An instance or a series is larger than the download limit; nothing of the series is kept in the cache."""


def parse_size(text: str | int | None) -> int | None:
    """A size in bytes from ``"512MiB"``, ``"8GiB"``, ``"500MB"``, ``"1e6"`` or an int; ``"none"`` (or None) is
    no limit.

    Raises:
        ValueError: for anything else, or a size that is not positive.
    """
    if text is None or (isinstance(text, str) and text.strip().lower() in ("none", "unlimited")):
        return None
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    try:
        if not match or unit not in _SIZE_UNITS:
            raise ValueError
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    except ValueError:
        raise ValueError(
            f"{text!r} is not a size: give a number of bytes with a unit, e.g. 512MiB, 8GiB, 500MB, or none"
        ) from None
    if value <= 0:
        raise ValueError(f"a size limit must be positive, got {text!r} (none: no limit)")
    return value


def format_size(size: int) -> str:
    """``536870912`` -> ``"512 MiB"``: the largest binary unit that leaves at least 1."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            return f"{size / factor:.4g} {unit}"
    return f"{size} bytes"


def default_cache_dir() -> Path:
    """``$MEDMERGE_DICOMWEB_CACHE``, else ``$XDG_CACHE_HOME/monai_medmerge/dicomweb`` (``~/.cache/...``)."""
    if os.environ.get("MEDMERGE_DICOMWEB_CACHE"):
        return Path(os.environ["MEDMERGE_DICOMWEB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "monai_medmerge" / "dicomweb"


def redact_url(url: str) -> str:
    """``url`` without user name, password, query string and fragment: safe to log."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:  # not a number: possibly part of a password with a '/' in it; never echoed
        port = None
    if port:
        host = f"{host}:{port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _check_url(url: str) -> None:
    """Refuse a URL that carries credentials, or that is not ``http(s)://host[:port]/path``, without echoing
    anything that could be part of a password."""
    if not isinstance(url, str):
        raise ValueError(f"the DICOMweb URL must be a string, got {type(url).__name__}")
    parts = urlsplit(url.strip())
    if "@" in url:
        shown = f" ({parts.scheme}://{parts.hostname}...)" if parts.username is not None and parts.hostname else ""
        raise ValueError(
            f"the DICOMweb URL has a user name or password in it{shown}: credentials in a URL end up in logs, "
            "reports and request headers, so they are refused. Give the URL without 'user:password@' and the "
            "credentials apart: the environment variables DICOMWEB_USER and DICOMWEB_PASSWORD, or DICOMWEB_TOKEN, "
            "for the medmerge commands; DICOMwebSource(url, username=..., password=...) or token=... in Python"
        )
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ValueError(
            "the DICOMweb URL must look like http(s)://host[:port]/path, e.g. http://127.0.0.1:8042/dicom-web; "
            f"got one with scheme {parts.scheme!r}" + ("" if port_ok else " and a port that is not a number")
        )


def describe_error(error: BaseException) -> str:
    """``"<class>: <message>"`` for a report, with URLs cut at their query string (a search filter could carry an
    identifier) and long messages shortened."""
    text = " ".join(str(error).split())
    text = re.sub(r"(https?://[^\s?#]*)[?#]\S*", r"\1?...", text)
    text = re.sub(r"(https?://)[^/\s@]+@", r"\1", text)
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _status_code(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _safe_uid(uid: Any, what: str) -> str:
    text = str(uid).strip() if uid is not None else ""
    if not _SAFE_UID.match(text) or text.strip(".") == "":
        raise DICOMwebError(f"the server gave a {what} that cannot be a file name: {text[:80]!r}")
    return text


def _json_value(element: Mapping[str, Any] | None) -> Any:
    """The value of one DICOM JSON attribute: None when empty, a scalar for one value, else a list."""
    if not element:
        return None
    values = element.get("Value")
    if not values:
        return None
    out = []
    for value in values:
        if isinstance(value, Mapping):  # person name
            value = value.get("Alphabetic", "")
        out.append(value)
    return out[0] if len(out) == 1 else out


def _tag_of(keyword: str) -> str:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"{keyword!r} is not a DICOM attribute keyword (e.g. 'SeriesNumber', 'ImageType')")
    return f"{tag:08X}"


def _single_valued(keyword: str) -> bool:
    from pydicom.datadict import dictionary_VM

    try:
        return dictionary_VM(int(_tag_of(keyword), 16)) == "1"
    except KeyError:
        return False


def _has_pixels(dataset: Any) -> bool:
    return any(keyword in dataset for keyword in _PIXEL_KEYWORDS)


def _save_dataset(dataset: Any, path: Path, tmp_dir: Path) -> int:
    """Write the bytes the server sent when pydicom kept them (``FileDataset.buffer``, pydicom >= 3): verbatim, and
    about ten times faster than encoding the dataset again; else encode it as a DICOM file. The file is written in
    ``tmp_dir`` and renamed to ``path`` (owner-only); returns its size."""
    buffer = getattr(dataset, "buffer", None)
    with atomic_write(path, "wb", permissions=CACHE_FILE_MODE, tmp_dir=tmp_dir) as f:
        if buffer is not None and hasattr(buffer, "getvalue"):
            f.write(buffer.getvalue())
        else:
            try:
                dataset.save_as(f, enforce_file_format=True)
            except TypeError:  # pydicom < 3
                dataset.save_as(f, write_like_original=False)
    return path.stat().st_size


def _boundary(content_type: str) -> bytes | None:
    """The multipart boundary of a ``multipart/related`` Content-Type, else None."""
    media_type, *params = [p.strip() for p in content_type.split(";")]
    if media_type.lower() != "multipart/related":
        return None
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("latin-1")
    return None


def _sop_from_head(head: bytes) -> str | None:
    """The SOPInstanceUID in the first bytes of one multipart part (its headers, then DICOM), or None."""
    start = head.find(b"\r\n\r\n")
    if start < 0:
        return None
    try:
        import pydicom

        dataset = pydicom.dcmread(
            io.BytesIO(bytes(head[start + 4 :])), stop_before_pixels=True, force=True, specific_tags=["SOPInstanceUID"]
        )
        uid = str(dataset.get("SOPInstanceUID") or "")
    except Exception:  # noqa: BLE001 - a cut-off header names no UID; the message then counts instances instead
        return None
    return uid if _SAFE_UID.match(uid) else None


class _Budget:
    """The download limits of one series retrieval, and the bytes of the series on disk so far."""

    def __init__(self, study: str, series: str, max_instance: int | None, max_series: int | None, stored: int) -> None:
        self.study, self.series = study, series
        self.max_instance, self.max_series = max_instance, max_series
        self.stored = stored


class _MeteredBody:
    """A response body (``urllib3`` response) that counts the bytes read through it, per multipart part and in
    all, and stops the download the moment an instance or the series goes over its limit.

    ``requests`` reads bodies through ``stream()`` (``iter_content``, ``.content``), so the count happens as the
    bytes arrive, before ``dicomweb-client`` buffers or parses them.
    """

    def __init__(self, raw: Any, budget: _Budget, sop: str | None, boundary: bytes | None, source: Any) -> None:
        self._raw = raw
        self._budget = budget
        self._sop = sop
        self._delimiter = b"\r\n--" + boundary if boundary else None
        self._source = source
        self._start = budget.stored  # bytes of the series on disk when this request began
        self._total = 0
        self._part_start = 0
        self._part_index = 0
        self._head = bytearray()
        self._carry = b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def stream(self, amt: int | None = 2**16, decode_content: bool | None = None) -> Iterator[bytes]:
        for chunk in self._raw.stream(amt, decode_content=decode_content):
            self._count(chunk)
            yield chunk

    def read(self, *args: Any, **kwargs: Any) -> bytes:
        chunk = self._raw.read(*args, **kwargs)
        if chunk:
            self._count(chunk)
        return chunk

    def _keep_head(self, data: bytes) -> None:
        if len(self._head) < _HEAD_BYTES:
            self._head += data[: _HEAD_BYTES - len(self._head)]

    def _count(self, chunk: bytes) -> None:
        budget = self._budget
        self._total += len(chunk)
        self._source.received_bytes += len(chunk)
        self.check_series(self._start + self._total)
        if budget.max_instance is None:
            return
        if self._delimiter is None:
            self.check_instance(self._total)
            return
        buffer = self._carry + chunk
        offset = self._total - len(buffer)  # stream position of buffer[0]
        cursor = len(self._carry)
        found = buffer.find(self._delimiter)  # a whole delimiter never fits in the carry: each is new
        while found >= 0:
            self._keep_head(buffer[cursor:found])
            self.check_instance(offset + found - self._part_start)
            cursor = found + len(self._delimiter)
            self._part_start, self._part_index, self._head = offset + cursor, self._part_index + 1, bytearray()
            found = buffer.find(self._delimiter, cursor)
        self._keep_head(buffer[cursor:])
        self.check_instance(self._total - self._part_start)
        self._carry = bytes(buffer[-(len(self._delimiter) - 1) :])

    def check_series(self, size: int, how: str = "received when the download was stopped") -> None:
        budget = self._budget
        if budget.max_series is not None and size > budget.max_series:
            self._stop(
                f"series {budget.series} of study {budget.study} is larger than the maximum series size, "
                f"{format_size(budget.max_series)} (max_series_bytes; --max-series-size on the command line): "
                f"{format_size(size)} {how}"
            )

    def check_instance(self, size: int, how: str = "received when the download was stopped") -> None:
        budget = self._budget
        if budget.max_instance is None or size <= budget.max_instance:
            return
        sop = self._sop or _sop_from_head(bytes(self._head))
        which = f"instance {sop}" if sop else f"instance number {self._part_index + 1} of the series stream"
        self._stop(
            f"{which} of series {budget.series} of study {budget.study} is larger than the maximum instance size, "
            f"{format_size(budget.max_instance)} (max_instance_bytes; --max-instance-size on the command line): "
            f"{format_size(size)} {how}"
        )

    def _stop(self, message: str) -> None:
        try:
            self._raw.close()  # drop the connection: the rest of the body is not wanted
        finally:
            raise DICOMwebLimitError(message)


class DICOMwebSource:
    """A DICOMweb server (QIDO-RS and WADO-RS) with a local cache of retrieved series.

    Args:
        url: the DICOMweb base URL, e.g. ``http://127.0.0.1:8042/dicom-web`` for Orthanc.
        username: user for HTTP basic authentication (with ``password``).
        password: password for HTTP basic authentication.
        token: a bearer token (``Authorization: Bearer <token>``), instead of a user and password.
        retries: how many times a request is repeated after a transient failure (a connection error, a timeout, a
            broken stream, HTTP 408, 429 or 5xx) before giving up.
        backoff: seconds before the first retry; each further retry waits twice as long.
        timeout: seconds to wait for the server to connect or to send data, per request (> 0).
        cache_dir: the cache of retrieved series (made absolute); default :func:`default_cache_dir`.
        session: a ``requests.Session`` to use (for proxies, TLS settings or custom authentication); the
            credentials given here are set on it, and a response hook that meters retrievals is added to it.
        max_instance_bytes: the largest instance retrieved (default 512 MiB); None: no limit. A larger one stops
            its series' retrieval with :class:`DICOMwebLimitError` while it streams.
        max_series_bytes: the largest series retrieved, counting what is already in the cache (default 8 GiB);
            None: no limit.

    Raises:
        OptionalImportError: when ``dicomweb-client`` is not installed.
        ValueError: for a URL with credentials in it (``user:password@``; the message says where they go instead)
            or one that is not ``http(s)://host...``; both a token and a password, a password without a user,
            negative ``retries``/``backoff``, or a limit that is not a positive number of bytes.
    """

    def __init__(
        self,
        url: str,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        retries: int = 3,
        backoff: float = 0.5,
        timeout: float = 30,
        cache_dir: str | os.PathLike[str] | None = None,
        session: Any = None,
        max_instance_bytes: int | None = DEFAULT_MAX_INSTANCE_BYTES,
        max_series_bytes: int | None = DEFAULT_MAX_SERIES_BYTES,
    ) -> None:
        _check_url(url)  # first: nothing below may see, log or send a URL with a password in it
        for name, limit in (("max_instance_bytes", max_instance_bytes), ("max_series_bytes", max_series_bytes)):
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
                raise ValueError(f"{name} must be a positive number of bytes or None (no limit), got {limit!r}")
        web, has_web = optional_import("dicomweb_client.api", name="DICOMwebClient")
        if not has_web:
            from monai.utils import OptionalImportError

            raise OptionalImportError(
                "DICOMwebSource needs dicomweb-client: pip install dicomweb-client "
                "(or the extra monai_medmerge[dicomweb])"
            )
        import requests

        if token is not None and (username is not None or password is not None):
            raise ValueError("give either token or username and password, not both")
        if (username is None) != (password is None):
            raise ValueError("basic authentication needs both username and password")
        if int(retries) < 0 or float(backoff) < 0:
            raise ValueError(f"retries and backoff must be non-negative, got {retries!r} and {backoff!r}")
        if timeout is not None and not float(timeout) > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.url = url.rstrip("/")
        self.safe_url = redact_url(self.url)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.timeout = timeout
        # absolute: the paths in datalists and the inference subprocess must not depend on the working directory
        self.cache_dir = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()).resolve()
        self.session = session if session is not None else requests.Session()
        if username is not None:
            self.session.auth = (username, password)
        if token is not None:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.client = web(self.url, session=self.session, timeout=timeout)
        # retries are ours (they also cover connection errors and broken streams, which the client's do not)
        self.client.set_http_retry_params(retry=False)
        self.fetched_instances = 0  # instances received from the server by this object, for reports and tests
        self.received_bytes = 0  # bytes of WADO-RS responses received by this object
        self.max_instance_bytes = max_instance_bytes
        self.max_series_bytes = max_series_bytes
        self._active: tuple[_Budget, str | None] | None = None  # the retrieval being metered, if any
        self.session.hooks.setdefault("response", []).append(self._meter_response)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.safe_url!r}, cache_dir={str(self.cache_dir)!r})"

    # --- metering retrievals ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _metered(self, budget: _Budget, sop: str | None = None) -> Iterator[None]:
        """Meter the responses received inside the block against ``budget`` (one instance's when ``sop`` is given,
        else a series stream's)."""
        self._active = (budget, sop)
        try:
            yield
        finally:
            self._active = None

    def _meter_response(self, response: Any, *args: Any, **kwargs: Any) -> Any:
        """``requests`` response hook: called before the body is read; wraps it in a :class:`_MeteredBody`."""
        if self._active is None or response.status_code >= 300 or response.raw is None:
            return response
        budget, sop = self._active
        try:
            length = int(response.headers.get("Content-Length", ""))
        except ValueError:
            length = None
        metered = _MeteredBody(response.raw, budget, sop, _boundary(response.headers.get("Content-Type", "")), self)
        if length is not None:  # announced too large: refused before a byte of the body is read
            metered.check_series(budget.stored + length, "announced by the server")
            if sop is not None:
                metered.check_instance(length, "announced by the server")
        response.raw = metered
        return response

    # --- requests with retries --------------------------------------------------------------------------------------
    def _transient(self, error: BaseException) -> bool:
        import requests

        if isinstance(error, requests.HTTPError):
            return _status_code(error) in _TRANSIENT_STATUS
        return isinstance(error, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError))

    def _raise_known(self, error: BaseException, what: str) -> None:
        """Turn a non-transient HTTP error into a DICOMweb error; other errors pass through unchanged."""
        import requests

        if isinstance(error, requests.HTTPError):
            status = _status_code(error)
            if status in (401, 403):
                raise DICOMwebAuthError(
                    f"{self.safe_url} refused the credentials (HTTP {status}) for {what}: check the user name and "
                    "password or the token"
                ) from None
            if status is not None and status not in _TRANSIENT_STATUS:
                raise DICOMwebError(f"{self.safe_url} answered HTTP {status} for {what}") from None

    def _retry(self, what: str, call: Callable[[], Any], progress: Callable[[], int] | None = None) -> Any:
        """Run ``call`` until it succeeds, retrying transient failures with exponential backoff.

        ``progress``, when given, counts the work done so far; an attempt that made progress resets the count of
        failed attempts, so a long retrieval over a flaky link is not given up while it advances.
        """
        failures = 0
        done = progress() if progress is not None else 0
        while True:
            try:
                return call()
            except Exception as e:
                self._raise_known(e, what)
                if not self._transient(e):
                    raise
                now = progress() if progress is not None else 0
                if now > done:
                    failures, done = 0, now
                failures += 1
                if failures > self.retries:
                    status = _status_code(e)
                    failed = f"kept answering HTTP {status}" if status else f"could not be reached ({type(e).__name__})"
                    raise DICOMwebConnectionError(
                        f"{self.safe_url} {failed} for {what} after {self.retries} retries ({failures} attempts)"
                    ) from None
                delay = self.backoff * 2 ** (failures - 1)
                logger.warning(
                    "%s: %s failed (%s); retry %d of %d in %.2g s",
                    self.safe_url,
                    what,
                    _status_code(e) or type(e).__name__,
                    failures,
                    self.retries,
                    delay,
                )
                time.sleep(delay)

    # --- QIDO-RS ------------------------------------------------------------------------------------------------------
    def _search_pages(self, what: str, search: Callable[..., list], uid_keyword: str) -> list[dict]:
        """Every result of a QIDO-RS search, page by page (``limit``/``offset``), each page with retries.

        Not ``dicomweb-client``'s ``get_remaining``: it asks for pages until one is empty, and Orthanc 1.10 ignores
        ``offset`` in some searches (``ModalitiesInStudy``), answering every page with the same results, so that
        loop never ends. Here a page that adds no new UID ends the search too.
        """
        tag = _tag_of(uid_keyword)
        results: list[dict] = []
        seen: set[str] = set()
        offset = 0
        while True:
            page = self._retry(what, lambda offset=offset: search(limit=QIDO_PAGE, offset=offset))
            new = [item for item in page if str(_json_value(item.get(tag))) not in seen]
            if not new:
                return results
            seen.update(str(_json_value(item.get(tag))) for item in new)
            results.extend(new)
            offset += len(page)

    def search_studies(self, **filters: Any) -> list[str]:
        """The StudyInstanceUIDs of the studies that match QIDO-RS ``filters`` (keyword -> value), all pages.

        Args:
            filters: QIDO-RS matching at study level, e.g. ``StudyDate="20240101-20240131"``,
                ``ModalitiesInStudy="CT"``; ``*`` and ``?`` are wildcards. No filter: every study.

        Raises:
            DICOMwebAuthError, DICOMwebConnectionError, DICOMwebError: as for every request.
        """
        found = self._search_pages(
            "a study search",
            lambda **page: self.client.search_for_studies(
                fields=["StudyInstanceUID"], search_filters=dict(filters), **page
            ),
            "StudyInstanceUID",
        )
        uids = [_json_value(r.get(_tag_of("StudyInstanceUID"))) for r in found]
        return list(dict.fromkeys(str(u) for u in uids if u))

    def search_series(
        self,
        modality: str | Sequence[str] | None = None,
        series_description: str | None = None,
        study_uids: Sequence[str] | str | None = None,
        *,
        fields: Sequence[str] = (),
        **tags: Any,
    ) -> list[dict]:
        """Search series with QIDO-RS and describe each as a series record.

        The conditions mean what they mean for folder scans (:func:`~monai_medmerge.dicom.labels.filter_series`):
        ``series_description`` is a case-insensitive regular expression, a tag matches its value as a stripped
        string. They are checked here, on the search's results; the server is asked to narrow the search only where
        its QIDO-RS matching cannot disagree: the modality, and single-valued tags whose value is a plain word.
        (Servers differ in QIDO-RS matching: Orthanc 1.10 matches nothing for a URL-encoded ``*`` or space.)

        Args:
            modality: only series of this modality (``"CT"``) or of one of these, compared case-insensitively.
            series_description: a regular expression the SeriesDescription must contain (``"t1|mprage"``).
            study_uids: search within these studies only (one request each); None searches every series.
            fields: more attribute keywords to put into each record (e.g. ``["SeriesNumber", "ImageType"]``);
                the keywords of ``tags`` are included anyway.
            tags: more conditions, keyword -> value or list of accepted values (``SeriesNumber=3``,
                ``BodyPartExamined="CHEST"``).

        Returns:
            series records, one per series: ``StudyInstanceUID``, ``SeriesInstanceUID``, ``Modality``,
            ``SeriesDescription``, ``AccessionNumber``, ``PatientID`` (None when empty), ``num_instances``
            (``NumberOfSeriesRelatedInstances``, None when the server does not give it), ``path`` (None until
            :meth:`retrieve_series`) and the extra ``fields``.

        Raises:
            ValueError: for an unknown attribute keyword, or a bad regular expression or value.
            DICOMwebAuthError: when the server refuses the credentials.
            DICOMwebConnectionError: when the server cannot be reached after the retries.
            DICOMwebError: for any other refusal (HTTP 4xx).
        """
        extra = list(dict.fromkeys([*fields, *tags]))
        keywords = list(dict.fromkeys([*RECORD_FIELDS, *extra]))
        tag_ids = {k: _tag_of(k) for k in keywords}
        filters: dict[str, str] = {}
        if isinstance(modality, str) and _QIDO_SAFE.match(modality.strip()):
            filters["Modality"] = modality.strip().upper()
        for keyword, value in tags.items():
            if _single_valued(keyword) and isinstance(value, (str, int)) and _QIDO_SAFE.match(str(value).strip()):
                filters[keyword] = str(value).strip()
        if isinstance(study_uids, str):
            study_uids = [study_uids]
        studies: list[str | None] = list(dict.fromkeys(study_uids)) if study_uids is not None else [None]
        records: dict[str, dict] = {}
        for study in studies:
            what = f"a series search in study {study}" if study else "a series search"
            found = self._search_pages(
                what,
                lambda study=study, **page: self.client.search_for_series(
                    study_instance_uid=study, fields=keywords, search_filters=dict(filters), **page
                ),
                "SeriesInstanceUID",
            )
            for item in found:
                values = {k: _json_value(item.get(t)) for k, t in tag_ids.items()}
                series = values["SeriesInstanceUID"]
                if not series or not (values["StudyInstanceUID"] or study):
                    continue
                count = values["NumberOfSeriesRelatedInstances"]
                record = {
                    "StudyInstanceUID": str(values["StudyInstanceUID"] or study),
                    "SeriesInstanceUID": str(series),
                    "Modality": values["Modality"],
                    "SeriesDescription": values["SeriesDescription"],
                    "AccessionNumber": None if values["AccessionNumber"] is None else str(values["AccessionNumber"]),
                    "PatientID": None if values["PatientID"] is None else str(values["PatientID"]),
                    "num_instances": int(count) if count is not None else None,
                    "path": None,
                }
                for keyword in extra:
                    record.setdefault(keyword, values[keyword])
                records.setdefault(record["SeriesInstanceUID"], record)
        kept = filter_series(records.values(), modality=modality, series_description=series_description, tags=tags)
        logger.info("%s: %d series found, %d match", self.safe_url, len(records), len(kept))
        return kept

    def instance_uids(self, study_uid: str, series_uid: str) -> list[str]:
        """The SOPInstanceUIDs of a series (QIDO-RS), sorted by InstanceNumber where the server gives it."""
        found = self._search_pages(
            f"the instance list of series {series_uid}",
            lambda **page: self.client.search_for_instances(
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                fields=["SOPInstanceUID", "InstanceNumber"],
                **page,
            ),
            "SOPInstanceUID",
        )
        sop_tag, number_tag = _tag_of("SOPInstanceUID"), _tag_of("InstanceNumber")
        pairs = []
        for item in found:
            sop = _json_value(item.get(sop_tag))
            if sop:
                number = _json_value(item.get(number_tag))
                pairs.append((int(number) if isinstance(number, (int, float)) else 0, str(sop)))
        return list(dict.fromkeys(sop for _, sop in sorted(pairs)))

    # --- WADO-RS and the cache -------------------------------------------------------------------------------------
    def series_dir(self, record: Mapping[str, Any]) -> Path:
        """The cache folder of a series record: ``<cache_dir>/<StudyInstanceUID>/<SeriesInstanceUID>``."""
        study = _safe_uid(record.get("StudyInstanceUID"), "StudyInstanceUID")
        series = _safe_uid(record.get("SeriesInstanceUID"), "SeriesInstanceUID")
        return self.cache_dir / study / series

    def _marker(self, folder: Path) -> Path:
        return folder.parent / f".{folder.name}.complete.json"

    def _skipped_file(self, folder: Path) -> Path:
        return folder.parent / f".{folder.name}.skipped.json"

    def _partial_dir(self, folder: Path) -> Path:
        return folder.parent / ".partial" / folder.name

    def cached_series(self, record: Mapping[str, Any]) -> Path | None:
        """The series' cache folder when it is complete (its marker exists and lists files that are all there)."""
        folder = self.series_dir(record)
        marker = self._marker(folder)
        if not marker.is_file():
            return None
        try:
            content = json.loads(marker.read_text())
            instances = list(content["instances"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if all((folder / f"{sop}.dcm").is_file() for sop in instances):
            return folder
        return None

    def retrieve_series(self, record: dict) -> Path:
        """Retrieve every instance of a series (WADO-RS) into the cache, or only those missing from it.

        A complete series (its marker exists) is not asked for again. With nothing of the series on disk, the series
        is fetched in one streamed request, and counted against the search's ``num_instances``; otherwise, or when
        the count differs, the series' SOP instances are listed (QIDO-RS) and each one missing from the disk is
        fetched on its own. Every instance is written to a temporary file outside the series folder and renamed into
        it; an instance without pixel data is not written, and is reported. Transient failures are retried with
        backoff, each retry fetching only what is still missing. The marker (listing the instances written and those
        skipped) is written last.

        Args:
            record: a series record (needs ``StudyInstanceUID`` and ``SeriesInstanceUID``; ``num_instances`` saves a
                listing). On success its ``"path"`` is set to the folder and ``"skipped"`` to the instances left out
                (``{"SOPInstanceUID", "reason"}`` each).

        Returns:
            the series folder, ready for ``CheckedLoadImaged`` / ``LoadImaged`` with a series reader.

        Raises:
            DICOMwebAuthError: when the server refuses the credentials.
            DICOMwebConnectionError: when the server cannot be reached after the retries.
            DICOMwebError: for a refusal (HTTP 4xx), a series the server lists no instance of, or a series in which
                no instance has pixel data.
            DICOMwebLimitError: when an instance or the series is larger than ``max_instance_bytes`` or
                ``max_series_bytes`` (checked while it streams); what was written of the series is removed.
            Exception: whatever else a retrieval raised (the instances fetched before it stay in the cache).
        """
        folder = self.series_dir(record)
        study, series = folder.parent.name, folder.name
        if self.cached_series(record) is not None:
            content = json.loads(self._marker(folder).read_text())
            return self._finish(record, folder, content["instances"], content.get("skipped", []), fetched=0)
        partial = self._partial_dir(folder)
        self._private_dirs(folder)
        self._private_dirs(partial)
        for leftover in [*partial.glob("*.part"), *partial.glob(".*.tmp")]:  # an interrupted write: never complete
            leftover.unlink(missing_ok=True)
        skipped = self._load_skipped(folder)
        count = record.get("num_instances")
        listed: list[str] = []
        received: list[str] = []
        before = self.fetched_instances
        stored = sum(p.stat().st_size for p in folder.glob("*.dcm"))
        budget = _Budget(study, series, self.max_instance_bytes, self.max_series_bytes, stored)

        def done() -> set[str]:
            return {p.stem for p in folder.glob("*.dcm")} | {s["SOPInstanceUID"] for s in skipped}

        def fetch() -> None:
            have = done()
            if not have and not listed:
                with self._metered(budget):
                    for dataset in self.client.iter_series(study, series, media_types=MEDIA_TYPES):
                        received.append(self._store(dataset, folder, partial, skipped, budget=budget))
                if isinstance(count, int) and len(set(received)) == count:
                    listed.extend(dict.fromkeys(received))
                    return
                have = done()
            if not listed:
                listed.extend(self.instance_uids(study, series))
            for sop in [sop for sop in listed if sop not in have]:
                with self._metered(budget, sop):
                    dataset = self.client.retrieve_instance(study, series, sop, media_types=MEDIA_TYPES)
                self._store(dataset, folder, partial, skipped, sop, budget=budget)

        try:
            self._retry(f"series {series} of study {study}", fetch, progress=lambda: self.fetched_instances)
        except DICOMwebLimitError as e:
            # the series cannot be completed under these limits: keep no part of it
            self.clear_series(record)
            logger.warning("series %s of study %s: %s; removed from the cache", series, study, e)
            raise DICOMwebLimitError(f"{e}; nothing of the series is kept in the cache") from None
        if not listed:
            raise DICOMwebError(f"{self.safe_url} lists no instance in series {series} of study {study}")
        have = done()
        still = [sop for sop in listed if sop not in have]
        if still:
            raise DICOMwebError(
                f"{self.safe_url} did not send {len(still)} of the {len(listed)} instances of series {series} "
                f"of study {study} (first missing: {still[0]})"
            )
        present = {p.stem for p in folder.glob("*.dcm")}
        stale = sorted(present - set(listed))
        for sop in stale:  # cached earlier, no longer in the series on the server: the folder holds the series
            (folder / f"{sop}.dcm").unlink()
        if stale:
            logger.warning("series %s: %d cached instances no longer on the server removed", series, len(stale))
        instances = [sop for sop in listed if sop in present]
        marker = {
            "StudyInstanceUID": study,
            "SeriesInstanceUID": series,
            "source": self.safe_url,
            "retrieved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "instances": instances,
            "skipped": skipped,
        }
        write_json(self._marker(folder), marker, permissions=CACHE_FILE_MODE)  # last: the series is complete
        self._skipped_file(folder).unlink(missing_ok=True)
        for empty in (partial, partial.parent):
            try:
                empty.rmdir()
            except OSError:
                pass
        return self._finish(record, folder, instances, skipped, fetched=self.fetched_instances - before)

    def _private_dirs(self, folder: Path) -> None:
        """Create ``folder`` and the missing folders above it up to the cache folder, each readable by its owner
        only (``0700``, whatever the umask); the folders above the cache folder get the usual permissions."""
        self.cache_dir.parent.mkdir(parents=True, exist_ok=True)
        missing = []
        path = folder
        while not path.is_dir() and (path == self.cache_dir or self.cache_dir in path.parents):
            missing.append(path)
            path = path.parent
        for path in reversed(missing):
            try:
                path.mkdir(mode=CACHE_DIR_MODE)
            except FileExistsError:
                continue  # made meanwhile by another process
            os.chmod(path, CACHE_DIR_MODE)

    def _finish(self, record: dict, folder: Path, instances: list, skipped: list, fetched: int) -> Path:
        study, series = folder.parent.name, folder.name
        record["path"] = str(folder)
        record["skipped"] = list(skipped)
        logger.info(
            "series %s of study %s: %d instances in the cache (%d fetched now), %d without pixel data skipped",
            series,
            study,
            len(instances),
            fetched,
            len(skipped),
        )
        if not instances:
            raise DICOMwebError(
                f"series {series} of study {study} has no instance with pixel data ({len(skipped)} skipped)"
            )
        return folder

    def _load_skipped(self, folder: Path) -> list[dict]:
        path = self._skipped_file(folder)
        try:
            return list(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return []

    def _store(
        self,
        dataset: Any,
        folder: Path,
        partial: Path,
        skipped: list[dict],
        sop: str | None = None,
        budget: _Budget | None = None,
    ) -> str:
        """Write one retrieved instance into the series folder (or record it as skipped); returns its SOP UID."""
        self.fetched_instances += 1
        sop = _safe_uid(getattr(dataset, "SOPInstanceUID", None) or sop, "SOPInstanceUID")
        series = str(getattr(dataset, "SeriesInstanceUID", folder.name) or folder.name)
        if series != folder.name:
            raise DICOMwebError(f"{self.safe_url} sent instance {sop} of series {series[:80]} for series {folder.name}")
        if not _has_pixels(dataset):
            if sop not in {s["SOPInstanceUID"] for s in skipped}:
                skipped.append({"SOPInstanceUID": sop, "reason": "no pixel data"})
                write_json(self._skipped_file(folder), skipped, permissions=CACHE_FILE_MODE)
            logger.warning(
                "series %s of study %s: instance %s has no pixel data; skipped", folder.name, folder.parent.name, sop
            )
            return sop
        size = _save_dataset(dataset, folder / f"{sop}.dcm", tmp_dir=partial)
        if budget is not None:
            budget.stored += size
        return sop

    def clear_series(self, record: Mapping[str, Any]) -> None:
        """Remove a series from the cache (its folder, marker and any partial files)."""
        import shutil

        folder = self.series_dir(record)
        self._marker(folder).unlink(missing_ok=True)  # first: the series stops counting as complete
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(self._partial_dir(folder), ignore_errors=True)
        self._skipped_file(folder).unlink(missing_ok=True)
        try:
            self._partial_dir(folder).parent.rmdir()  # the study's .partial folder, when no other series uses it
        except OSError:
            pass


def _progress(items: Iterable[Any], show: bool, desc: str, total: int | None = None) -> Iterable[Any]:
    if not show:
        return items
    return tqdm(items, desc=desc, total=total, unit="series")


def retrieve_records(
    source: DICOMwebSource, records: Sequence[dict], progress: bool = False
) -> tuple[list[dict], list[dict], list[dict]]:
    """Retrieve series one after another; a failure is recorded and the others continue.

    Args:
        source: the server.
        records: series records; each retrieved one gets its ``"path"``.
        progress: show a progress bar.

    Returns:
        ``(retrieved, failed, skipped)``: the records retrieved; ``{"StudyInstanceUID", "SeriesInstanceUID",
        "error"}`` per failure (the error's class and message, without identifiers); ``{"StudyInstanceUID",
        "SeriesInstanceUID", "SOPInstanceUID", "reason"}`` per instance left out for lack of pixel data.

    Raises:
        DICOMwebAuthError: at once, since every other series would fail the same way.
    """
    retrieved, failed, skipped = [], [], []
    for record in _progress(records, progress, "retrieve", total=len(records)):
        study, series = record.get("StudyInstanceUID"), record.get("SeriesInstanceUID")
        try:
            source.retrieve_series(record)
        except DICOMwebAuthError:
            raise
        except Exception as e:
            error = describe_error(e)
            logger.warning("series %s of study %s not retrieved: %s", series, study, error)
            failed.append({"StudyInstanceUID": study, "SeriesInstanceUID": series, "error": error})
            continue
        finally:
            for item in record.get("skipped", []):
                skipped.append({"StudyInstanceUID": study, "SeriesInstanceUID": series, **item})
        retrieved.append(record)
    return retrieved, failed, skipped


def datalist_from_dicomweb(
    source: DICOMwebSource,
    labels_csv: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    key: str = "StudyInstanceUID",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    modality: str | Sequence[str] | None = None,
    series_description: str | None = None,
    tags: Mapping[str, Any] | None = None,
    split: Sequence[float] | None = None,
    seed: int = 0,
    section: str = "training",
    progress: bool = False,
) -> dict[str, Any]:
    """Build a MONAI datalist from labels and a DICOMweb server: search, join, retrieve into the cache, write.

    The series are found with QIDO-RS (per labelled study when ``key`` is ``StudyInstanceUID``, otherwise one
    search of every series), narrowed by :func:`~monai_medmerge.dicom.labels.filter_series` (the same rules as for
    folders: ``series_description`` is a case-insensitive regular expression) and joined with the labels by
    :func:`~monai_medmerge.dicom.labels.join_labels` (a study with several candidate series is reported, not
    guessed). The matched series are retrieved into ``source.cache_dir``; a series whose retrieval fails is
    reported and the others continue, and a rerun fetches only what is still missing. The datalist's images are the
    cached series folders.

    Args:
        source: the server and its cache.
        labels_csv: the labels CSV (see :func:`~monai_medmerge.dicom.labels.read_labels`).
        out_path: the datalist JSON to write; the report is written beside it as ``<stem>_report.json``.
        key: the CSV column and DICOM tag the labels are keyed by: ``StudyInstanceUID``, ``AccessionNumber`` or
            ``PatientID``.
        label_column: the CSV column of the labels.
        class_names: class names (labels may then be names); written into the datalist.
        modality: only series of this modality or these modalities.
        series_description: a regular expression the SeriesDescription must contain (case-insensitive).
        tags: more conditions, keyword -> value or list of values (the keywords are asked for in the search).
        split: fractions ``(train, val, test)``: split by study, stratified by label; None puts every item in
            ``section``.
        seed: the split's seed.
        section: the datalist section of every item when ``split`` is None.
        progress: show a progress bar while retrieving.

    Returns:
        the report (also written beside the datalist): the join's report (see
        :func:`~monai_medmerge.dicom.labels.join_labels`) plus ``"source"`` (the URL without credentials),
        ``"cache_dir"``, ``"datalist"``, ``"retrieved"`` (series), ``"fetched_instances"`` (instances received
        in this run), ``"failed"`` (``{"StudyInstanceUID", "SeriesInstanceUID", "error"}`` each) and
        ``"skipped_instances"`` (instances without pixel data).

    Raises:
        DICOMwebAuthError: when the server refuses the credentials.
        DICOMwebConnectionError: when the search cannot reach the server after the retries.
        ValueError: for a bad labels CSV, filter or class names (see ``read_labels`` and ``filter_series``), and
            for a bad ``split`` or ``section``, before anything is searched (``check_layout``).
    """
    check_layout(split, section)  # before any search or download
    labels = read_labels(labels_csv, key=key, label_column=label_column, class_names=class_names)
    # per labelled study when the labels name studies; otherwise every series (a search by accession number or
    # patient ID would put those identifiers into URLs and the client's debug log)
    study_uids = list(labels) if key == "StudyInstanceUID" else None
    records = []
    if study_uids != []:
        records = source.search_series(
            modality=modality, series_description=series_description, study_uids=study_uids, **dict(tags or {})
        )
    items, report = join_labels(records, labels, key=key)
    by_series = {r["SeriesInstanceUID"]: r for r in records}
    wanted = [by_series[item["SeriesInstanceUID"]] for item in items]
    fetched_before = source.fetched_instances
    retrieved, failed, skipped = retrieve_records(source, wanted, progress=progress)
    paths = {r["SeriesInstanceUID"]: r["path"] for r in retrieved}
    kept = [{**item, "image": paths[item["SeriesInstanceUID"]]} for item in items if item["SeriesInstanceUID"] in paths]
    report.update(
        {
            "source": source.safe_url,
            "cache_dir": str(source.cache_dir),
            "datalist": str(Path(out_path).expanduser()),
            "retrieved": len(retrieved),
            "fetched_instances": source.fetched_instances - fetched_before,
            "failed": failed,
            "skipped_instances": skipped,
        }
    )
    if not kept:
        logger.warning("no labelled series could be retrieved: the datalist %s is empty", out_path)
    write_datalist(kept, out_path, section=section, split=split, seed=seed, class_names=class_names, report=report)
    logger.info(
        "datalist from %s: %d series, %d failed, %d instances without pixel data skipped",
        source.safe_url,
        len(kept),
        len(failed),
        len(skipped),
    )
    return report
