"""Training datasets: map-style over an export, iterable over the shards; a training step."""

import numpy as np
import torch

from conftest import make_job_output
from pipeline.dataset import IGNORE_INDEX, PseudoMaskFolder, PseudoMaskShards
from pipeline.export import export_voc
from pipeline.outputs import JobOutput


def test_folder_and_shard_datasets_agree(tmp_path):
    out, gts = make_job_output(tmp_path, lambda gt, i: gt)
    export_voc(JobOutput(out), tmp_path / "export", with_images=True)
    folder = PseudoMaskFolder(tmp_path / "export")
    assert len(folder) == 4
    image, mask = folder[0]
    assert image.shape == (3, 30, 45) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert mask.dtype == torch.int64 and (mask.numpy() == gts[folder.ids[0]]).all()
    streamed = list(PseudoMaskShards(out))
    assert len(streamed) == 4
    for (img_a, mask_a), index in zip(streamed, range(4)):
        img_b, mask_b = folder[index]
        assert torch.equal(img_a, img_b) and torch.equal(mask_a, mask_b)


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
