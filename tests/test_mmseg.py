"""The shipped mmsegmentation configs (configs/mmseg/) load with mmengine, point at an export by
their one variable, and mmseg's own registry builds the dataset and runs its train pipeline.
Needs `pip install -e ".[mmseg]"`; skipped without it."""

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import make_job_output
from pipeline.results.export import export_voc
from pipeline.data.outputs import JobOutput

pytest.importorskip("mmseg", reason='mmsegmentation is not installed: pip install -e ".[mmseg]"')
pytest.importorskip("mmengine", reason='mmengine is not installed: pip install -e ".[mmseg]"')

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "mmseg"


@pytest.fixture(scope="module")
def mmseg_registry():
    # mmcv-lite has no compiled ops; mmseg.utils imports mmcv.ops.point_sample at import time
    # (for mask-classification heads), which the datasets and transforms never call.
    try:
        import mmcv.ops  # noqa: F401
    except ImportError:
        sys.modules["mmcv.ops"] = types.SimpleNamespace(point_sample=None)
    from mmengine.registry import init_default_scope

    import mmseg.datasets  # noqa: F401  (registers datasets and transforms)
    from mmseg.registry import DATASETS

    init_default_scope("mmseg")
    return DATASETS


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mmseg")
    out, gts = make_job_output(tmp, lambda gt, i: np.where(np.arange(gt.shape[1]) < 3, 255, gt))
    export_voc(JobOutput(out), tmp / "pseudo-voc", with_images=True)
    return tmp / "pseudo-voc", gts


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.py")))
def test_shipped_config_trains_on_the_export(name, export, mmseg_registry, tmp_path):
    from mmengine.config import Config

    root, gts = export
    text = (CONFIGS / name).read_text()
    assert len(re.findall(r"^pseudo_root = '[^']*'", text, flags=re.M)) == 1
    edited = tmp_path / name  # what a user does: copy the file, edit its one line
    edited.write_text(re.sub(r"^pseudo_root = '[^']*'", f"pseudo_root = '{root}/'", text, flags=re.M))
    config = Config.fromfile(str(edited))
    if "coco" in name:  # 81 classes, no VOC validation
        assert len(config.classes) == 81 and config.classes[80] == "toothbrush" and config.val_dataloader is None
    else:
        val = config.val_dataloader.dataset
        assert val.data_root == "data/VOCdevkit/VOC2012" and val.data_prefix.seg_map_path == "SegmentationClass"
    dataset = mmseg_registry.build(config.train_dataloader.dataset)
    assert len(dataset) == len(gts)
    for index in range(len(dataset)):
        sample = dataset[index]  # through the config's train pipeline
        labels = set(sample["data_samples"].gt_sem_seg.data.unique().tolist())
        assert sample["inputs"].shape[0] == 3 and labels <= {0, 1, 7, 8, 12, 15, 18, 20, 255} and labels - {255}
    if "deeplabv3plus" in name:
        assert config.model.decode_head.num_classes == 21
