"""Candidate boxes at several scales, and non-maximum suppression.

Boxes are float32 arrays of rows (x0, y0, x1, y1) in pixel coordinates of the photo.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_FRACTIONS = (0.2, 0.3, 0.45, 0.65)


def propose_boxes(
    shape: tuple[int, ...], fractions: Sequence[float] = DEFAULT_FRACTIONS, stride: float = 0.5
) -> np.ndarray:
    """Square windows whose side is ``fraction * min(H, W)``, slid with ``stride * side``; the
    last row/column is snapped to the border so that every pixel is covered at every scale."""
    h, w = shape[:2]
    side_ref = min(h, w)
    out = []
    for frac in fractions:
        side = max(8.0, frac * side_ref)
        step = max(1.0, side * stride)
        xs = _positions(w, side, step)
        ys = _positions(h, side, step)
        out.extend((x, y, x + side, y + side) for y in ys for x in xs)
    return np.asarray(out, np.float32).reshape(-1, 4)


def _positions(length: int, side: float, step: float) -> np.ndarray:
    last = max(0.0, length - side)
    pos = np.arange(0.0, last + 1e-6, step)
    if pos[-1] < last - 1.0:
        pos = np.append(pos, last)
    return pos


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (n, 4) with every box in ``b`` (m, 4) -> (n, m)."""
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, k: int, iou: float = 0.3) -> list[int]:
    """Greedy NMS: indices of at most ``k`` boxes, best first, pairwise IoU <= ``iou``."""
    keep: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if keep and box_iou(boxes[i : i + 1], boxes[keep]).max() > iou:
            continue
        keep.append(int(i))
        if len(keep) >= k:
            break
    return keep


def points_in_boxes(xy: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(m, n) boolean: point n lies inside box m."""
    x, y = xy[None, :, 0], xy[None, :, 1]
    return (
        (x >= boxes[:, None, 0]) & (x < boxes[:, None, 2]) & (y >= boxes[:, None, 1]) & (y < boxes[:, None, 3])
    )
