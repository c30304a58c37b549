"""Training datasets: map-style over an export, iterable over the shards; a training step."""

import numpy as np
import pytest
import torch

from conftest import make_job_output, synthetic_image
from pipeline.data.dataset import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, PseudoMaskFolder, PseudoMaskShards, VocTrainTransform
from pipeline.results.export import export_voc
from pipeline.data.outputs import JobOutput, MaskFilter


def test_folder_and_shard_datasets_agree(tmp_path):
    out, gts = make_job_output(tmp_path, lambda gt, i: gt)
    export_voc(JobOutput(out), tmp_path / "export", with_images=True)
    folder = PseudoMaskFolder(tmp_path / "export")
    assert len(folder) == 4
    with pytest.raises(FileNotFoundError, match=r"val.txt not found: the export has train_aug: pass split='train_aug', "
                                                r"or export the job with pseudolabel export --split val"):
        PseudoMaskFolder(tmp_path / "export", split="val")
    image, mask = folder[0]
    assert image.shape == (3, 30, 45) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert mask.dtype == torch.int64 and (mask.numpy() == gts[folder.ids[0]]).all()
    streamed = list(PseudoMaskShards(out))
    assert len(streamed) == 4
    for (img_a, mask_a), index in zip(streamed, range(4)):
        img_b, mask_b = folder[index]
        assert torch.equal(img_a, img_b) and torch.equal(mask_a, mask_b)


@pytest.mark.parametrize("filters", [dict(min_confidence=0.5), dict(ignore_below=0.5), dict(require_all_labels=True),
                                     dict(min_confidence=0.3, ignore_below=0.7)])
def test_the_streamed_masks_take_the_exports_filters(tmp_path, filters):
    # confidence 0.2, 0.4, 0.6, 0.8 by image; image 1 predicted without its second class (a missed label)
    out, gts = make_job_output(tmp_path, lambda gt, i: np.where(gt == 12, 0, gt) if i == 1 else gt)
    keep = MaskFilter(min_mean_confidence=filters.get("min_confidence"),
                      require_all_labels=filters.get("require_all_labels", False), ignore_below=filters.get("ignore_below"))
    export_voc(JobOutput(out), tmp_path / "export", with_images=True, keep=keep)
    exported = PseudoMaskFolder(tmp_path / "export")
    streamed = PseudoMaskShards(out, with_keys=True, **filters)
    samples = list(streamed)
    assert [key for key, _, _ in samples] == exported.ids and len(streamed) == len(exported) < 4 + ("ignore_below" in
                                                                                                   filters)
    for (_, image, mask), index in zip(samples, range(len(exported))):
        assert torch.equal(image, exported[index][0]) and torch.equal(mask, exported[index][1])
    if "ignore_below" in filters:
        assert (samples[0][2] == IGNORE_INDEX).all() and not (samples[-1][2] == IGNORE_INDEX).any()
    with pytest.raises(ValueError, match=r"min_confidence=50: a winning score, from 0 to 1"):
        PseudoMaskShards(out, min_confidence=50)


def test_the_folder_dataset_reads_one_id_a_line_spaces_and_all(tmp_path):
    from PIL import Image

    from pipeline.mask.codec import encode_mask

    for folder in ("JPEGImages", "SegmentationClassPseudo", "ImageSets/Segmentation"):
        (tmp_path / folder).mkdir(parents=True)
    for image_id in ("old sofa", "cat"):  # a third-party shard's key may hold a space
        Image.fromarray(synthetic_image(8, 10, seed=1)).save(tmp_path / "JPEGImages" / f"{image_id}.jpg")
        (tmp_path / "SegmentationClassPseudo" / f"{image_id}.png").write_bytes(encode_mask(np.ones((8, 10), np.uint8)))
    (tmp_path / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("old sofa\ncat\n\n")
    folder = PseudoMaskFolder(tmp_path)
    assert folder.ids == ["old sofa", "cat"] and folder[0][1].shape == (8, 10)


def test_a_training_step_consumes_the_masks(tmp_path):
    out, _ = make_job_output(tmp_path, lambda gt, i: np.where(np.arange(gt.shape[1]) < 3, 255, gt))
    crop = lambda image, mask: (image[:, :24, :24], mask[:24, :24])  # noqa: E731
    loader = torch.utils.data.DataLoader(PseudoMaskShards(out, transform=crop), batch_size=2, num_workers=2)
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 21, 1))
    optimiser = torch.optim.SGD(head.parameters(), lr=0.5)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    losses = []
    for _ in range(5):
        for images, masks in loader:
            assert (masks == IGNORE_INDEX).any()
            loss = loss_fn(head(images), masks)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
    assert len(losses) == 10 and losses[-1] < losses[0]


