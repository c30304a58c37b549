"""torch datasets that feed pseudo masks to a segmentation training loop.

Both return (image, mask): image float32 [3, H, W] in [0, 1], mask int64 [H, W] with class
indices (0 background) and IGNORE_INDEX (255) for pixels to leave out of the loss
(`torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)`). A `transform(image, mask)` may
crop, resize or augment both together (it receives and returns the tensors above);
`VocTrainTransform` is the standard VOC training augmentation.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import Dataset, IterableDataset

from pipeline.data.outputs import MASK_FOLDER
from pipeline.mask.codec import IGNORE_INDEX, decode_image, decode_mask, read_image
from pipeline.data.safe_paths import file_in
from pipeline.data.shards import sample_image

__all__ = ["IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "PseudoMaskFolder", "PseudoMaskShards",
           "VocTrainTransform"]

Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VocTrainTransform:
    """The standard VOC training augmentation (DeepLab, mmsegmentation): ImageNet
    normalisation, a random scale in scale_range (bilinear image, nearest mask), padding to
    crop_size (image 0, i.e. the mean colour after normalisation; mask IGNORE_INDEX), a random
    crop_size x crop_size crop and a horizontal flip with probability 0.5. Randomness comes
    from torch's generator, which DataLoader seeds per worker.

    image float32 [3, H, W] in [0, 1], mask int64 [H, W] -> normalised image [3, S, S], mask [S, S].
    """

    def __init__(self, crop_size: int = 512, scale_range: tuple[float, float] = (0.5, 2.0),
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        if crop_size < 1 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"crop_size {crop_size} and scale_range {scale_range}: need crop_size >= 1 and "
                             "0 < low <= high")
        self.crop_size = crop_size
        self.scale_range = scale_range
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = (image - self.mean) / self.std
        low, high = self.scale_range
        scale = low + (high - low) * float(torch.rand(()))
        height, width = mask.shape
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
        pad_h, pad_w = max(self.crop_size - size[0], 0), max(self.crop_size - size[1], 0)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        top = int(torch.randint(0, mask.shape[0] - self.crop_size + 1, ()))
        left = int(torch.randint(0, mask.shape[1] - self.crop_size + 1, ()))
        image = image[:, top:top + self.crop_size, left:left + self.crop_size]
        mask = mask[top:top + self.crop_size, left:left + self.crop_size]
        if float(torch.rand(())) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return image.contiguous(), mask.contiguous()


def _to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image is {image.shape[:2]} but its mask is {mask.shape}")
    return (torch.from_numpy(image).permute(2, 0, 1).float() / 255.0,
            torch.from_numpy(mask.astype(np.int64)))


class PseudoMaskFolder(Dataset):
    """Map-style over an exported folder (`pseudolabel export --with-images`): JPEGImages/,
    SegmentationClassPseudo/ and ImageSets/Segmentation/<split>.txt. With DDP, wrap it in
    `torch.utils.data.DistributedSampler` as any map-style dataset."""

    def __init__(self, root: str | Path, split: str = "train_aug", transform: Transform | None = None,
                 images_dir: str | Path | None = None):
        self.root = Path(root)
        self.images_dir = Path(images_dir) if images_dir else self.root / "JPEGImages"
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            present = sorted(path.stem for path in split_file.parent.glob("*.txt"))
            found = f"the export has {', '.join(present)}: pass split={present[0]!r}, or " if present else ""
            raise FileNotFoundError(f"{split_file} not found: {found}export the job with pseudolabel export --split "
                                    f"{split}")
        self.ids = [line.strip() for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
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
    (no export needed); failed images are skipped.

    Shards are split with WebDataset's own splitters: first by distributed rank
    (`torch.distributed`, or the RANK and WORLD_SIZE variables), then by DataLoader worker.
    In one process each image is seen once per epoch. Under DDP every rank yields the same
    number of images per epoch, that of the rank whose shards hold the most (a rank with fewer
    goes round its shards again, as DistributedSampler pads), and its DataLoader workers take
    every num_workers-th of them: ranks then run the same number of batches, where ranks
    holding unequal shards would leave one waiting at the epoch's end for a gradient exchange
    that never comes. Every image is seen at least once per epoch. shuffle: WebDataset's sample
    buffer of that size (0: in shard order); the shard order is shuffled too, the same on every
    rank, per `set_epoch(epoch)`, and each pass after it counts as the next epoch (a
    DataLoader's persistent workers keep their own copy of the dataset, which `set_epoch`
    does not reach). len() is the number of images a rank yields in the next pass, from the
    job's statistics. with_keys: yield (id, image, mask). min_confidence, require_all_labels
    and ignore_below filter the masks as `pseudolabel export`'s options of those names do:
    images whose mean winning score (0 to 1) is lower, or where a labelled class got no pixel,
    are left out; pixels scoring lower than ignore_below become IGNORE_INDEX.
    """

    def __init__(self, job_output: str | Path, transform: Transform | None = None, shuffle: int = 0,
                 seed: int = 0, with_keys: bool = False, min_confidence: float | None = None,
                 require_all_labels: bool = False, ignore_below: float | None = None):
        from pipeline.data.outputs import JobOutput, MaskFilter

        for name, value in (("min_confidence", min_confidence), ("ignore_below", ignore_below)):
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"{name}={value}: a winning score, from 0 to 1")
        self.keep = MaskFilter(min_mean_confidence=min_confidence, require_all_labels=require_all_labels,
                               ignore_below=ignore_below)
        self.job = JobOutput(job_output)
        self.transform = transform
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self._passes = 0  # passes begun since set_epoch: the epoch of the next one is epoch + _passes
        self.with_keys = with_keys
        self.shards = [str(path) for path in self.job.mask_shards()]
        rows = self.job.stats().select(["shard", "status", "mean_confidence", "missed_labels"]).to_pylist()
        self._images_per_shard = Counter(row["shard"] for row in rows
                                         if row["status"] == "ok" and self.keep.rejects(row) is None)

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the shards for this epoch (call it on every rank, as DistributedSampler's)."""
        self.epoch = epoch
        self._passes = 0

    def _shard_order(self) -> list[str]:
        """The shards in the next pass's order."""
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + self.epoch + self._passes).shuffle(shards)  # the same order on every rank
        return shards

    def _images_in(self, urls: list[str]) -> int:
        return sum(self._images_per_shard[Path(url).stem] for url in urls)

    def __len__(self) -> int:
        return self._rank_images(self._shard_order())

    def _rank_images(self, order: list[str]) -> int:
        """The images a rank yields in a pass over the shards in this order."""
        _, world_size, _, _ = wds.utils.pytorch_worker_info()
        if world_size == 1:
            return self._images_in(order)
        return max(self._images_in(order[r::world_size]) for r in range(world_size))

    def _decoded(self, record, sample: dict) -> tuple[str, torch.Tensor, torch.Tensor]:
        """A mask record and its input sample -> (id, image, mask) tensors, the mask's pixels
        filtered."""
        return record.id, *_to_tensors(decode_image(sample_image(sample), record.id), self.keep.labels(record))

    def _kept(self, urls: list[str]):
        """(record, input sample) of the masks in these mask shards that the filters keep and
        whose image their input shard holds."""
        for record, sample in self.job.joined([Path(url) for url in urls]):
            if sample is not None and self.keep.rejects(record.stats) is None:
                yield record, sample

    def _joined(self, urls):
        """Mask shard urls -> (id, image, mask) tensors: each mask joined with its image."""
        for record, sample in self._kept([url["url"] for url in urls]):
            yield self._decoded(record, sample)

    def _rank_joined(self, urls, order: list[str]):
        """Under DDP: this rank's mask shard urls (of the pass over `order`) -> the (id, image,
        mask) tensors of this DataLoader worker, `_rank_images(order)` of them over the rank's
        workers: the rank's images in shard order, round again until that count, every
        num_workers-th one (the others are skipped before decoding). A rank without a shard of
        its own (more ranks than shards) goes round every shard."""
        _, _, worker, num_workers = wds.utils.pytorch_worker_info()
        count = self._rank_images(order)
        mine = [url["url"] for url in urls] or order
        index = 0
        while index < count:
            start = index
            for record, sample in self._kept(mine):
                if index % num_workers == worker:
                    yield self._decoded(record, sample)
                index += 1
                if index == count:
                    return
            if index == start:  # shards with no image kept (failed, or filtered out): pad from the whole job's
                if mine == order:
                    return
                mine = order

    def _finished(self, samples):
        for key, image, mask in samples:
            image, mask = self.transform(image, mask) if self.transform else (image, mask)
            yield (key, image, mask) if self.with_keys else (image, mask)

    def __iter__(self):
        _, world_size, _, _ = wds.utils.pytorch_worker_info()
        order = self._shard_order()
        self._passes += 1
        if world_size == 1:
            stages = [wds.SimpleShardList(order), wds.split_by_node, wds.split_by_worker, self._joined]
        else:
            stages = [wds.SimpleShardList(order), wds.split_by_node, lambda urls: self._rank_joined(urls, order)]
        if self.shuffle:
            stages.append(wds.shuffle(self.shuffle))
        stages.append(self._finished)
        return iter(wds.DataPipeline(*stages))
