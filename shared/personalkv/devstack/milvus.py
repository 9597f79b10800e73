"""Start and stop a real Milvus standalone server from the PyPI package `milvus` (2.3.5).

Used by the Milvus test fixture (tests/plugins/milvus.py, once per session), the storage/index
benchmark and `make up`. Every server gets its own data dir and its own free loopback ports,
so several test runs (or engineers) on one machine never meet.

Why not ``milvus.MilvusServer`` as is: it listens on fixed default ports (19530, 9091 ...), its
embedded etcd always takes 2379/2380, it unpacks ~200 MB of binaries into every data dir, and
it kills the server one second after SIGTERM. Here the binaries are unpacked once into a
shared cache, every port (etcd's included, through an etcd config file) is chosen free, and
teardown waits for a clean exit before it kills.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field

from personalkv.devstack.process import terminate

#: The ports of one standalone server; every one must be free (the web port serves /healthz).
PORT_KEYS = (
    "proxy_port", "proxy_internal_port", "root_coord_port", "query_coord_port",
    "query_node_port", "index_coord_port", "index_node_port", "data_coord_port",
    "data_node_port", "etcd_port",
)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports the kernel calls free on 127.0.0.1 right now (held open together so
    they are distinct; a small race with other processes remains and shows as a start failure)."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _binary_dir() -> pathlib.Path:
    """Unpack the server binaries once per machine (the package ships them lzma-compressed)."""
    import milvus  # the optional `stack` extra

    from personalkv.config import DevstackSettings

    cache = (pathlib.Path(DevstackSettings().bin_cache).expanduser()
             / f"milvus-server-{milvus.__version__}")
    marker = cache / "bin" / ".complete"
    if not marker.exists():
        cache.mkdir(parents=True, exist_ok=True)
        milvus._initialize_data_files(str(cache))  # idempotent: md5-checked per file
        marker.touch()
    return cache / "bin"


@dataclass
class MilvusServer:
    """One `milvus run standalone` process; ``uri`` is what ``open_key_index`` takes."""

    data_dir: pathlib.Path
    ports: dict[str, int] = field(default_factory=dict)
    web_port: int = 0
    process: subprocess.Popen | None = None
    graceful_stop_s: int = 5
    #: proxy time tick (Milvus default 200 ms): a "Strong" read, and the first "Session" read
    #: after a write, wait for the next tick. Tests lower it; benchmarks keep the default.
    time_tick_ms: int | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy_port']}"

    def start(self, timeout_s: float = 180.0) -> "MilvusServer":
        import milvus

        self.data_dir = pathlib.Path(self.data_dir).resolve()
        bin_dir = _binary_dir()
        ports = free_ports(len(PORT_KEYS) + 2)
        self.ports = dict(zip(PORT_KEYS, ports))
        self.web_port, etcd_peer = ports[-2], ports[-1]
        config = milvus.MilvusServerConfig(data_dir=str(self.data_dir), **self.ports)
        # The default graceful stop waits up to 30 min; a dev server's data is disposable.
        config.set("common.gracefulStopTimeout", self.graceful_stop_s)
        if self.time_tick_ms:
            config.set("proxy.timeTickInterval", self.time_tick_ms)
        config.resolve()  # writes <data_dir>/configs/milvus.yaml
        self._point_embedded_etcd(etcd_peer)
        env = dict(os.environ)
        env.update(
            DEPLOY_MODE="STANDALONE",
            METRICS_PORT=str(self.web_port),
            MILVUS_RUN_DIR=str(self.data_dir / "run"),
            MILVUSCONF=str(self.data_dir / "configs"),
            LD_LIBRARY_PATH=f"{bin_dir}:{env.get('LD_LIBRARY_PATH', '')}",
        )
        log = open(self.data_dir / "logs" / "milvus-stdout.log", "ab")
        self.process = subprocess.Popen(
            [str(bin_dir / "milvus"), "run", "standalone"], cwd=self.data_dir, env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self._wait_healthy(timeout_s)
        return self

    def _point_embedded_etcd(self, peer_port: int) -> None:
        # The embedded etcd ignores `etcd.endpoints` for listening and would take 2379/2380;
        # an etcd config file moves it onto our own ports.
        client = f"http://127.0.0.1:{self.ports['etcd_port']}"
        peer = f"http://127.0.0.1:{peer_port}"
        etcd_yaml = self.data_dir / "configs" / "etcd.yaml"
        etcd_yaml.write_text(
            f"name: default\nlisten-client-urls: {client}\nadvertise-client-urls: {client}\n"
            f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
            f"initial-cluster: default={peer}\n"
        )
        milvus_yaml = self.data_dir / "configs" / "milvus.yaml"
        text = milvus_yaml.read_text()
        milvus_yaml.write_text(
            text.replace("\netcd:\n", f"\netcd:\n  config:\n    path: {etcd_yaml}\n", 1)
        )

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.web_port}/healthz"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"milvus exited with {self.process.returncode}; see {self.data_dir}/logs"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if b"OK" in resp.read():
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"milvus not healthy after {timeout_s}s; see {self.data_dir}/logs")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM, wait up to ``timeout_s`` (a loaded server flushes slowly), then SIGKILL.
        Idempotent."""
        proc, self.process = self.process, None
        terminate(proc, timeout_s)

    def __enter__(self) -> "MilvusServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_milvus_server(data_dir: str | os.PathLike, timeout_s: float = 180.0,
                        time_tick_ms: int | None = None) -> MilvusServer:
    """Start a server on free ports with its data under ``data_dir``; call ``.stop()`` after."""
    return MilvusServer(pathlib.Path(data_dir), time_tick_ms=time_tick_ms).start(timeout_s)


if __name__ == "__main__":  # `python -m personalkv.devstack.milvus DIR`: run until Ctrl-C
    import sys

    server = start_milvus_server(sys.argv[1] if len(sys.argv) > 1 else "var/milvus")
    print(server.uri, flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        server.stop()
