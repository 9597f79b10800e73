"""Qwen2-VL and Qwen2.5-VL: vision tower + Qwen2 decoder with M-RoPE (three position axes).

An image's merged patches share one temporal position and take height/width positions on a
grid, so after an image the position counter advances by max(h, w) / merge, not by its token
count. We compute positions with the model's own ``get_rope_index`` on the segment alone (a pure
function; it does not touch ``rope_deltas``) and offset them.
"""

from __future__ import annotations

import torch
from PIL import Image

from personalkv.models.base import ImageInput, ModelAdapter, Segment


class Qwen2VLAdapter(ModelAdapter):
    kind = "qwen2_vl"
    position_axes = 3

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    def _token(self, text: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(text))

    def image_placeholder(self, image: ImageInput):
        return (
            [self._token("<|vision_start|>")],
            [self.image_token_id] * image.num_tokens,
            [self._token("<|vision_end|>")],
        )

    def encode_image(self, image: Image.Image) -> ImageInput:
        processed = self.image_processor(images=[self.model_image(image)], return_tensors="pt")
        pixel_values = processed["pixel_values"].to(self.device, self.dtype)
        grid = processed["image_grid_thw"].to(self.device)
        with torch.inference_mode():
            features = self.model.model.get_image_features(pixel_values, grid, return_dict=True)
        embeds = torch.cat(list(features.pooler_output), dim=0)
        return ImageInput(
            embeds=embeds,
            model_kwargs={"pixel_values": pixel_values, "image_grid_thw": grid},
            grid=tuple(int(x) for x in grid[0].tolist()),
        )

    def segment_positions(self, segment: Segment, start: int) -> tuple[torch.Tensor, int]:
        ids = segment.token_ids[None].to(self.device)
        if not segment.images:
            positions = torch.arange(start, start + segment.num_tokens, device=self.device)
            positions = positions[None].expand(3, -1).clone()
            return positions, start + segment.num_tokens
        grid = torch.tensor([image.grid for image in segment.images], device=self.device)
        token_type = (ids == self.image_token_id).int()
        positions, _ = self.model.model.get_rope_index(
            ids, mm_token_type_ids=token_type, image_grid_thw=grid
        )
        positions = positions[:, 0, :] + start
        return positions, int(positions.max()) + 1

    def image_model_kwargs(self, images: list[ImageInput]) -> dict:
        if not images:
            return {}
        return {
            "pixel_values": torch.cat([i.model_kwargs["pixel_values"] for i in images]),
            "image_grid_thw": torch.cat([i.model_kwargs["image_grid_thw"] for i in images]),
        }

    def reference_inputs(self, segments):
        inputs = super().reference_inputs(segments)
        if "pixel_values" in inputs:
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.image_token_id).int()
        return inputs


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL differs in its vision tower (window attention), not in what we drive."""

    kind = "qwen2_5_vl"
