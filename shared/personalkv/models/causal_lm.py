"""A text-only causal LM (Llama family, e.g. SmolLM2): text-only personalization, 1-D RoPE."""

from __future__ import annotations

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
