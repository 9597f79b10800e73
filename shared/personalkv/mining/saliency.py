"""Subject prior: where in a photo the subject probably is, so the background does not carry
the identity.

``SubjectPrior.prior(image) -> (H, W) float32 in [0, 1]``. The weights-free default combines
spectral-residual saliency (Hou & Zhang, CVPR 2007) with a mild centre bias; a detector or
segmenter (e.g. a person segmenter for people, an open-vocabulary detector) plugs in by
implementing the same method and registering it under a name
(``personalkv.mining.registry.register_subject_prior``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import cv2
import numpy as np


class SubjectPrior(ABC):
    """Called once per photo by the miner before patch scoring."""

    name: str = "prior"

    @abstractmethod
    def prior(self, image: np.ndarray) -> np.ndarray: ...


class SpectralResidualPrior(SubjectPrior):
    name = "saliency"

    def __init__(self, size: int = 96, centre_weight: float = 0.3):
        self.size = size
        self.centre_weight = centre_weight

    def prior(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
        small = cv2.resize(lab, (self.size, self.size), interpolation=cv2.INTER_AREA)
        sal = np.zeros((self.size, self.size), np.float32)
        for c in range(3):  # per channel, so colour-only subjects stand out too
            spec = np.fft.fft2(small[..., c])
            log_amp = np.log(np.abs(spec) + 1e-6)
            residual = log_amp - cv2.blur(log_amp.astype(np.float32), (3, 3))
            back = np.fft.ifft2(np.exp(residual + 1j * np.angle(spec)))
            sal += (np.abs(back) ** 2).astype(np.float32)
        sal = cv2.GaussianBlur(sal, (0, 0), self.size / 32)
        sal = (sal - sal.min()) / max(float(np.ptp(sal)), 1e-9)
        yy, xx = np.mgrid[0 : self.size, 0 : self.size] / (self.size - 1) - 0.5
        centre = np.exp(-(xx**2 + yy**2) / (2 * 0.3**2)).astype(np.float32)
        sal = (1 - self.centre_weight) * sal + self.centre_weight * centre
        return cv2.resize(sal, (w, h), interpolation=cv2.INTER_LINEAR)


class UniformPrior(SubjectPrior):
    name = "none"

    def prior(self, image: np.ndarray) -> np.ndarray:
        return np.ones(image.shape[:2], np.float32)


def box_means(prior: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Mean of ``prior`` inside each box, via an integral image."""
    integ = cv2.integral(prior.astype(np.float64))
    h, w = prior.shape
    b = np.round(boxes).astype(int)
    x0, y0 = np.clip(b[:, 0], 0, w), np.clip(b[:, 1], 0, h)
    x1, y1 = np.clip(b[:, 2], 0, w), np.clip(b[:, 3], 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    tot = integ[y1, x1] - integ[y0, x1] - integ[y1, x0] + integ[y0, x0]
    return (tot / area).astype(np.float32)
