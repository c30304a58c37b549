"""The job on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head
and two worker nodes, the way Ray tests itself), token authentication on: the job spreads over
the nodes, and a worker node removed mid-job loses and duplicates nothing (CPU, tiny model)."""

import io
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAST_CONFIG, write_voc_shards
from pipeline.config import load_config
from pipeline.data.ledger import Ledger
from pipeline.data.shards import read_shard
from pipeline.job.worker import ShardWorker

pytestmark = [pytest.mark.faults, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

LABELS = [(8, 18), (12, 0), (15, 0), (1, 15), (7, 0), (20, 16), (3, 0), (9, 13)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Four shards of two images each (the slow first image of each shard keeps a shard busy)."""
    return write_voc_shards(tmp_path_factory.mktemp("cluster-job"), "2012_00000", LABELS)


def _masks(out):
    masks = {}
    for tar in sorted((out / "masks").glob("*.tar")):
        for sample in read_shard(str(tar)):
            assert sample["__key__"] not in masks, "an image written twice"
            masks[sample["__key__"]] = np.array(Image.open(io.BytesIO(sample["png"]))).tobytes()
    return masks


def _one_node_masks(shards):
    """The same shards through one in-process worker, no Ray."""
    worker = ShardWorker("tiny", load_config(FAST_CONFIG).model_dump_json(), device="cpu")
    masks = {}
    for tar in sorted(shards.glob("*.tar")):
        for sample in worker.process_shard(str(tar), tar.stem).mask_samples:
            masks[sample["__key__"]] = np.array(Image.open(io.BytesIO(sample["png"]))).tobytes()
    return masks


def test_a_job_spreads_over_the_nodes_and_survives_losing_one(shards, tmp_path):
    # In a process of its own: Ray reads RAY_AUTH_MODE once per process, and the other tests'
    # private Ray runs without a token.
    out = tmp_path / "out"
    # Its own Ray temp folder: a test cluster records its address in RAY_TMPDIR/ray, where
    # `ray start` clusters of the user's are recorded by default.
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), PYTHONUNBUFFERED="1",
               RAY_TMPDIR=ray_tmp)
    env.pop("RAY_ADDRESS")
    try:
        run = subprocess.run([sys.executable, str(Path(__file__).with_name("cluster_scenario.py")), str(shards),
                              str(out), FAST_CONFIG], capture_output=True, text=True, env=env, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1])
    assert report["removed"], f"no worker node was removed while the job ran: {report}"
    assert report["nodes_used"] == 2, "the two workers did not run on two nodes"
    # the cluster's 4 CPUs shared by its 2 workers
    assert "2 segmenter worker(s) on cpu over 2 nodes (2 torch threads each); 2 image(s) per batch\n" in run.stdout
    assert report["summary"] == [4, 0, len(LABELS)]  # shards done, shards failed, images ok
    entries = Ledger(out).entries()
    assert [e.state for e in entries] == ["done"] * 4
    assert all(Ledger(out).outputs_intact(e) for e in entries)
    masks = _masks(out)
    assert sorted(masks) == sorted(f"2012_00000{i}" for i in range(len(LABELS)))  # each image once
    assert masks == _one_node_masks(shards)