def test_two_ranks_of_two_workers_see_each_image_once(tmp_path, monkeypatch):
    out, gts = make_job_output(tmp_path, lambda gt, i: gt, per_shard=1)  # 4 mask shards
    seen, lengths = [], []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dataset = PseudoMaskShards(out, with_keys=True, shuffle=4, seed=1)
        dataset.set_epoch(3)
        lengths.append(len(dataset))
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
        keys = [key for key, _, _ in loader]
        assert len(keys) == lengths[-1]
        seen += keys
    assert sorted(seen) == sorted(gts) and lengths == [2, 2]


@pytest.mark.parametrize("num_workers", [0, 2, 3])
@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_ranks_holding_unequal_images_run_the_same_number_of_batches(tmp_path, monkeypatch, num_workers):
    # 4 mask shards of one image, the last image failed: rank 0's shards hold 2 images, rank 1's 1.
    # Under DDP a rank with fewer batches leaves the others waiting in a gradient exchange.
    out, gts = make_job_output(tmp_path, lambda gt, i: None if i == 3 else gt, per_shard=1)
    batches, seen = [], []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dataset = PseudoMaskShards(out, with_keys=True)
        loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=num_workers)
        keys = [batch_keys for batch_keys, _, _ in loader]  # one tuple of keys a batch
        assert len(dataset) == len(keys) == 2
        batches.append(len(keys))
        seen.append([key for batch_keys in keys for key in batch_keys])
    assert batches[0] == batches[1]
    assert sorted(seen[0]) == ["2011_000000", "2011_000002"]
    assert seen[1] == ["2011_000001", "2011_000001"]  # its one image twice, as DistributedSampler pads


def test_a_rank_without_a_shard_of_its_own_still_yields_its_share(tmp_path, monkeypatch):
    out, gts = make_job_output(tmp_path, lambda gt, i: gt, per_shard=2)  # 2 mask shards, 3 ranks
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    dataset = PseudoMaskShards(out, with_keys=True)
    keys = [key for key, _, _ in dataset]
    assert len(dataset) == len(keys) == 2 and set(keys) <= set(gts)


def test_persistent_workers_take_a_new_shard_order_each_epoch(tmp_path):
    # A DataLoader's persistent workers keep the copy of the dataset they started with, which set_epoch does not reach.
    out, _ = make_job_output(tmp_path, lambda gt, i: gt, per_shard=1)

    def order(epoch, **loader_args):
        reference = PseudoMaskShards(out, with_keys=True, shuffle=1, seed=5)
        reference.set_epoch(epoch)
        return [key for key, _, _ in torch.utils.data.DataLoader(reference, batch_size=None, **loader_args)]

    expected = [order(epoch) for epoch in range(3)]
    assert len({tuple(keys) for keys in expected}) > 1  # the seed gives the epochs different orders
    assert [order(epoch, num_workers=1) for epoch in range(3)] == expected
    dataset = PseudoMaskShards(out, with_keys=True, shuffle=1, seed=5)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1, persistent_workers=True)
    seen = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        seen.append([key for key, _, _ in loader])
    assert seen == expected


def test_voc_train_transform_scales_pads_crops_and_normalises():
    torch.manual_seed(0)
    transform = VocTrainTransform(crop_size=64, scale_range=(0.5, 0.5))
    image, mask = torch.ones(3, 40, 60), torch.full((40, 60), 7, dtype=torch.long)
    out_image, out_mask = transform(image, mask)
    assert out_image.shape == (3, 64, 64) and out_mask.shape == (64, 64)
    # the 20 x 30 image is padded: mask 255, image 0 (the mean colour); its own pixels normalised
    assert (out_mask == 7).sum() == 20 * 30 and (out_mask == IGNORE_INDEX).sum() == 64 * 64 - 600
    white = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    inside = out_mask == 7
    torch.testing.assert_close(out_image[:, inside].mean(dim=1), white)
    assert (out_image[:, ~inside] == 0).all()
    big = VocTrainTransform(crop_size=16, scale_range=(2.0, 2.0))(image, mask)
    assert big[0].shape == (3, 16, 16) and (big[1] == 7).all()
