"""``make up`` / ``make down``: the whole PersonalKV stack as separate processes on loopback.

    python -m personalkv.devstack.stack up [--dir var/stack] [--personalkv CMD]   start (idempotent)
    python -m personalkv.devstack.stack status
    python -m personalkv.devstack.stack down                    stop what `up` started

Processes, in start order: redis-server (Celery broker), an S3 server (MinIO binary when on
PATH, else moto), a Milvus standalone server, the mining and caching Celery workers, and the
ingestion and answering gRPC servers; those four through the ``personalkv`` command
(``--personalkv``, default: the installed script beside this Python; ``make up`` passes
``python -m services.cli``, the same command). Each runs in its own session with its log in
``<dir>/<name>.log`` and its pid in ``<dir>/<name>.pid``; ``<dir>/env`` holds the
PERSONALKV_* settings every process got (the four of ours write their own log, rotated by
size, and their raw output to ``<name>.out``; the S3 and Milvus servers' pids are in
``s3-server.pid`` and ``milvus-server.pid``) (``set -a; . var/stack/env`` then
``personalkv ask --stack ...`` talks to the same store and index). ``down`` signals only the
process groups whose pid files it finds (and whose command line is ours), newest first.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ORDER = ["redis", "s3", "milvus", "worker-mining", "worker-caching", "ingestion", "answering"]
PY = sys.executable


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ours(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return _alive(pid)
    return any(mark in cmdline for mark in ("personalkv", "services.", "redis-server",
                                            "milvus run standalone", "moto.server", "minio server"))


def _pid(directory: Path, name: str) -> int | None:
    path = directory / f"{name}.pid"
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) and _ours(pid) else None


def _spawn(directory: Path, name: str, argv: list[str], env: dict, output: str = "log") -> subprocess.Popen:
    """Start ``name`` with its output in ``<name>.<output>`` (the previous run's kept as
    ``.1``)."""
    path = directory / f"{name}.{output}"
    if path.exists():  # keep the previous run's output as .1; this run's starts empty
        path.replace(directory / f"{name}.{output}.1")
    log = open(path, "ab")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    (directory / f"{name}.pid").write_text(str(proc.pid))
    return proc


def _wait_line(directory: Path, name: str, pattern: str, proc, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    log = directory / f"{name}.log"
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text(errors="replace")) if log.exists() else None
        if match:
            return match.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see {log}")
        time.sleep(0.2)
    raise TimeoutError(f"{name} not up after {timeout_s}s; see {log}")


def _wait_port(port: int, proc, name: str, directory: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see {directory}/{name}.log (and .out)")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{name} not listening on {port} after {timeout_s}s")


def installed_command() -> list[str]:
    """The installed ``personalkv`` script of this environment."""
    return [str(Path(sys.executable).with_name("personalkv"))]


def up(directory: Path, personalkv: list[str], milvus_timeout_s: float = 300.0,
       token_secret: str = "") -> int:
    """Start the stack; ``personalkv`` is the command line of the ``personalkv`` command that
    runs the workers and servers (``personalkv worker`` / ``personalkv serve``).
    ``token_secret``: the gRPC token secret the stack gets ('': a random one of its own)."""
    from personalkv.devstack.milvus import free_ports
    from personalkv.devstack.redis import REDIS_DURABILITY, redis_binary

    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    running = [n for n in ORDER if _pid(directory, n)]
    if running:
        print(f"already running: {', '.join(running)} (make down first)")
        return 0 if len(running) == len(ORDER) else 1
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    redis_port, s3_port, ing_port, ans_port, ing_m, ans_m = free_ports(6)

    proc = _spawn(directory, "redis", [redis_binary(), "--bind", "127.0.0.1", "--port",
                                       str(redis_port), "--dir", str(directory), "--save", "",
                                       *REDIS_DURABILITY], env)
    _wait_port(redis_port, proc, "redis", directory, 20)
    print(f"redis     redis://127.0.0.1:{redis_port}/0")

    proc = _spawn(directory, "s3", [PY, "-m", "personalkv.devstack.s3", "--port", str(s3_port),
                                    "--pid-file", str(directory / "s3-server.pid")], env)
    storage_url = _wait_line(directory, "s3", r"PERSONALKV_STORAGE_URL=(\S+)", proc, 60)
    s3_log = (directory / "s3.log").read_text()
    access = re.search(r"access key '([^']*)', secret '([^']*)'", s3_log)
    print(f"s3        {storage_url}")

    (directory / "milvus").mkdir(exist_ok=True)
    proc = _spawn(directory, "milvus", [PY, "-m", "personalkv.devstack.stack", "milvus-server",
                                        "--dir", str(directory)], env)
    index_uri = _wait_line(directory, "milvus", r"(http://127\.0\.0\.1:\d+)", proc, milvus_timeout_s)
    print(f"milvus    {index_uri}")

    settings_env = {
        "PERSONALKV_STORAGE_URL": storage_url,
        "PERSONALKV_INDEX_URI": index_uri,
        "PERSONALKV_CELERY_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "PERSONALKV_SERVER_INGESTION_PORT": str(ing_port),
        "PERSONALKV_SERVER_ANSWERING_PORT": str(ans_port),
        "PERSONALKV_SERVER_INGESTION_METRICS_PORT": str(ing_m),
        "PERSONALKV_SERVER_ANSWERING_METRICS_PORT": str(ans_m),
    }
    if access:
        settings_env.update(PERSONALKV_STORAGE_ACCESS_KEY=access.group(1),
                            PERSONALKV_STORAGE_SECRET_KEY=access.group(2))
    # A token secret of this stack's own (unless one is given): with the public development
    # default, anyone who read the source could mint tokens for it.
    settings_env["PERSONALKV_AUTH_SECRET"] = token_secret or secrets.token_urlsafe(32)
    settings_env["PERSONALKV_AUTH_REQUIRE_SECRET"] = "1"
    # Quoted: an S3 URL holds '&', which a shell sourcing the file would take as a command end.
    # Owner-only: it holds the token secret.
    env_file = directory / "env"
    env_file.touch(mode=0o600)
    env_file.chmod(0o600)
    env_file.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in settings_env.items()))
    env.update(settings_env)

    # Our processes write their log themselves, rotated by size (<name>.log, .log.1, ...:
    # ServerSettings.log_file*); <name>.out keeps what escapes logging (a crash at start).
    def ours(name: str, *args: str) -> subprocess.Popen:
        own = dict(env, PERSONALKV_SERVER_LOG_FILE=str(directory / f"{name}.log"))
        return _spawn(directory, name, [*personalkv, *args], own, output="out")

    for queue in ("mining", "caching"):
        ours(f"worker-{queue}", "worker", "--queue", queue)
    ingestion = ours("ingestion", "serve", "ingestion")
    answering = ours("answering", "serve", "answering")
    _wait_port(ing_port, ingestion, "ingestion", directory, 180)
    print(f"ingestion grpc 127.0.0.1:{ing_port}")
    _wait_port(ans_port, answering, "answering", directory, 300)
    print(f"answering grpc 127.0.0.1:{ans_port}")
    print(f"workers   mining, caching (logs in {directory})")
    print(f"settings  {directory / 'env'}  (set -a; . {directory / 'env'}; set +a)")
    return 0


def run_milvus(directory: Path) -> int:
    """The stack's Milvus: the server binary runs in a session of its own, so this wrapper
    stops it on SIGTERM and records its pid (``down`` kills it even if the wrapper died)."""
    from personalkv.devstack.milvus import start_milvus_server

    directory = directory.resolve()
    server = start_milvus_server(directory / "milvus")
    (directory / "milvus-server.pid").write_text(str(server.process.pid))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(server.uri, flush=True)
    try:
        server.process.wait()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.stop()
        (directory / "milvus-server.pid").unlink(missing_ok=True)
    return 0


def _stop_group(directory: Path, names: list[str], timeout_s: float) -> None:
    """SIGTERM every named process group at once, wait for all, SIGKILL the stragglers."""
    pids = {name: pid for name in names if (pid := _pid(directory, name)) is not None}
    for pid in pids.values():
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for name, pid in pids.items():
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        print(f"stopped {name} ({pid})")
    for name in names:
        (directory / f"{name}.pid").unlink(missing_ok=True)


def down(directory: Path, timeout_s: float = 30.0) -> int:
    """Services and workers first (together), then what they depend on (together)."""
    directory = directory.resolve()
    _stop_group(directory, ["answering", "ingestion", "worker-caching", "worker-mining"], timeout_s)
    _stop_group(directory, ["milvus", "s3", "redis"], timeout_s)
    _stop_group(directory, ["milvus-server", "s3-server"], timeout_s)  # if their wrappers died first
    return 0


def status(directory: Path) -> int:
    directory = directory.resolve()
    down_ = 0
    for name in ORDER:
        pid = _pid(directory, name)
        print(f"{name:15s} {'up (pid %d)' % pid if pid else 'down'}")
        down_ += pid is None
    return 1 if down_ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m personalkv.devstack.stack")
    parser.add_argument("command", choices=["up", "down", "status", "milvus-server"])
    parser.add_argument("--dir", type=Path, default=Path("var/stack"))
    parser.add_argument("--personalkv", type=shlex.split, default=None,
                        help="the personalkv command line (default: the installed script)")
    args = parser.parse_args(argv)
    if args.command == "up":
        from personalkv.config import AuthSettings

        # A secret given in the environment is kept; the public development default is not.
        auth = AuthSettings()
        given = auth.secret.get_secret_value() if "secret" in auth.model_fields_set else ""
        try:
            return up(args.dir, args.personalkv or installed_command(), token_secret=given)
        except Exception as exc:
            print(f"make up failed: {exc}; stopping what started", file=sys.stderr)
            down(args.dir)
            return 1
    return {"down": down, "status": status, "milvus-server": run_milvus}[args.command](args.dir)


if __name__ == "__main__":
    sys.exit(main())
