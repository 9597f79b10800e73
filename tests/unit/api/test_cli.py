"""`personalkv token` and the `personalkv serve` parser."""

from __future__ import annotations

import pytest

from personalkv.auth import verify_token
from personalkv.config import AuthSettings
from services.cli import build_parser, main


def test_token_command_prints_a_token_for_the_user(capsys):
    assert main(["token", "--user", "alice", "--ttl", "60"]) == 0
    # the command signs with the process's settings: the defaults here
    assert verify_token(capsys.readouterr().out.strip(), settings=AuthSettings()) == "alice"


def test_token_command_refuses_bad_user_ids(capsys):
    assert main(["token", "--user", "../x"]) == 1
    assert capsys.readouterr().err.startswith("personalkv token: error: user id '../x' is invalid")


@pytest.mark.parametrize("ttl", ["99999999", "-5", "0"])
def test_token_command_refuses_a_lifetime_out_of_bounds_in_one_line(capsys, ttl):
    assert main(["token", "--user", "alice", "--ttl", ttl]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("personalkv token: error: INVALID_ARGUMENT: --ttl must be between 1 and")


def test_serve_parser():
    args = build_parser().parse_args(["serve", "answering", "--port", "0", "--embedded"])
    assert (args.service, args.port, args.embedded, args.metrics_port) == ("answering", 0, True, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "mining"])


def test_a_server_whose_model_cannot_load_exits_naming_it(tmp_path):
    """No silent fallback: the answering server loads its model before it serves (health
    never turns SERVING) and exits 1 with one line naming the model (measured: ~10 s)."""
    import os
    import subprocess
    import sys

    missing = tmp_path / "no-such-model"
    env = {**os.environ, "PERSONALKV_MODEL_NAME": str(missing),
           "PERSONALKV_SERVICE_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "answering", "--embedded", "--port", "0",
         "--metrics-port", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"personalkv serve: error: cannot load model '{missing}'"), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("queue", ["caching", "mining"])
def test_a_worker_whose_model_cannot_load_exits_in_one_line(tmp_path, queue):
    """Issue 31: a worker checks its model before it takes a task (before it even reaches the
    broker, none runs here): exit 1, one line naming the model, no traceback."""
    import os
    import subprocess
    import sys

    missing = tmp_path / "no-such-model"
    env = {**os.environ, "PERSONALKV_MODEL_NAME": str(missing)}
    done = subprocess.run([sys.executable, "-m", "services.cli", "worker", "--queue", queue],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(f"personalkv worker: error: cannot load model '{missing}'"), done.stderr
    assert "Traceback" not in done.stderr and len(lines) <= 5
