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


def test_ingest_of_a_folder_without_photos_fails_cleanly(embedded_env, capsys):
    assert cli.main(["ingest", str(embedded_env), "--user", "bob", "--concept", "mug"]) == 2
    assert "no photos" in capsys.readouterr().err
