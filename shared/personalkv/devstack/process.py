"""Process helpers shared by the devstack servers."""

from __future__ import annotations

import subprocess


def terminate(proc: subprocess.Popen | None, timeout_s: float, kill_wait_s: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout_s`` (servers flush on the way out), then SIGKILL.
    A no-op for ``None`` or an already exited process."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=kill_wait_s)
