"""torch datasets that feed pseudo masks to a segmentation training loop.

Both return (image, mask): image float32 [3, H, W] in [0, 1], mask int64 [H, W] with class
indices 0..20 and IGNORE_INDEX (255) for pixels to leave out of the loss
(`torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)`). A `transform(image, mask)` may
crop, resize or augment both together (it receives and returns the tensors above).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .export import MASK_FOLDER
from .masks import decode_image, decode_mask, read_image
from .postprocess import IGNORE_INDEX
from .safe_paths import file_in

__all__ = ["IGNORE_INDEX", "PseudoMaskFolder", "PseudoMaskShards"]

Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image is {image.shape[:2]} but its mask is {mask.shape}")
    return (torch.from_numpy(image).permute(2, 0, 1).float() / 255.0,
            torch.from_numpy(mask.astype(np.int64)))


class PseudoMaskFolder(Dataset):
    """Map-style over an exported folder (`pseudolabel export --images`): JPEGImages/,
    SegmentationClassPseudo/ and ImageSets/Segmentation/<split>.txt."""

    def __init__(self, root: str | Path, split: str = "train_aug", transform: Transform | None = None,
                 images_dir: str | Path | None = None):
        self.root = Path(root)
        self.images_dir = Path(images_dir) if images_dir else self.root / "JPEGImages"
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"{split_file} not found: export the job with pseudolabel export --split {split}")
        self.ids = split_file.read_text().split()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_id = self.ids[index]
        image = read_image(file_in(self.images_dir, image_id, ".jpg"))
        mask = decode_mask(file_in(self.root / MASK_FOLDER, image_id, ".png").read_bytes())
        image_t, mask_t = _to_tensors(image, mask)
        return self.transform(image_t, mask_t) if self.transform else (image_t, mask_t)


class PseudoMaskShards(IterableDataset):
    """Iterable over a job's mask shards joined with the image shards they were made from, by id
    (no export needed). Shards are split across DataLoader workers; failed images are skipped."""

    def __init__(self, job_output: str | Path, transform: Transform | None = None):
        from .outputs import JobOutput

        self.job = JobOutput(job_output)
        self.transform = transform

    def __iter__(self):
        from .shards import read_shard

        shards = self.job.mask_shards()
        worker = get_worker_info()
        if worker is not None:
            shards = shards[worker.id :: worker.num_workers]
        for mask_shard in shards:
            masks = {s["__key__"]: s["png"] for s in read_shard(str(mask_shard))}
            for sample in self.job.input_samples(mask_shard.stem):
                if sample["__key__"] not in masks:
                    continue
                image = decode_image(sample["jpg"], sample["__key__"])
                image_t, mask_t = _to_tensors(image, decode_mask(masks[sample["__key__"]]))
                yield self.transform(image_t, mask_t) if self.transform else (image_t, mask_t)
