"""A real S3 HTTP server on a free loopback port, as a subprocess.

Used by the pytest fixture `s3_server` (tests/plugins/s3.py), by benchmarks and by `make up`
(`python -m personalkv.devstack.s3` keeps one running in the foreground). Prefers a `minio`
binary on PATH (the production server); falls back to moto's server mode, which speaks the
same S3 HTTP protocol in memory and is installed with the test extras.

    with S3Server() as s3:                       # or: server = S3Server(); ep = server.start()
        store = s3.endpoint.open_store("photos")  # an S3ObjectStore on a bucket of its own
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from personalkv.config import StorageSettings
from personalkv.devstack.process import terminate

ServerKind = Literal["auto", "minio", "moto"]
# Loopback: an http_proxy from the environment must not intercept the health check.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_HEALTH_PATH = {"minio": "/minio/health/live", "moto": "/moto-api/"}


@dataclass(frozen=True)
class S3Endpoint:
    """Where a running S3 server listens and how to log in to it."""

    host: str
    port: int
    access_key: str
    secret_key: str
    kind: str
    region: str = "us-east-1"

    @property
    def endpoint(self) -> str:
        """`host:port`, as the minio client and `?endpoint=` want it."""
        return f"{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.endpoint}"

    def store_url(self, bucket: str) -> str:
        """The `open_object_store` URL of `bucket` on this server."""
        return f"s3://{bucket}?endpoint={self.endpoint}&secure=false&region={self.region}"

    def settings(self, bucket: str) -> StorageSettings:
        """StorageSettings pointing at `bucket` on this server (for services under test)."""
        return StorageSettings(
            url=self.store_url(bucket), access_key=self.access_key,
            secret_key=self.secret_key, region=self.region,
        )  # fmt: skip

    def open_store(self, bucket: str, **kwargs):  # -> S3ObjectStore (lazy import: minio)
        from personalkv.storage.s3 import S3ObjectStore

        return S3ObjectStore(
            bucket, self.endpoint, self.access_key, self.secret_key, region=self.region, **kwargs
        )


def _die_with_parent() -> None:
    """preexec_fn: on Linux, SIGTERM the server when its parent dies (a pytest run killed
    with SIGKILL must not leave a server behind); elsewhere stop() is the only way."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the server may lose a race for it; start retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class S3Server:
    """Start/stop one S3 server subprocess. Not thread-safe; one owner per instance."""

    def __init__(
        self,
        kind: ServerKind = "auto",
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        access_key: str = "devstack",
        secret_key: str = "devstack-secret",  # minio wants >= 8 characters
        startup_timeout_s: float = 30.0,
    ) -> None:
        if kind == "auto":
            kind = "minio" if shutil.which("minio") else "moto"
        self.kind = kind
        self.host, self.port = host, port
        self.access_key, self.secret_key = access_key, secret_key
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self.endpoint: S3Endpoint | None = None

    def _command(self, port: int, data_dir: Path) -> list[str]:
        if self.kind == "minio":
            console = free_port(self.host)
            return ["minio", "server", str(data_dir), "--quiet", "--address", f"{self.host}:{port}",
                    "--console-address", f"{self.host}:{console}"]  # fmt: skip
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(port)]

    def start(self) -> S3Endpoint:
        """Start the server and block until it answers; return its endpoint."""
        if self.endpoint is not None:
            return self.endpoint
        self._workdir = tempfile.TemporaryDirectory(prefix=f"personalkv-{self.kind}-")
        workdir = Path(self._workdir.name)
        env = dict(os.environ, MINIO_ROOT_USER=self.access_key, MINIO_ROOT_PASSWORD=self.secret_key)
        attempts = 1 if self.port else 3  # a free port can be taken before the server binds it
        for _ in range(attempts):
            port = self.port or free_port(self.host)
            log = open(workdir / "server.log", "wb")
            self._proc = subprocess.Popen(
                self._command(port, workdir / "data"), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
            log.close()
            if self._wait_ready(port):
                self.endpoint = S3Endpoint(
                    self.host, port, self.access_key, self.secret_key, kind=self.kind
                )
                return self.endpoint
            self._terminate()
        log_tail = (workdir / "server.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"{self.kind} S3 server did not start; its log ends:\n{log_tail}")

    def _wait_ready(self, port: int) -> bool:
        url = f"http://{self.host}:{port}{_HEALTH_PATH[self.kind]}"
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False  # exited: port taken or bad install
            try:
                with _NO_PROXY.open(url, timeout=1.0) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        return False

    def _terminate(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        terminate(proc, timeout_s, kill_wait_s=timeout_s)

    @property
    def pid(self) -> int | None:
        """The server process's pid (not this wrapper's)."""
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after `timeout_s`) and remove its files."""
        self._terminate(timeout_s)
        self.endpoint = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m personalkv.devstack.s3`: run a server in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["auto", "minio", "moto"], default="auto")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--pid-file", type=Path, default=None,
                        help="write the server process's pid here (removed when it stops)")
    args = parser.parse_args(argv)
    # SIGTERM (from `make down`, docker, timeout) must also stop the child: it runs in its own
    # session so a terminal's Ctrl-C reaches only us, and we stop it on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with S3Server(args.kind, port=args.port) as server:
        if args.pid_file is not None:
            args.pid_file.write_text(str(server.pid))
        ep = server.endpoint
        print(f"{ep.kind} S3 at {ep.http_url}, access key {ep.access_key!r}, secret "
              f"{ep.secret_key!r}", flush=True)  # fmt: skip
        print(f"PERSONALKV_STORAGE_URL={ep.store_url('personalkv')}", flush=True)
        try:
            while server.running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            if args.pid_file is not None:
                args.pid_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
