"""The job on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head
and two worker nodes, the way Ray tests itself), token authentication on: the job spreads over
the nodes, and a worker node removed mid-job loses and duplicates nothing (CPU, tiny model)."""

import io
import json
import os
import re
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


def _one_node_masks(shards, threads: int):
    """The same shards through one in-process worker on as many torch threads, no Ray (another
    count sums in another order: a few pixels of the tiny model's near-even maps change)."""
    worker = ShardWorker("tiny", load_config(FAST_CONFIG).model_dump_json(), device="cpu", threads=threads)
    masks = {}
    for tar in sorted(shards.glob("*.tar")):
        for sample in worker.process_shard(str(tar), tar.stem).mask_samples:
            masks[sample["__key__"]] = np.array(Image.open(io.BytesIO(sample["png"]))).tobytes()
    return masks


def _run_scenario(shards, out, layout: str, retries: int = 2) -> tuple[dict, str]:
    """cluster_scenario.py's JSON line and its whole output, in a process of its own: Ray reads
    RAY_AUTH_MODE once per process, and the other tests' private Ray runs without a token."""
    # Its own Ray temp folder: a test cluster records its address in RAY_TMPDIR/ray, where
    # `ray start` clusters of the user's are recorded by default.
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), PYTHONUNBUFFERED="1",
               RAY_TMPDIR=ray_tmp)
    env.pop("RAY_ADDRESS")
    try:
        run = subprocess.run([sys.executable, str(Path(__file__).with_name("cluster_scenario.py")), str(shards),
                              str(out), FAST_CONFIG, layout, str(retries)], capture_output=True, text=True, env=env,
                             timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1]), run.stdout


def _assert_every_image_once_as_on_one_node(out, shards, threads: int = 2):
    entries = Ledger(out).entries()
    assert [e.state for e in entries] == ["done"] * 4
    assert all(Ledger(out).outputs_intact(e) for e in entries)
    masks = _masks(out)
    assert sorted(masks) == sorted(f"2012_00000{i}" for i in range(len(LABELS)))  # each image once
    assert masks == _one_node_masks(shards, threads)


def test_a_job_spreads_over_the_nodes_and_survives_losing_one(shards, tmp_path):
    out = tmp_path / "out"
    report, stdout = _run_scenario(shards, out, "spare")
    assert report["removed"], f"no worker node was removed while the job ran: {report}"
    assert report["nodes_used"] == 2, "the two workers did not run on two nodes"
    # the cluster's 4 CPUs shared by its 2 workers
    assert "2 segmenter worker(s) on cpu over 2 nodes (2 torch threads each); 2 image(s) per batch\n" in stdout
    assert report["summary"] == [4, 0, len(LABELS)]  # shards done, shards failed, images ok
    _assert_every_image_once_as_on_one_node(out, shards)


def test_the_shards_of_a_worker_lost_with_its_node_and_placeable_nowhere_go_to_the_other_worker(shards, tmp_path):
    """A head of 1 CPU and two nodes of 2: each worker asks 1.5 CPUs, so the worker of the node
    removed fits on no node left. The job waited for it at its end, saying nothing, for as long
    as no node came back (for ever here); its shards now go to the other worker."""
    out = tmp_path / "out"
    report, stdout = _run_scenario(shards, out, "tight")
    assert report["removed"], f"no worker node was removed while the job ran: {report}"
    assert "2 segmenter worker(s) on cpu over 2 nodes (2 torch threads each); 2 image(s) per batch\n" in stdout
    lost = [line for line in stdout.splitlines() if "restarting (a node or process was lost)" in line]
    assert len(lost) == 1 and lost[0].startswith(
        "1 of 2 segmenter worker(s) restarting (a node or process was lost) not ready after 3 s, and no node has the "
        "1.5 CPU each asks free ("), stdout
    assert lost[0].endswith("): its 2 shard(s) go to the other 1 worker(s), and it takes shards again once ready")
    assert report["summary"] == [4, 0, len(LABELS)]
    _assert_every_image_once_as_on_one_node(out, shards)


