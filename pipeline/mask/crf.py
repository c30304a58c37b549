"""Dense CRF post-process with pydensecrf2 (the `pydensecrf` module). CPU only.

Two parameter sets used by well-known pseudo-label pipelines:
- `label`: unary from the hard mask (gt_prob 0.7); Gaussian sxy 3 compat 3;
  bilateral sxy 50 srgb 5 compat 10.
- `scores`: unary from the class scores, background = 1 - max class score;
  Gaussian sxy 1 compat 3; bilateral sxy 67 srgb 3 compat 4.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import CrfConfig

_PRESETS = {
    "label": dict(gaussian=(3, 3), bilateral=(50, 5, 10)),
    "scores": dict(gaussian=(1, 3), bilateral=(67, 3, 4)),
}


def crf_refine(image: np.ndarray, labels: np.ndarray, scores: np.ndarray, classes: list[int],
               config: CrfConfig) -> np.ndarray:
    """image uint8 [H, W, 3]; the mask before the CRF: labels uint8 [H, W] and scores float32
    [1 + C, H, W] (background, then the 0-based `classes`). Returns refined uint8 labels [H, W]
    over the same label set (background and the image's classes)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels, unary_from_softmax

    height, width = labels.shape
    if image.shape[:2] != (height, width):
        raise ValueError(f"image is {image.shape[:2]} but the mask is {(height, width)}")
    lookup = np.array([0] + [c + 1 for c in classes], dtype=np.uint8)
    n_labels = len(lookup)
    if config.preset == "label":
        compact = np.searchsorted(lookup, labels).astype(np.int64)  # lookup is sorted
        unary = unary_from_labels(compact, n_labels, gt_prob=0.7, zero_unsure=False)
    else:
        class_scores = scores[1:]
        background = 1.0 - class_scores.max(axis=0, keepdims=True)
        probs = np.concatenate([background, class_scores]).astype(np.float32)
        probs /= np.maximum(probs.sum(axis=0, keepdims=True), 1e-8)
        unary = unary_from_softmax(probs)
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    params = _PRESETS[config.preset]
    sxy, compat = params["gaussian"]
    crf.addPairwiseGaussian(sxy=sxy, compat=compat)
    sxy, srgb, compat = params["bilateral"]
    crf.addPairwiseBilateral(sxy=sxy, srgb=srgb, rgbim=np.ascontiguousarray(image, dtype=np.uint8), compat=compat)
    q = np.array(crf.inference(config.iterations)).reshape(n_labels, height, width)
    return lookup[q.argmax(axis=0)]
