"""`make up` / `make down`: the stack as separate processes; a concept goes through it (S3,
Milvus server, Celery workers) and `down` leaves no process behind."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def _env_file(path) -> dict:
    env = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        env[key] = shlex.split(value)[0] if value else ""
    return env


def test_up_ingest_ask_down(tmp_path, photo_of_stack):
    pytest.importorskip("milvus", reason="the Milvus server needs the `stack` extra")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    stack_dir = tmp_path / "stack"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PERSONALKV_")}
    base.update(PERSONALKV_MODEL_NAME="tiny:qwen2_vl", PERSONALKV_RETRIEVAL_TEXT_ENCODER="hashing")
    stack = [sys.executable, "-m", "personalkv.devstack.stack"]
    cli = [sys.executable, "-m", "services.cli"]  # the `personalkv` command, as `make up` runs it
    up = subprocess.run([*stack, "up", "--dir", str(stack_dir), "--personalkv", shlex.join(cli)],
                        env=base, capture_output=True, text=True, timeout=400, check=False)
    pids = {p.stem: int(p.read_text()) for p in stack_dir.glob("*.pid")}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert {"redis", "s3", "s3-server", "milvus", "milvus-server", "worker-mining",
                "worker-caching", "ingestion", "answering"} <= set(pids)
        # the S3 pid is the server's, not its wrapper's (issue 30)
        assert pids["s3-server"] != pids["s3"]
        server_cmd = open(f"/proc/{pids['s3-server']}/cmdline", "rb").read()
        assert b"moto.server" in server_cmd or b"minio" in server_cmd, server_cmd
        # our processes write their own (size-rotated) log
        for name in ("worker-mining", "worker-caching", "ingestion", "answering"):
            assert (stack_dir / f"{name}.log").stat().st_size > 0, name
        env = {**base, **_env_file(stack_dir / "env")}
        # A token secret of this stack's own, not the public development default, owner-only.
        from personalkv.config import AuthSettings

        secret = env["PERSONALKV_AUTH_SECRET"]
        assert secret != AuthSettings().secret.get_secret_value() and len(secret) >= 32
        assert (stack_dir / "env").stat().st_mode & 0o077 == 0
        photos = tmp_path / "photos"
        photos.mkdir()
        for k in range(2):
            (photos / f"{k}.png").write_bytes(photo_of_stack(k))
        ingest = subprocess.run([*cli, "ingest", str(photos), "--user", "bob", "--concept", "rex",
                                 "--name", "Rex", "--stack", "--timeout", "120"], env=env,
                                capture_output=True, text=True, timeout=200, check=False)
        assert ingest.returncode == 0 and "bob/rex: ready" in ingest.stdout, ingest.stderr[-3000:]
        ask = subprocess.run([*cli, "ask", "--user", "bob", "Where is Rex?", "--stack",
                              "--max-new-tokens", "3"], env=env, capture_output=True, text=True,
                             timeout=200, check=False)
        assert ask.returncode == 0 and "concepts: rex" in ask.stderr, ask.stderr[-3000:]
    finally:
        down = subprocess.run([*stack, "down", "--dir", str(stack_dir)], env=base,
                              capture_output=True, text=True, timeout=120, check=False)
    assert down.returncode == 0, down.stderr
    deadline = time.monotonic() + 30
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = {n: p for n, p in pids.items() if os.path.exists(f"/proc/{p}")
                 and "zombie" not in open(f"/proc/{p}/status").read().lower()}
        time.sleep(0.5)
    assert not alive, f"still running after down: {alive}"
    assert not list(stack_dir.glob("*.pid"))


@pytest.fixture
def photo_of_stack():
    import io

    from PIL import Image, ImageDraw

    def draw(k: int) -> bytes:
        image = Image.new("RGB", (160, 128), (225, 225, 220))
        ImageDraw.Draw(image).ellipse((20 + 7 * k, 20, 120 + 7 * k, 110), fill=(140, 85, 40))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    return draw