def test_a_job_whose_only_worker_lost_its_node_says_that_it_waits_and_goes_on_once_a_node_joins(shards, tmp_path):
    """A head of 1 CPU and one node of 2, the only worker asking 2 CPUs: its node removed, the
    job says once that it waits; a node joins (`ray start --address`), Ray restarts the worker
    there, and the job says it goes on and ends with every image once, as on one node."""
    out = tmp_path / "out"
    report, stdout = _run_scenario(shards, out, "alone")
    assert report["removed"], f"no worker node was removed while the job ran: {report}"
    assert "1 segmenter worker(s) on cpu (2 torch threads each); 2 image(s) per batch\n" in stdout
    lines = stdout.splitlines()
    waits = [i for i, line in enumerate(lines) if "restarting (a node or process was lost)" in line]
    assert len(waits) == 1 and lines[waits[0]].startswith(
        "1 of 1 segmenter worker(s) restarting (a node or process was lost) not ready after 3 s, and no node has the "
        "2 CPU each asks free (1 of 1 CPUs free; "), stdout
    assert lines[waits[0]].endswith("): the job waits for them, or Ctrl-C stops it")
    back = lines.index("segmenter worker 1 of 1 is ready again and goes on with its shards")
    assert back > waits[0]
    assert report["summary"] == [4, 0, len(LABELS)]
    _assert_every_image_once_as_on_one_node(out, shards)


def test_a_worker_that_died_with_no_retries_left_and_fits_on_no_node_is_waited_for_saying_so(shards, tmp_path):
    """The same with --retries 0: the shards the worker held fail, and the job waited for the
    worker to come back in place, reading nothing else and deaf to Ctrl-C, for ever where no
    node came back (here: saying nothing, so no node joined). It now says that it waits and
    gives the worker shards once Ray has restarted it."""
    out = tmp_path / "out"
    report, stdout = _run_scenario(shards, out, "alone", retries=0)
    assert report["removed"], f"no worker node was removed while the job ran: {report}"
    lines = stdout.splitlines()
    waits = [i for i, line in enumerate(lines) if "restarting (a node or process was lost)" in line]
    assert len(waits) == 1 and lines[waits[0]].endswith("): the job waits for them, or Ctrl-C stops it"), stdout
    back = [i for i, line in enumerate(lines) if line.startswith("segmenter worker 1 of 1 is ready again and ")]
    assert back and back[0] > waits[0], stdout
    done, failed, images_ok = report["summary"]
    assert done + failed == 4 and failed >= 1 and images_ok == 2 * done
    entries = Ledger(out).entries()
    assert all(e.error.startswith("worker died once on this shard: ") for e in entries if e.state == "failed")
    masks, one_node = _masks(out), _one_node_masks(shards, 2)
    assert masks and masks == {key: one_node[key] for key in masks}


def test_a_job_that_waits_for_all_its_lost_workers_gives_the_first_one_back_the_shards_of_the_others(shards, tmp_path):
    """As `tight`, both worker nodes removed: the job says once that it waits for the two; a node
    joins that holds one of them. That worker says it is back and goes on, and then takes the
    other's shards: they stayed with the worker still lost, and the job waited for it for ever."""
    out = tmp_path / "out"
    report, stdout = _run_scenario(shards, out, "both")
    assert report["removed"], f"no worker node was removed while the job ran: {report}"
    lines = stdout.splitlines()

    def where(pattern: str) -> list[int]:
        return [i for i, line in enumerate(lines) if re.fullmatch(pattern, line)]

    waits = where(r"2 of 2 segmenter worker\(s\) restarting .*: the job waits for them, or Ctrl-C stops it")
    back = where(r"segmenter worker [12] of 2 is ready again and goes on with its shards")
    handed = where(r"1 of 2 segmenter worker\(s\) restarting .*: its [12] shard\(s\) go to the other 1 "
                   r"worker\(s\), and it takes shards again once ready")
    assert len(waits) == 1 and len(back) == 1 and len(handed) == 1, stdout
    assert waits[0] < back[0] < handed[0], stdout
    assert report["summary"] == [4, 0, len(LABELS)]
    _assert_every_image_once_as_on_one_node(out, shards)
