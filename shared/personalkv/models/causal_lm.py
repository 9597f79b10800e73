"""A text-only causal LM (Llama family, e.g. SmolLM2): text-only personalization, 1-D RoPE."""

from __future__ import annotations

import functools

import torch
from PIL import Image

from personalkv.models.base import ImageInput, ModelAdapter, Segment


def linear_positions(segment: Segment, start: int, device) -> tuple[torch.Tensor, int]:
    """1-D RoPE: one position per token."""
    positions = torch.arange(start, start + segment.num_tokens, device=device)[None]
    return positions, start + segment.num_tokens


class CausalLMAdapter(ModelAdapter):
    kind = "causal_lm"
    position_axes = 1
    supports_images = False

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model

    def image_placeholder(self, image: ImageInput):
        raise ValueError("a text-only model has no image placeholder")

    def encode_image(self, image: Image.Image) -> ImageInput:
        raise ValueError(f"{self.kind} is a text-only model; it cannot take images")

    def segment_positions(self, segment: Segment, start: int) -> tuple[torch.Tensor, int]:
        return linear_positions(segment, start, self.device)


class Gemma3Adapter(CausalLMAdapter):
    """Gemma 3 text models (e.g. Gemma 3 270M). What differs from Llama, and where it is handled:

    * two RoPE bases: sliding-window layers rotate with ``rope_local_base_freq`` (10k), global
      layers with ``rope_theta`` (1M), so a placed chunk's keys are re-rotated per layer with
      that layer's frequencies (``layer_inv_freq``) and probes take per-layer cos/sin;
    * sliding-window layers attend to the last ``sliding_window`` positions only. The cache keeps
      every token in every layer (placement writes whole layers; transformers' sliding cache
      layers would drop the old ones) and the window lives in the mask instead: the model's own
      mask when we pass none, our 4-D masks narrowed by position distance (``decoder_mask``);
    * queries and keys are RMS-normalized before RoPE and scaled by ``query_pre_attn_scalar``
      (the layers do both; the recompute's query probe applies ``q_norm`` itself), embeddings
      are scaled by sqrt(hidden) (inside the embedding module) and the LM head is tied to them;
    * the chat template has no system role: it puts the system text at the start of the first
      user turn, which is where the base class's framing split finds it.
    """

    kind = "gemma3"

    @functools.cached_property
    def _inv_freqs(self) -> dict[str, torch.Tensor]:
        rotary = self.language_model.rotary_emb
        freqs = {}
        for layer_type in set(self.text_config.layer_types):
            if getattr(rotary, f"{layer_type}_attention_scaling", 1.0) != 1.0:
                raise NotImplementedError("RoPE with attention scaling is not supported for chunk shifts")
            freqs[layer_type] = getattr(rotary, f"{layer_type}_inv_freq").detach().float().cpu()
        return freqs

    @property
    def inv_freq(self) -> torch.Tensor:
        raise AttributeError("Gemma 3 has one set of RoPE frequencies per layer type: use layer_inv_freq(layer)")

    def layer_inv_freq(self, layer: int) -> torch.Tensor:
        return self._inv_freqs[self.text_config.layer_types[layer]]

    def layer_rotary(self, hidden: torch.Tensor, positions: torch.Tensor, layer: int):
        return self.language_model.rotary_emb(hidden, self.lm_position_ids(positions),
                                              self.text_config.layer_types[layer])

    def _empty_cache(self):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache()
        cache.layers = [DynamicLayer() for _ in range(self.num_layers)]
        return cache

    def decoder_mask(self, attention_mask, positions, cache):
        """Our 4-D mask for the global layers, and the same narrowed to the sliding window for
        the local ones. The window is a distance in positions: a new key sits at its query's
        position; a cached key in column j of row b at j - (row b's left padding), the leading
        columns that every query of the row is masked from (a text model's cache holds one
        position per column from 0, after the padding a decode batch puts in front)."""
        if attention_mask is None:  # the model builds both masks itself, by cache column
            return None
        queries = attention_mask.shape[-2]
        cached = attention_mask.shape[-1] - queries
        hidden = attention_mask[..., :cached] == torch.finfo(attention_mask.dtype).min
        padding = hidden.all(dim=-2)[:, 0].int().cumprod(dim=-1).sum(dim=-1)  # (B,)
        columns = torch.arange(cached, device=attention_mask.device)
        query_positions = positions.to(attention_mask.device).expand(attention_mask.shape[0], queries)
        key_positions = torch.cat([columns[None] - padding[:, None], query_positions], dim=-1)
        far = query_positions[:, :, None] - key_positions[:, None, :] >= self.text_config.sliding_window
        sliding = attention_mask.masked_fill(far[:, None], torch.finfo(attention_mask.dtype).min)
        return {"full_attention": attention_mask, "sliding_attention": sliding}

    def layer_mask(self, decoder_mask, layer: int):
        return None if decoder_mask is None else decoder_mask[self.text_config.layer_types[layer]]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(hidden).float()
        cap = self.text_config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
