"""Per-patch evidence scores of one concept photo.

For every candidate window of photo ``i`` of concept ``c``:

* ``subject``: mean subject prior in the window relative to the photo's mean (clipped to [0, 1]
  after dividing by 2), so that the background does not carry the identity;
* ``consistency``: keypoints in the window that match another photo of ``c`` (ratio test across
  owners, RANSAC-verified), as log1p(count) normalised by the concept's best window; plus the
  appearance consistency (mean over the other photos of the best window similarity, by the
  library's PatchEmbedder: CNN features by default, colour histograms weights-free);
* ``distinct``: share of the window's keypoints *not* claimed by the negative pool or by the
  user's other concepts, and the appearance margin over the pool's most similar windows;
* ``relevance``: similarity to the profile text, only when a text-image scorer is configured.

``combine`` turns them into one score; the weights are documented there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from personalkv.mining.library import NEGATIVE, PhotoLibrary
from personalkv.mining.proposals import points_in_boxes
from personalkv.mining.saliency import box_means

#: ``(crops, profile text) -> relevance in [0, 1] per crop``; e.g. CLIP / SigLIP similarity.
RelevanceScorer = Callable[[Sequence[np.ndarray], str], np.ndarray]


@dataclass
class WindowScores:
    photo: int
    boxes: np.ndarray
    parts: dict[str, np.ndarray]  # name -> (n,) scores


def keypoint_evidence(library: PhotoLibrary, photo: int) -> tuple[np.ndarray, np.ndarray]:
    """(consistent, claimed) boolean masks over the photo's keypoints: consistent = verified
    match in another photo of the same concept; claimed = nearest other-photo neighbour belongs
    to the pool or another concept (unverified: background shared with the pool rarely
    survives RANSAC alone, but it is near the pool in descriptor space)."""
    lp = library.photos[photo]
    consistent = np.zeros(len(lp.local), bool)
    nearest = np.full(len(lp.local), -2)
    for m in library.match(lp.local, exclude_photo=photo, nearest=nearest):
        if m.owner == lp.owner:
            consistent[m.query_idx] = True
    claimed = (nearest != lp.owner) & (nearest != -2)
    return consistent, claimed & ~consistent


def appearance_evidence(library: PhotoLibrary, photo: int, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(consistency, margin) of every window's appearance: mean best similarity in the concept's
    other photos, and that minus the mean of the 3 most similar pool windows."""
    lp = library.photos[photo]
    others = [p for p in library.photos_of(lp.owner) if p != photo]
    if others:
        cons = np.mean([(lp.appearance @ library.photos[o].appearance.T).max(1) for o in others], axis=0)
    else:
        cons = np.ones(len(lp.boxes), np.float32)
    if pool.size:
        sims = lp.appearance @ pool.T
        k = min(3, sims.shape[1])
        neg = np.partition(sims, -k, axis=1)[:, -k:].mean(1)
    else:
        neg = np.zeros(len(lp.boxes), np.float32)
    return cons.astype(np.float32), (cons - neg).astype(np.float32)


def score_windows(library: PhotoLibrary, photo: int, prior: np.ndarray, pool: np.ndarray,
                  relevance: np.ndarray | None = None) -> WindowScores:
    lp = library.photos[photo]
    boxes = lp.boxes
    consistent, claimed = keypoint_evidence(library, photo)
    inside = points_in_boxes(lp.local.xy, boxes)
    n_cons = (inside & consistent).sum(1)
    n_claim = (inside & claimed).sum(1)
    n_all = inside.sum(1)
    subject = np.clip(box_means(prior, boxes) / max(float(prior.mean()), 1e-6) / 2.0, 0, 1)
    app_cons, app_margin = appearance_evidence(library, photo, pool)
    parts = {
        "subject": subject.astype(np.float32),
        "consistency": np.log1p(n_cons).astype(np.float32),
        "distinct": (1.0 - n_claim / (n_all + 1.0)).astype(np.float32),
        "appearance_consistency": app_cons,
        "appearance_margin": app_margin,
    }
    if relevance is not None:
        parts["relevance"] = relevance.astype(np.float32)
    return WindowScores(photo, boxes, parts)


def combine(parts: dict[str, np.ndarray], consistency_scale: float) -> np.ndarray:
    """score = (keypoint consistency / concept max) * distinct * (0.5 + 0.5 * subject)
             + 0.5 * clip(appearance margin + 0.1, 0, 0.3) / 0.3 * (0.5 + 0.5 * subject)
             + 0.05 * subject (tie-break where there is no other evidence)
             + 0.25 * relevance (when present).
    The keypoint term dominates where the concept has texture; the appearance and subject terms
    rank windows of texture-poor concepts and break ties."""
    subj = 0.5 + 0.5 * parts["subject"]
    kp = parts["consistency"] / max(consistency_scale, 1e-6) * parts["distinct"] * subj
    app = 0.5 * np.clip(parts["appearance_margin"] + 0.1, 0, 0.3) / 0.3 * subj
    score = kp + app + 0.05 * parts["subject"]  # tie-break: the salient window, not a corner
    if "relevance" in parts:
        score = score + 0.25 * parts["relevance"]
    return score


def pool_appearance(library: PhotoLibrary, owner: int) -> np.ndarray:
    """Window embeddings of every photo not owned by ``owner`` (pool and other concepts)."""
    rows = [p.appearance for p in library.photos if p.owner != owner]
    return np.concatenate(rows) if rows else np.zeros((0, 1), np.float32)


__all__ = ["NEGATIVE", "RelevanceScorer", "WindowScores", "combine", "score_windows", "pool_appearance"]
