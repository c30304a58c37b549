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


FAST_CONFIG = os.path.join(os.path.dirname(__file__), "fast.yaml")


def write_voc_folder(root, images: dict, annotations: dict | None = None, split="train"):
    """A small VOC2012-style folder: images {id: (uint8 image, mask or None)}; annotations
    {id: [names]} become Annotations/<id>.xml."""
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "Annotations"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (image, mask) in images.items():
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        if mask is not None:
            Image.fromarray(mask, mode="L").convert("P").save(root / "SegmentationClass" / f"{image_id}.png")
    for image_id, names in (annotations or {}).items():
        objects = "".join(f"<object><name>{n}</name></object>" for n in names)
        (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objects}</annotation>")
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(images) + "\n")
    return root


def two_class_mask(height, width, left_label, right_label):
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, : width // 3] = left_label
    mask[:, 2 * width // 3 :] = right_label
    return mask
