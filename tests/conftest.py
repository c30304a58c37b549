import os
import tempfile

import numpy as np
import pytest

# Built-in models are built into a per-session cache, never the user's.
os.environ.setdefault("PSEUDOLABEL_CACHE", tempfile.mkdtemp(prefix="pseudolabel-test-cache-"))


@pytest.fixture(scope="session")
def tiny_model():
    from pipeline.models import load_model

    return load_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def tokenizer():
    from pipeline.models import clip_tokenizer

    return clip_tokenizer()


def synthetic_image(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3]: two flat colour regions (left/right) plus mild noise."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), dtype=np.float32)
    image[:, : width // 2] = (200, 40, 40)
    image[:, width // 2 :] = (30, 60, 190)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)
