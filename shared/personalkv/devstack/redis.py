"""A real redis-server (Debian package ``redis-server``) on a free loopback port, as a subprocess.

Used by the Celery test fixture (tests/plugins/redis.py) and by ``make up``
(``python -m personalkv.devstack.redis DIR [--port P]`` runs one in the foreground). Each server
gets its own directory and dies with its parent on Linux. Test servers keep nothing on disk
(``durable=False``: a restart loses every queued task, the worst case the reconciler must
handle); ``make up`` and the command run with REDIS_DURABILITY, the append-only file fsynced
every second, so a broker restart loses at most the last second of enqueued work.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from personalkv.devstack.process import terminate
from personalkv.devstack.s3 import _die_with_parent, free_port


#: redis-server options of a broker that keeps its queues across a restart (``make up``,
#: deploy/compose.yaml; docs/operations.md asks the same of an external Redis).
REDIS_DURABILITY = ("--appendonly", "yes", "--appendfsync", "everysec")


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise FileNotFoundError(
            "redis-server not found on PATH; install it (apt-get install -y redis-server)"
        )
    return path


@dataclass
class RedisServer:
    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    durable: bool = False
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> RedisServer:
        self.data_dir = Path(self.data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.host)
        log = open(self.data_dir / "redis.log", "ab")
        self.process = subprocess.Popen(
            [redis_binary(), "--bind", self.host, "--port", str(self.port), "--dir",
             str(self.data_dir), "--save", "", "--protected-mode", "no",
             *(REDIS_DURABILITY if self.durable else ("--appendonly", "no"))],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; "
                                   f"see {self.data_dir}/redis.log")
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server not answering on {self.port} after {timeout_s}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self.process = self.process, None
        terminate(proc, timeout_s, kill_wait_s=5)

    def __enter__(self) -> RedisServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m personalkv.devstack.redis")
    parser.add_argument("data_dir", nargs="?", default="var/redis")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = RedisServer(Path(args.data_dir), port=args.port, durable=True).start()
    print(server.url, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (server.stop(), sys.exit(0)))
    try:
        server.process.wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
