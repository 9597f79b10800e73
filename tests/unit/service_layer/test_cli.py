"""`personalkv ingest / ask / reindex` in embedded mode, in-process."""

from __future__ import annotations

import pytest
from personalkv import cli
from personalkv.config import get_settings


@pytest.fixture
def embedded_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONALKV_SERVICE_DATA_DIR", str(tmp_path / "data"))
    # Weights-free encoders and patch embedder: this tests the commands, not recognition.
    monkeypatch.setenv("PERSONALKV_RETRIEVAL_TEXT_ENCODER", "hashing")
    monkeypatch.setenv("PERSONALKV_RETRIEVAL_IMAGE_ENCODER", "global")
    monkeypatch.setenv("PERSONALKV_MINING_EMBEDDER", "colour")
    monkeypatch.setenv("PERSONALKV_MODEL_NAME", "tiny:qwen2_vl")
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_ingest_ask_reindex(embedded_env, photo_of, capsys):
    photos = embedded_env / "photos"
    photos.mkdir()
    for k in range(2):
        (photos / f"{k}.png").write_bytes(photo_of((30, 60, 200), k))
    (photos / "notes.txt").write_text("ignored")
    assert cli.main(["ingest", str(photos), "--user", "bob", "--concept", "mug",
                     "--name", "Bobo", "--category", "mug"]) == 0
    assert "bob/mug: ready; 2 photos" in capsys.readouterr().out
    assert cli.main(["reindex", "--user", "bob"]) == 0
    assert cli.main(["recache"]) == 0
    assert "enqueued caching for 1 concepts" in capsys.readouterr().out
    assert cli.main(["ask", "--user", "bob", "Where is Bobo?", "--max-new-tokens", "3",
                     "--stream"]) == 0
    err = capsys.readouterr().err
    assert "concepts: mug" in err and "timings: retrieve=" in err
    assert cli.main(["ask", "--user", "bob", ""]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    # A conversation from the command line: start it, then follow up by its id.
    assert cli.main(["ask", "--user", "bob", "Where is Bobo?", "--max-new-tokens", "3",
                     "--start-conversation"]) == 0
    err = capsys.readouterr().err
    cid = err.split("conversation: ")[1].split()[0]
    assert len(cid) == 64
    assert cli.main(["ask", "--user", "bob", "And then?", "--max-new-tokens", "3",
                     "--conversation", cid]) == 0
    assert f"conversation: {cid}" in capsys.readouterr().err
    assert cli.main(["ask", "--user", "alice", "And then?", "--conversation", cid]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_a_successful_ingest_prints_no_error_line(embedded_env, photo_of):
    """Issue 31: in its own process (as a user runs it: the log goes to stderr), a first ingest,
    which creates the index's collections, prints its result and no ERROR line (milvus-lite
    lacks the RPC pymilvus waits for an index build with: two ERROR tracebacks)."""
    import os
    import subprocess
    import sys

    photos = embedded_env / "photos"
    photos.mkdir()
    (photos / "0.png").write_bytes(photo_of((30, 60, 200), 0))
    done = subprocess.run([sys.executable, "-m", "services.cli", "ingest", str(photos), "--user", "bob",
                           "--concept", "mug"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PERSONALKV_MODEL_NAME": "tiny:qwen2_vl"})
    assert done.returncode == 0 and "bob/mug: ready" in done.stdout, done.stderr[-2000:]
    assert "ERROR" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]


def test_ingest_of_a_folder_without_photos_fails_cleanly(embedded_env, capsys):
    assert cli.main(["ingest", str(embedded_env), "--user", "bob", "--concept", "mug"]) == 2
    assert "personalkv ingest: error: no photos" in capsys.readouterr().err


def test_a_failed_ingest_leaves_no_concept_behind(embedded_env, capsys, tmp_path):
    """Issue 31: an ingest whose photos are refused deletes the concept it created (it stayed
    QUEUED before)."""
    from personalkv.bootstrap import bootstrap

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "broken.png").write_bytes(b"not a png at all")
    assert cli.main(["ingest", str(photos), "--user", "bob", "--concept", "ghost"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("personalkv ingest: error: INVALID_ARGUMENT: photo 1 of 1"), err
    svc = bootstrap(get_settings().embedded())
    try:
        assert "ghost" not in svc.store.list_concepts("bob")
    finally:
        svc.close()


# -- misuse: one line on stderr, a non-zero exit, no traceback (issue 21) ---------------------
@pytest.mark.parametrize(("argv", "code", "says"), [
    (["token", "--user", "Alice!"], 1, "user id 'Alice!' is invalid"),
    (["ingest", "/nonexistent", "--user", "bob", "--concept", "c"], 2, "/nonexistent is not a folder"),
    (["ask", "--user", "bob"], 2, "required: question"),
    (["ask", "--user", "bob", "q", "--top-k", "many"], 2, "invalid int value: 'many'"),
    (["bogus"], 2, "invalid choice: 'bogus'"),
    # issue 31: every misuse ends with one line under the one prefix
    (["ask", "--user", "bob", "q", "--photo", "/"], 1, "personalkv ask: error: INVALID_ARGUMENT: --photo / is not a file"),
    (["token", "--user", "bob", "--ttl", "-5"], 1, "personalkv token: error: INVALID_ARGUMENT: --ttl must be"),
])
def test_misuse_is_one_line_and_a_nonzero_exit(argv, code, says, capsys):
    try:
        got = cli.main(argv)
    except SystemExit as exit_:  # argparse
        got = exit_.code
    err = capsys.readouterr().err
    assert got == code
    assert says in err and len(err.strip().splitlines()) == 1, err


def test_a_model_that_cannot_load_is_one_line_naming_it(embedded_env, monkeypatch, capsys):
    monkeypatch.setenv("PERSONALKV_MODEL_NAME", str(embedded_env / "no-such-model"))
    get_settings.cache_clear()
    assert cli.main(["ask", "--user", "bob", "Where is Rex?"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # the embedded note (where data goes, which model), then the error
    assert err[0].startswith(f"embedded: data in {embedded_env / 'data'}") and "no-such-model" in err[0]
    assert err[1:] == [f"personalkv ask: error: cannot load model '{embedded_env / 'no-such-model'}'"
                       f" (HF_HUB_OFFLINE=1: only cached or local weights load): "
                       f"FileNotFoundError: no model folder at {embedded_env / 'no-such-model'}"]


def test_version_and_help_on_every_flag(capsys):
    import argparse

    from personalkv import __version__
    from services.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"personalkv {__version__}"
    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif not action.help:
                missing.append(f"{' '.join(path)} {action.option_strings or action.dest}")

    walk(build_parser(), ["personalkv"])
    assert missing == []
