"""LLaVA-OneVision (the Jarvis paper's base model): SigLIP tower + projector, anyres tiling,
image features spliced into a Qwen2 decoder with 1-D RoPE (one position per image token)."""

from __future__ import annotations

import torch
from PIL import Image

from personalkv.models.base import ImageInput, ModelAdapter, Segment
from personalkv.models.causal_lm import linear_positions


class LlavaOnevisionAdapter(ModelAdapter):
    kind = "llava_onevision"
    position_axes = 1

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    def image_placeholder(self, image: ImageInput):
        # The model's chat template writes "<image>\n" for an image.
        return [], [self.image_token_id] * image.num_tokens, self.tokenize("\n")

    def encode_image(self, image: Image.Image) -> ImageInput:
        processed = self.image_processor(images=[self.model_image(image)], return_tensors="pt")
        pixel_values = processed["pixel_values"].to(self.device, self.dtype)
        image_sizes = processed["image_sizes"].to(self.device)
        with torch.inference_mode():
            features = self.model.model.get_image_features(
                pixel_values, image_sizes, batch_num_images=torch.tensor([1]), return_dict=True
            )
        embeds = torch.cat(list(features.pooler_output), dim=0)
        return ImageInput(embeds=embeds, model_kwargs={"pixel_values": pixel_values, "image_sizes": image_sizes})

    def segment_positions(self, segment: Segment, start: int) -> tuple[torch.Tensor, int]:
        return linear_positions(segment, start, self.device)

    def image_model_kwargs(self, images: list[ImageInput]) -> dict:
        if not images:
            return {}
        pixel_values = [i.model_kwargs["pixel_values"] for i in images]
        width = max(p.shape[1] for p in pixel_values)
        padded = [
            torch.cat([p, p.new_zeros(p.shape[0], width - p.shape[1], *p.shape[2:])], dim=1) for p in pixel_values
        ]
        return {
            "pixel_values": torch.cat(padded),
            "image_sizes": torch.cat([i.model_kwargs["image_sizes"] for i in images]),
            # One entry per image: every image is anyres-tiled as when it is encoded alone
            # (transformers only tiles images that are alone in their sample).
            "batch_num_images": torch.ones(len(images), dtype=torch.long),
        }
