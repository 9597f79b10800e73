"""The answering VLM's own vision tower as a patch embedder (``PERSONALKV_MINING_EMBEDDER=vlm``).

Each crop is resized to ``input_side`` px and run through ``ModelAdapter.encode_image`` (the
model's image processor, vision tower and projector: the very embeddings the KV chunks are made
of); the image tokens are mean-pooled and L2-normalised. With real weights this gives features
of the same family as CLIP (Qwen2-VL's tower starts from DFN-CLIP, LLaVA-OneVision's is SigLIP).

It is not the default: the recognizer's threshold and appearance weight are calibrated on
myvlm for ``efficientnet-lite0`` (see the mining README), and this tower could only be measured
with real weights, which this project's offline CI cannot fetch. Re-run
``personalkv eval recognition`` with the real model and set the threshold it reports.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from personalkv.mining.features import PatchEmbedder


class VisionTowerEmbedder(PatchEmbedder):
    name = "vlm"

    def __init__(self, adapter, input_side: int = 224):
        self.adapter = adapter
        self.input_side = input_side
        self._lock = threading.Lock()

    @torch.inference_mode()
    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        rows = []
        with self._lock:
            for crop in crops:
                if crop.size == 0:
                    crop = np.zeros((self.input_side, self.input_side, 3), np.uint8)
                image = Image.fromarray(crop).resize((self.input_side, self.input_side), Image.BILINEAR)
                rows.append(self.adapter.encode_image(image).embeds.float().mean(0))
        if not rows:
            return np.zeros((0, 1), np.float32)
        return torch.nn.functional.normalize(torch.stack(rows), dim=1).cpu().numpy().astype(np.float32)

