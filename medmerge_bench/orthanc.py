"""A local Orthanc DICOM server started as a plain process, for tests, benchmarks and trying DICOMweb out.

:class:`OrthancServer` writes its own configuration (storage and index in one folder, HTTP on a free loopback port,
remote access off, authentication on, the DICOMweb plugin loaded, the DICOM port off unless asked for), starts
``Orthanc config.json``, waits until ``GET /system`` answers, and stops the process by its PID. Debian's packages
``orthanc`` and ``orthanc-dicomweb`` provide the executable and the plugin (``bash .ci/orthanc`` installs them).

Orthanc 1.10 has no option to bind to one address: ``"RemoteAccessAllowed": false`` is what keeps it local (it
refuses every request that does not come from the loopback interface).
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DICOMWEB_ROOT",
    "PLUGIN_DIRS",
    "OrthancError",
    "OrthancServer",
    "OrthancUnavailable",
    "find_dicomweb_plugin",
    "free_port",
]

DICOMWEB_ROOT = "/dicom-web/"
# Where distributions install Orthanc's plugins (Debian/Ubuntu first), searched in this order.
PLUGIN_DIRS = (
    "/usr/share/orthanc/plugins",
    "/usr/lib/orthanc",
    "/usr/local/share/orthanc/plugins",
    "/usr/lib/x86_64-linux-gnu/orthanc",
    "/usr/lib/aarch64-linux-gnu/orthanc",
    "/usr/local/lib/orthanc",
)
# Debian installs the executable in /usr/sbin, which is not on the PATH of unprivileged users.
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_INSTALL_HINT = "run `bash .ci/orthanc` (apt-get install -y orthanc orthanc-dicomweb)"
_LOG_TAIL = 3000


class OrthancUnavailable(RuntimeError):
    """Orthanc or its DICOMweb plugin is not installed here; the message says what to install."""


class OrthancError(RuntimeError):
    """Orthanc is installed but did not start, or refused a request; the message includes the tail of its log."""


def find_dicomweb_plugin(dirs: Sequence[str] = PLUGIN_DIRS) -> Path | None:
    """The DICOMweb plugin's shared library (``libOrthancDicomWeb.so``) in the first of ``dirs`` that holds it.

    Args:
        dirs: folders to search, in order; ``$MEDMERGE_ORTHANC_PLUGINS`` (a folder) is searched first when set.

    Returns:
        the library's path, or None when no folder holds it.
    """
    extra = os.environ.get("MEDMERGE_ORTHANC_PLUGINS")
    for folder in ([extra] if extra else []) + list(dirs):
        found = sorted(glob.glob(os.path.join(folder, "libOrthancDicomWeb.so*")))
        if found:
            return Path(found[0])
    return None


def _find_executable(executable: str) -> str | None:
    if os.sep in executable:
        return executable if os.access(executable, os.X_OK) else None
    found = shutil.which(executable)
    if found:
        return found
    for folder in _SBIN_DIRS:
        candidate = os.path.join(folder, executable)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _stop_with_parent() -> None:
    """In the child, before Orthanc starts (Linux): SIGTERM when the parent dies, even by SIGKILL or ``os._exit``,
    which skip ``stop()`` and ``atexit``; without it a killed test run leaves Orthanc running. (Linux ties this to
    the thread that started the server: start it from a thread that lives as long as the server.)"""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    """A TCP port that was free on the loopback interface a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OrthancServer:
    """An Orthanc server with its own configuration and storage, run as a child process.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. The REST API is at :attr:`url`, DICOMweb at
    :attr:`dicomweb_url`; every request needs HTTP basic authentication with ``username`` and ``password``.

    Args:
        storage_dir: folder for the configuration, the DICOM storage, the SQLite index and ``orthanc.log``.
        username: the one registered user.
        password: that user's password.
        http_port: HTTP port on loopback; None picks a free one.
        dicom_port: DICOM (DIMSE) port; None keeps the DICOM server off.
        executable: the Orthanc executable (looked up on the PATH, then in ``/usr/sbin``).
        plugin: the DICOMweb plugin library; None finds it (see :func:`find_dicomweb_plugin`).
        startup_timeout: seconds to wait for ``GET /system`` to answer.
        http_threads: Orthanc's HTTP worker threads.

    Raises:
        OrthancUnavailable: at construction, when the executable or the DICOMweb plugin is not installed.
    """

    def __init__(
        self,
        storage_dir: str | os.PathLike[str],
        username: str,
        password: str,
        http_port: int | None = None,
        dicom_port: int | None = None,
        executable: str = "Orthanc",
        plugin: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
        http_threads: int = 8,
    ) -> None:
        found = _find_executable(executable)
        if found is None:
            raise OrthancUnavailable(f"the Orthanc executable {executable!r} is not installed: {_INSTALL_HINT}")
        plugin_path = Path(plugin) if plugin is not None else find_dicomweb_plugin()
        if plugin_path is None or not plugin_path.is_file():
            where = str(plugin) if plugin is not None else ", ".join(PLUGIN_DIRS)
            raise OrthancUnavailable(
                f"the Orthanc DICOMweb plugin is not installed (looked in {where}): {_INSTALL_HINT}"
            )
        self.executable = found
        self.plugin = plugin_path
        self.storage_dir = Path(storage_dir).expanduser().resolve()
        self.username = username
        self.password = password
        self.fixed_port = http_port
        self.http_port = http_port
        self.dicom_port = dicom_port
        self.startup_timeout = float(startup_timeout)
        self.http_threads = int(http_threads)
        self.process: subprocess.Popen | None = None
        self._session: Any = None

    # --- paths and addresses ---------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.storage_dir / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.storage_dir / "orthanc.log"

    @property
    def url(self) -> str:
        """The REST API's base URL, ``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb base URL (QIDO-RS, WADO-RS, STOW-RS), ``http://127.0.0.1:<port>/dicom-web``."""
        return self.url + DICOMWEB_ROOT.rstrip("/")

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def configuration(self) -> dict[str, Any]:
        """The JSON configuration this server runs with."""
        data = str(self.storage_dir / "db")
        return {
            "Name": "monai_medmerge",
            "StorageDirectory": data,
            "IndexDirectory": data,
            "StorageCompression": False,
            "MaximumStorageCacheSize": 16,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpThreadsCount": self.http_threads,
            # no bind-address option in Orthanc 1.10: this keeps the server local
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "SslEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": self.dicom_port is not None,
            "DicomPort": self.dicom_port if self.dicom_port is not None else 4242,
            "DicomAet": "MEDMERGE",
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "StableAge": 1,
            "DeidentifyLogs": True,
            "LogExportedResources": False,
            "Plugins": [str(self.plugin)],
            "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT, "EnableWado": False, "Host": "127.0.0.1"},
        }

    # --- life cycle ------------------------------------------------------------------------------------------------
    def start(self) -> OrthancServer:
        """Write the configuration, start Orthanc and wait until it answers; a no-op when it already runs.

        Returns:
            self.

        Raises:
            OrthancError: when Orthanc exits or does not answer within ``startup_timeout`` (with the tail of its log).
            OrthancUnavailable: when Orthanc starts but the DICOMweb plugin did not load.
        """
        if self.running:
            return self
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        # a picked port can be taken between picking and binding: pick again (a fixed port is tried once)
        attempts = 1 if self.fixed_port is not None else 3
        for attempt in range(attempts):
            if self.fixed_port is None:
                self.http_port = free_port()
            try:
                self._launch()
                break
            except OrthancError:
                if attempt == attempts - 1 or self.running:
                    raise
        self._check_dicomweb()
        return self

    def _launch(self) -> None:
        self.config_path.write_text(json.dumps(self.configuration(), indent=2) + "\n")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.executable, str(self.config_path)],
                cwd=self.storage_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_stop_with_parent,
            )
        atexit.register(self.stop)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise OrthancError(f"Orthanc exited with code {code} while starting; its log ends:\n{self.log_tail()}")
            try:
                if self.get("/system", timeout=2).ok:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise OrthancError(
            f"Orthanc did not answer GET {self.url}/system within {self.startup_timeout:g} s; "
            f"its log ends:\n{self.log_tail()}"
        )

    def _check_dicomweb(self) -> None:
        plugins = self.get("/plugins").json()
        if "dicom-web" not in plugins:
            log = self.log_tail()
            self.stop()
            raise OrthancUnavailable(
                f"Orthanc started but the DICOMweb plugin {self.plugin} did not load (plugins: {plugins}): "
                f"{_INSTALL_HINT}; its log ends:\n{log}"
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Orthanc by its PID (SIGTERM, then SIGKILL after ``timeout`` seconds) and wait for it to exit."""
        process, self.process = self.process, None
        if self._session is not None:
            self._session.close()
            self._session = None
        if process is None or process.poll() is not None:
            return
        try:
            os.kill(process.pid, signal.SIGTERM)
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)
        except ProcessLookupError:
            pass

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log_tail(self, chars: int = _LOG_TAIL) -> str:
        """The last ``chars`` characters of Orthanc's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-chars:]

    # --- REST --------------------------------------------------------------------------------------------------------
    @property
    def session(self) -> Any:
        """A ``requests`` session with this server's credentials."""
        if self._session is None:
            import requests

            self._session = requests.Session()
            self._session.auth = (self.username, self.password)
        return self._session

    def get(self, path: str, timeout: float = 30, **kwargs: Any) -> Any:
        """``GET`` a path of the REST API (``/system``, ``/studies``, ...); returns the ``requests`` response."""
        return self.session.get(self.url + path, timeout=timeout, **kwargs)

    def system(self) -> dict[str, Any]:
        """``GET /system``: Orthanc's version, name, API version and ports."""
        response = self.get("/system")
        response.raise_for_status()
        return response.json()

    @property
    def version(self) -> str:
        return str(self.system().get("Version"))

    def dicomweb_version(self) -> str | None:
        """The DICOMweb plugin's version, from ``GET /plugins/dicom-web``."""
        response = self.get("/plugins/dicom-web")
        return response.json().get("Version") if response.ok else None

    def upload(self, paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[str]:
        """Store DICOM files through the REST API (``POST /instances``).

        Args:
            paths: DICOM files (or one file).

        Returns:
            Orthanc's instance ids, one per file, in order (an instance already stored keeps its id).

        Raises:
            OrthancError: when Orthanc refuses a file; the message names the file and Orthanc's answer.
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        ids = []
        for path in paths:
            data = Path(path).read_bytes()
            response = self.session.post(
                self.url + "/instances", data=data, headers={"Content-Type": "application/dicom"}, timeout=60
            )
            if not response.ok:
                raise OrthancError(f"Orthanc refused {path}: HTTP {response.status_code} {response.text[:300]}")
            ids.append(response.json()["ID"])
        return ids

    def clear(self) -> None:
        """Delete every patient (and so every study, series and instance) stored in this server."""
        for patient in self.get("/patients").json():
            self.session.delete(f"{self.url}/patients/{patient}", timeout=60).raise_for_status()
