"""Dense CRF post-process with pydensecrf2 (the `pydensecrf` module). CPU only.

Two parameter sets used by well-known pseudo-label pipelines:
- `label`: unary from the hard mask (gt_prob 0.7); Gaussian sxy 3 compat 3;
  bilateral sxy 50 srgb 5 compat 10.
- `scores`: unary from the class scores, background = 1 - max class score;
  Gaussian sxy 1 compat 3; bilateral sxy 67 srgb 3 compat 4.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import CrfConfig
from pipeline.errors import PipelineError

# PyPI has pydensecrf2 as source only, built by Cython 0.29, which cannot build for Python 3.13:
# there the project installs without it, and Cython 3 builds it.
CRF_INSTALL = "pip install cython setuptools wheel && pip install --no-build-isolation pydensecrf2"


class CrfUnavailableError(PipelineError):
    """The dense CRF was asked for where its module is not installed."""


def densecrf_modules():
    """pydensecrf's (densecrf, utils) modules, or CrfUnavailableError naming the install."""
    try:
        import pydensecrf.densecrf as densecrf
        import pydensecrf.utils as utils
    except ImportError as exc:
        raise CrfUnavailableError(
            f"the dense CRF (--crf, crf.enabled) needs the pydensecrf module, which is not installed here ({exc}); "
            f"install it with: {CRF_INSTALL}") from exc
    return densecrf, utils


_PRESETS = {
    "label": dict(gaussian=(3, 3), bilateral=(50, 5, 10)),
    "scores": dict(gaussian=(1, 3), bilateral=(67, 3, 4)),
}


def crf_refine(image: np.ndarray, labels: np.ndarray, scores: np.ndarray, classes: list[int],
               config: CrfConfig) -> np.ndarray:
    """image uint8 [H, W, 3]; the mask before the CRF: labels uint8 [H, W] and scores float32
    [1 + C, H, W] (background, then the 0-based `classes`). Returns refined uint8 labels [H, W]
    over the same label set (background and the image's classes).

    An image of more than `config.max_pixels` pixels is refined at the largest size within it
    (image bilinear, scores area-averaged, labels nearest), the kernels' spatial widths scaled
    with it so that they reach as far over the picture, and its labels scaled back, nearest."""
    height, width = labels.shape
    if image.shape[:2] != (height, width):
        raise ValueError(f"image is {image.shape[:2]} but the mask is {(height, width)}")
    if config.max_pixels is None or height * width <= config.max_pixels:
        return _refine(image, labels, scores, classes, config)
    scale = math.sqrt(config.max_pixels / (height * width))
    size = (max(1, int(width * scale)), max(1, int(height * scale)))  # PIL's (width, height)
    small_image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    small_labels = np.asarray(Image.fromarray(labels).resize(size, Image.Resampling.NEAREST))
    small_scores = F.interpolate(torch.from_numpy(scores)[None], size=size[::-1], mode="area")[0].numpy()
    refined = _refine(small_image, small_labels, small_scores, classes, config, pixel_scale=scale)
    return np.array(Image.fromarray(refined).resize((width, height), Image.Resampling.NEAREST))


def _refine(image: np.ndarray, labels: np.ndarray, scores: np.ndarray, classes: list[int],
            config: CrfConfig, pixel_scale: float = 1.0) -> np.ndarray:
    """crf_refine at the size of image, its kernels' spatial widths (in pixels of the image
    the mask is for) times pixel_scale."""
    dcrf, utils = densecrf_modules()
    height, width = labels.shape
    lookup = np.array([0] + [c + 1 for c in classes], dtype=np.uint8)
    n_labels = len(lookup)
    if config.preset == "label":
        compact = np.searchsorted(lookup, labels).astype(np.int64)  # lookup is sorted
        unary = utils.unary_from_labels(compact, n_labels, gt_prob=0.7, zero_unsure=False)
    else:
        class_scores = scores[1:]
        background = 1.0 - class_scores.max(axis=0, keepdims=True)
        probs = np.concatenate([background, class_scores]).astype(np.float32)
        probs /= np.maximum(probs.sum(axis=0, keepdims=True), 1e-8)
        unary = utils.unary_from_softmax(probs)
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    params = _PRESETS[config.preset]
    sxy, compat = params["gaussian"]
    crf.addPairwiseGaussian(sxy=sxy * pixel_scale, compat=compat)
    sxy, srgb, compat = params["bilateral"]
    # pydensecrf takes the image as a writeable buffer: a read-only array (numpy's view of a PIL image) is copied
    crf.addPairwiseBilateral(sxy=sxy * pixel_scale, srgb=srgb, rgbim=np.require(image, np.uint8, ["C", "W"]), compat=compat)
    q = np.array(crf.inference(config.iterations)).reshape(n_labels, height, width)
    return lookup[q.argmax(axis=0)]
