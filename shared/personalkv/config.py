"""Typed settings: the one place where PersonalKV reads environment variables.

Every field maps to ``PERSONALKV_<SECTION>_<FIELD>`` (e.g. ``PERSONALKV_MODEL_DEVICE=cuda``).
Sections are separate classes so each subsystem depends only on what it uses; ``get_settings()``
returns the process-wide instance. The README's configuration table is generated from these
docstrings' field descriptions, so keep them accurate.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ModelSettings(BaseSettings):
    """Which VLM answers and how it runs."""

    model_config = SettingsConfigDict(env_prefix="PERSONALKV_MODEL_")

    name: str = Field(
        "tiny:qwen2_vl",
        description="HF hub id or local path of the VLM; 'tiny:<kind>' builds a random-weight "
        "offline model (kinds: qwen2_vl, qwen2_5_vl, llava_onevision, causal_lm).",
    )
    device: str = Field("cpu", description="torch device, e.g. 'cpu', 'cuda', 'cuda:1'.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype of the model and of the KV chunks it writes."
    )
    chunk_quantization: Literal["none", "int8"] = Field(
        "none", description="Storage quantization of KV chunks (int8: per-channel symmetric)."
    )
    recompute_ratio: float = Field(
        0.0, ge=0.0, le=1.0, description="Default share of placed chunk tokens recomputed per Ask."
    )
    recompute_strategy: Literal["deviation", "first"] = Field(
        "deviation",
        description="Which tokens to recompute: 'deviation' (CacheBlend: largest key deviation "
        "at an early layer) or 'first' (EPIC: the first tokens of each chunk).",
    )


class Settings(BaseSettings):
    """All sections together."""

    model: ModelSettings = Field(default_factory=ModelSettings)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
