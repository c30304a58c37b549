"""The batch job on a local Ray: full run, rerun, bad samples, kills and resume (CPU, tiny model)."""

import contextlib
import io
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import pyarrow.dataset as ds
import pytest
from PIL import Image

from conftest import FAST_CONFIG, needs_crf, needs_curl, write_voc_shards
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data.ledger import JobMismatchError, Ledger, ShardEntry
from pipeline.job.runner import run_job
from pipeline.data.atomic import file_sha256
from pipeline.data.shards import encode_json, read_shard, tar_bytes
from pipeline.mask.stats import STATS_SCHEMA

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards of two images; one JPEG is corrupt and one label unknown (in shard 1)."""
    tmp = tmp_path_factory.mktemp("job")
    write_voc_shards(tmp, "2010_00000", [(8, 18), (12, 0), (15, 0), (1, 15), (7, 0), (20, 16)])
    # Replace shard 1 by one with a corrupt JPEG and a label no config knows.
    samples = list(read_shard(str(tmp / "shards" / "voc-train-000001.tar")))
    samples[0]["jpg"] = samples[0]["jpg"][:200]
    meta = json.loads(samples[1]["json"])
    meta["names"] = ["person", "unicorn"]
    samples[1]["json"] = encode_json(meta)
    (tmp / "shards" / "voc-train-000001.tar").write_bytes(tar_bytes(samples))
    _update_manifest(tmp / "shards")
    return tmp / "shards"


def _update_manifest(folder: Path) -> None:
    """Record the shards' present sha256 in the folder's manifest.json, as sharding again would."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for shard in manifest["shards"]:
        shard["sha256"] = file_sha256(folder / shard["url"])
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _outputs(out: Path) -> tuple[dict, list[dict]]:
    """Masks by id (decoded index arrays as bytes) and stats rows without timings, sorted by id."""
    masks = {}
    for tar in sorted((out / "masks").glob("*.tar")):
        for sample in read_shard(str(tar)):
            assert sample["__key__"] not in masks, "duplicate id"
            mask = np.array(Image.open(io.BytesIO(sample["png"])))
            masks[sample["__key__"]] = (mask.shape, mask.tobytes())
    rows = ds.dataset(out / "stats", format="parquet").to_table().to_pylist()
    for row in rows:
        row.pop("seconds")
    return masks, sorted(rows, key=lambda r: r["id"])


@pytest.fixture(scope="module")
def clean_run(ray_local, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    summary = run_job(str(shards), out, load_config(FAST_CONFIG), "tiny", workers=1, progress=False)
    return out, summary


def test_full_run_writes_masks_stats_and_ledger(clean_run):
    out, summary = clean_run
    assert (summary.shards_done, summary.shards_failed, summary.images_ok, summary.images_failed) == (3, 0, 4, 2)
    assert summary.workers == 1 and 0.0 < summary.model_seconds <= summary.processing_seconds
    # on a CPU a batch is computed while it is queued: queueing is nearly all of the model time
    assert 0.9 < summary.host_queueing < 1.05
    assert f"model busy {summary.model_busy:.0%}" in summary.line
    masks, rows = _outputs(out)
    assert sorted(masks) == ["2010_000000", "2010_000001", "2010_000004", "2010_000005"]
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    table = ds.dataset(out / "stats", format="parquet").to_table()
    assert table.schema.equals(STATS_SCHEMA)
    by_id = {r["id"]: r for r in rows}
    for image_id, (shape, data) in masks.items():
        row, mask = by_id[image_id], np.frombuffer(data, dtype=np.uint8).reshape(shape)
        assert row["status"] == "ok" and mask.shape == (48, 64)
        assert set(np.unique(mask)) <= {0, *row["labels"]}
        assert row["labels"] == sorted(row["labels"])
        assert abs(sum(row["class_pixel_fraction"]) + row["background_fraction"] - 1) < 1e-5
    corrupt, unknown = by_id["2010_000002"], by_id["2010_000003"]
    assert corrupt["status"] == "failed" and "cannot decode image 2010_000002" in corrupt["error"]
    assert unknown["status"] == "failed" and "unknown class name 'unicorn'" in unknown["error"]
    entries = Ledger(out).entries()
    assert [e.state for e in entries] == ["done"] * 3 and all(e.attempts == 1 for e in entries)
    assert entries[1].failed_samples == 2


def test_rerun_does_nothing(clean_run, shards):
    out, _ = clean_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "ledger").iterdir()}
    summary = run_job(str(shards), out, load_config(FAST_CONFIG), "tiny", workers=1, progress=False)
    assert (summary.shards_done, summary.shards_skipped) == (0, 3)
    assert summary.line == "nothing to run: the 3 input shard(s) were done before (or failed before and are skipped)"
    assert {p.name: p.stat().st_mtime_ns for p in (out / "ledger").iterdir()} == before


@needs_crf
def test_another_config_on_the_same_output_is_refused(clean_run, shards, capsys):
    out, _ = clean_run
    config = load_config(FAST_CONFIG).model_copy(update={"ent": 0.5})
    with pytest.raises(JobMismatchError):
        run_job(str(shards), out, config, "tiny", workers=1, progress=False)
    code = main(["run", "--config", FAST_CONFIG, "--input", str(shards), "--output", str(out), "--model", "tiny",
                 "--crf", "--no-progress"])
    assert code == 2 and "differs in crf.enabled false -> true); use a new --output folder, or --force" in \
        capsys.readouterr().err


def test_a_job_recorded_before_a_config_key_existed_resumes_and_reruns_as_the_same_job(clean_run, shards, tmp_path,
                                                                                       capsys):
    out = tmp_path / "out"
    shutil.copytree(clean_run[0], out)
    job = json.loads((out / "job.json").read_text())
    del job["config"]["crf"]["max_pixels"]  # as an earlier version recorded it
    (out / "job.json").write_text(json.dumps(job))
    assert main(["resume", str(out), "--no-progress"]) == 0
    assert "nothing to run: the 3 input shard(s) were done before" in capsys.readouterr().out
    assert main(_run_args(shards, out)) == 0
    assert "nothing to run" in capsys.readouterr().out
    assert _states(out) == ["done"] * 3


def test_an_added_key_counts_in_the_hash_only_where_it_changes_masks():
    from pipeline.config import SegmenterConfig, recorded_config
    from pipeline.job.runner import config_hash

    crf_off, crf_on = SegmenterConfig(), SegmenterConfig().with_crf(True)
    before_the_key = crf_on.model_dump(mode="json")
    del before_the_key["crf"]["max_pixels"]
    recorded = recorded_config(before_the_key)
    assert recorded.crf.max_pixels is None  # the CRF at every image's own size, as before the key
    unlimited = crf_on.model_copy(update={"crf": crf_on.crf.model_copy(update={"max_pixels": None})})
    assert config_hash(recorded, "m") == config_hash(unlimited, "m") != config_hash(crf_on, "m")
    smaller = crf_off.model_copy(update={"crf": crf_off.crf.model_copy(update={"max_pixels": 5})})
    assert config_hash(smaller, "m") == config_hash(crf_off, "m")  # no CRF: the key changes nothing
    assert config_hash(crf_off, "m") != config_hash(crf_on, "m")


def _run_args(shards, out, *extra):
    """The CLI arguments of the tests' job: the shards into out, one worker, the test config."""
    return ["run", "--config", FAST_CONFIG, "--input", str(shards), "--output", str(out), "--model", "tiny",
            "--workers", "1", "--no-progress", *extra]


def _start_cli(shards, out, *extra):
    """The tests' job in a process of its own (which starts its own Ray), its output piped."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *_run_args(shards, out, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_for(predicate, process, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            pytest.fail(f"job ended before the kill point:\n{process.stdout.read()}")
        time.sleep(0.1)
    pytest.fail("kill point never reached")


def _states(out):
    return [e.state for e in Ledger(out).entries()]


def _busy_worker_on_first_shard(job, out):
    """The job's own worker process (a descendant of the job's driver: Ray started under it)
    while it runs the first shard (two healthy images, the slowest), so a kill always hits a
    shard that still has to finish."""
    entries = Ledger(out).entries()
    if not entries or entries[0].shard != "voc-train-000000" or entries[0].state != "in_progress":
        return None
    try:
        descendants = psutil.Process(job.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for proc in descendants:
        try:
            # a threaded actor's title is "ray::ShardWorker" while its shards run
            if proc.cmdline()[:1] and proc.cmdline()[0].startswith("ray::ShardWorker"):
                return proc
        except psutil.Error:
            continue
    return None


@pytest.mark.faults
def test_killed_actor_is_replaced_and_its_shard_retried(clean_run, shards, tmp_path):
    out = tmp_path / "out"
    job = _start_cli(shards, out)

    def busy_worker():
        return _busy_worker_on_first_shard(job, out)

    _wait_for(lambda: busy_worker() is not None, job)
    worker = busy_worker()
    worker.send_signal(signal.SIGKILL)
    log = job.communicate(timeout=400)[0]
    assert job.returncode == 0, log
    assert _outputs(out) == _outputs(clean_run[0])
    assert _states(out) == ["done"] * 3


@pytest.mark.faults
def test_killed_driver_then_rerun_gives_the_same_outputs(clean_run, shards, tmp_path, capsys):
    out = tmp_path / "out"
    job = _start_cli(shards, out)
    _wait_for(lambda: "done" in _states(out), job)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert "in_progress" in _states(out) or len(_states(out)) < 3
    # the same command again, in this process on the test's own Ray
    capsys.readouterr()
    assert main(_run_args(shards, out)) == 0
    assert "0 failed" in capsys.readouterr().out
    assert _outputs(out) == _outputs(clean_run[0])
    assert _states(out) == ["done"] * 3


def test_unreachable_model_fails_before_the_job_is_recorded(shards, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from pipeline.segment.models import ModelLoadError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="--model tiny"):
        run_job(str(shards), tmp_path / "out", load_config(FAST_CONFIG), "nobody/missing", progress=False)
    assert not (tmp_path / "out" / "job.json").exists()


def test_worker_start_failure_names_the_cause(ray_local, shards, tmp_path):
    from pipeline.config import CaptureLayer
    from pipeline.job.runner import WorkerStartError

    broken = tmp_path / "broken-model"
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        (broken / part).mkdir(parents=True)  # passes the driver's check, fails the worker's load
    (broken / "model_index.json").write_text("{}")
    with pytest.raises(WorkerStartError) as error:
        run_job(str(shards), tmp_path / "out", load_config(FAST_CONFIG), str(broken), workers=1, progress=False)
    message = str(error.value)
    assert message.startswith("segmenter workers could not start: ") and "\n" not in message
    assert "creation task" not in message and "pipeline.errors" not in message, message
    assert f"cannot load model {str(broken)!r}" in message, message  # the worker's ModelLoadError, as it is
    # a config naming a layer this UNet lacks stops the job as its workers start, before any shard
    config = load_config(FAST_CONFIG)
    config = config.model_copy(update={"cross_attention": config.cross_attention.model_copy(
        update={"layers": [CaptureLayer(name="up_blocks.9.attentions.0")]})})
    with pytest.raises(WorkerStartError, match=r"^segmenter workers could not start: config key cross_attention.layers.0: layer 'up_blocks.9.attentions.0' "
                                               r"is not in the UNet; layers with attention: down_blocks.0.attentions.0"):
        run_job(str(shards), tmp_path / "out2", config, "tiny", workers=1, progress=False)
    assert not list((tmp_path / "out2" / "ledger").glob("*.json"))


def test_input_patterns(shards, tmp_path):
    from pipeline.data.shards import InputError, expand_input

    names = [Path(u).name for u in expand_input(str(shards / "voc-train-{000000..000002}.tar"))]
    assert names == ["voc-train-000000.tar", "voc-train-000001.tar", "voc-train-000002.tar"]
    assert expand_input(str(shards)) == expand_input(str(shards / "*.tar"))
    # `shards/*` and the manifest itself give the shards, not the manifest as a shard
    assert expand_input(str(shards / "*")) == expand_input(str(shards / "manifest.json")) == expand_input(str(shards))
    # several inputs (WebDataset's `::` between them, as several --input values are recorded): in order, once each
    several = f"{shards / 'voc-train-000002.tar'}::{shards}::https://host/x.tar"
    assert [Path(u).name for u in expand_input(several)] == ["voc-train-000002.tar", "voc-train-000000.tar",
                                                              "voc-train-000001.tar", "x.tar"]
    with pytest.raises(InputError, match=r"voc-train-000009.tar does not exist \(1 missing\)"):
        expand_input(f"{shards}::{shards / 'voc-train-000009.tar'}")
    with pytest.raises(InputError, match=r"matches no shard \(a glob takes the .tar, .tar.gz, .tgz files it matches\)"):
        expand_input(str(shards / "*.json"))
    with pytest.raises(InputError, match=r"voc-train-000003.tar does not exist \(7 missing\)"):
        expand_input(str(shards / "voc-train-{000000..000009}.tar"))
    with pytest.raises(InputError, match=f"^{tmp_path} holds no shard: no manifest.json and no .tar, .tar.gz, .tgz "
                                         "file; pass the folder that sharding wrote, or a shard pattern$"):
        expand_input(str(tmp_path))
    # a dataset passed as the shards: the sharding command that makes them
    (tmp_path / "VOC2012" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(InputError, match=f"; it is a VOC folder: shard it first, pseudolabel shard-voc --voc-root "
                                         f"{tmp_path / 'VOC2012'} -o shards/$"):
        expand_input(str(tmp_path / "VOC2012"))
    # another tool's shards: a folder of tars without a manifest gives its tars
    foreign = tmp_path / "foreign {a,b} [1]"  # braces and brackets in a folder name are no pattern
    foreign.mkdir()
    for name in ("b.tar", "a.tar.gz", "notes.txt"):
        (foreign / name).write_bytes(b"")
    assert expand_input(str(foreign)) == [str(foreign / "a.tar.gz"), str(foreign / "b.tar")]
    # URLs WebDataset cannot open fail before anything runs, with the command that streams them
    with pytest.raises(InputError, match=r"^input shard s3://b/voc-000000.tar: WebDataset opens no s3:// URL \(it "
                                         r"opens .*https.*\): pass 'pipe:aws s3 cp s3://b/voc-\{000000..000001\}.tar -'$"):
        expand_input("s3://b/voc-{000000..000001}.tar")
    assert expand_input("https://host/voc-{000000..000001}.tar") == ["https://host/voc-000000.tar",
                                                                      "https://host/voc-000001.tar"]
    # a job's own mask shards are no input: they hold masks, and their json the statistics
    job = tmp_path / "job"
    (job / "masks").mkdir(parents=True)
    (job / "masks" / "voc-train-000000.tar").write_bytes(b"")
    (job / "job.json").write_text(json.dumps({"input": "/data/shards"}))
    for pattern in (job / "masks", job / "masks" / "*.tar"):
        with pytest.raises(InputError, match=f"^input shard {job}/masks/voc-train-000000.tar holds the masks that "
                                             f"pseudolabel run wrote into the job {job}, not images: pass the image "
                                             r"shards that job read \(/data/shards\)$"):
            expand_input(str(pattern))


def test_shard_names_come_from_paths_urls_and_pipes_and_may_not_collide(shards, tmp_path):

    from pipeline.data.shards import InputError, shard_name

    assert shard_name("/data/voc-train-000003.tar") == "voc-train-000003"
    assert shard_name("pipe:aws s3 cp s3://bucket/voc/voc-train-000003.tar -") == "voc-train-000003"
    assert shard_name("pipe:curl -s -L https://host/voc-train-000003.tar") == "voc-train-000003"
    assert shard_name("https://host/voc-train-000003.tar?token=abc") == "voc-train-000003"
    assert shard_name("/data/images-000001.tar.gz") == "images-000001.tar.gz"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(shards / "voc-train-000000.tar", tmp_path / folder)
    with pytest.raises(InputError, match=r"a/voc-train-000000.tar and .*b/voc-train-000000.tar share the name "
                                         r"'voc-train-000000'"):
        run_job(str(tmp_path / "{a,b}" / "voc-train-000000.tar"), tmp_path / "out", load_config(FAST_CONFIG),
                "tiny", progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything was recorded


def test_shards_made_for_other_classes_are_refused_with_the_config_to_pass(shards, tmp_path):
    # VOC shards (manifest: the 20 VOC classes) run with the COCO config: every label would fail.
    from pipeline.cli.options import input_config
    from pipeline.data.shards import InputError

    with pytest.raises(InputError, match=rf"the shards in {shards} were written for 20 classes \(aeroplane, "
                                         r"bicycle, bird, \.\.\.\) but the config has 80 \(person, bicycle, car, "
                                         r"\.\.\.\): pass --config voc"):
        run_job(str(shards), tmp_path / "out", load_config("coco"), "tiny", progress=False)
    assert not (tmp_path / "out").exists()
    config = load_config(FAST_CONFIG)
    renamed = config.model_copy(update={"classes": [config.classes[0].model_copy(update={"name": "plane"})]
                                        + config.classes[1:]})
    with pytest.raises(InputError, match=r"but the config has 20 \(plane, bicycle, bird, \.\.\.\): pass --config voc"):
        run_job(str(shards), tmp_path / "out", renamed, "tiny", progress=False)
    # shards of a folder labelled with classes of its own, run with a built-in config
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "voc-train-000000.tar").write_bytes((shards / "voc-train-000000.tar").read_bytes())
    (tmp_path / "own" / "manifest.json").write_text(json.dumps(
        {"shards": [{"url": "voc-train-000000.tar", "samples": 2}], "classes": ["cat", "dog"]}))
    with pytest.raises(InputError, match=r"written for 2 classes \(cat, dog\) .*: pass --classes 'cat,dog'$"):
        run_job(str(tmp_path / "own"), tmp_path / "out", config, "tiny", progress=False)
    assert not (tmp_path / "out").exists()
    assert input_config(None, str(tmp_path / "own"), "cat,dog").class_names == ["cat", "dog"]  # the fix works
    # a name --classes cannot give (it holds a comma): the config line
    (tmp_path / "own" / "manifest.json").write_text(json.dumps(
        {"shards": [{"url": "voc-train-000000.tar", "samples": 2}], "classes": ["cat", "dog, small"]}))
    with pytest.raises(InputError, match=r"written for 2 classes \(cat, dog, small\) .*: pass a config whose "
                                         "classes are the manifest's, in its order") as error:
        run_job(str(tmp_path / "own"), tmp_path / "out", config, "tiny", progress=False)
    yaml_line = str(error.value).split("a YAML file holding the line ")[1]  # the fix, as written, works
    (tmp_path / "own.yaml").write_text(yaml_line + "\n")
    assert load_config(tmp_path / "own.yaml").class_names == ["cat", "dog, small"]


def test_a_second_job_on_a_folder_in_use_is_refused_and_status_names_the_running_one(clean_run, shards, capsys):
    from pipeline.data.ledger import JobBusyError

    out, _ = clean_run
    before = (out / "job.json").read_bytes()
    with Ledger(out).locked():  # as a running driver holds it
        with pytest.raises(JobBusyError, match=f"{out} is in use by a running job \\(pid {os.getpid()} on "):
            run_job(str(shards), out, load_config(FAST_CONFIG), "tiny", workers=1, progress=False, retry_failed=True)
        assert main(["status", str(out)]) == 0
        assert f"; a job is running here (pid {os.getpid()} on " in capsys.readouterr().out
    assert (out / "job.json").read_bytes() == before
    assert main(["status", str(out)]) == 0
    assert "; no job is running here" in capsys.readouterr().out


def test_unreadable_shards_fail_alone_with_the_reason(ray_local, shards, tmp_path):
    # Through a `pipe:` command as from object storage: shard 0 whole, shard 1 cut short (an
    # interrupted copy), shard 2 missing. WebDataset's exceptions carry file objects that cannot
    # leave the worker's process; the ledger gets one line saying what is wrong instead.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "voc-train-000000.tar").write_bytes((shards / "voc-train-000000.tar").read_bytes())
    cut = (shards / "voc-train-000002.tar").read_bytes()
    (tmp_path / "in" / "voc-train-000001.tar").write_bytes(cut[: len(cut) // 2])
    pattern = f"pipe:cat {tmp_path}/in/voc-train-{{000000..000002}}.tar"
    summary = run_job(pattern, tmp_path / "out", load_config(FAST_CONFIG), "tiny", workers=1, progress=False)
    assert (summary.shards_done, summary.shards_failed) == (1, 2)
    ledger = {e.shard: e for e in Ledger(tmp_path / "out").entries()}
    assert ledger["voc-train-000000"].state == "done" and ledger["voc-train-000000"].samples == 2
    assert ledger["voc-train-000001"].error.startswith(
        f"ShardReadError: cannot read shard pipe:cat {tmp_path}/in/voc-train-000001.tar: ReadError: ")
    assert ledger["voc-train-000002"].error == (
        f"ShardReadError: cannot read shard pipe:cat {tmp_path}/in/voc-train-000002.tar: the command "
        f"'cat {tmp_path}/in/voc-train-000002.tar' exited with status 1; check that it is complete "
        f"(manifest.json has its sha256) and readable from {platform.node()}, the host that read it")


def test_a_job_with_a_failed_shard_names_the_resume_that_redoes_it_on_the_cluster_it_ran_on(ray_local, shards,
                                                                                             tmp_path, capsys):
    """A failed shard printed its error and the counts, and nothing of what to do once the cause
    was fixed; a resume left without the run's --address starts a private Ray instead."""
    (tmp_path / "in").mkdir()
    whole = (shards / "voc-train-000000.tar").read_bytes()
    (tmp_path / "in" / "voc-train-000000.tar").write_bytes(whole[:520])  # a copy cut inside its first file
    (tmp_path / "in" / "voc-train-000001.tar").write_bytes((shards / "voc-train-000001.tar").read_bytes())
    out = tmp_path / "out"
    # The address is not joined here (the test's Ray is already up): only the printed command carries it
    assert main(["run", "--input", str(tmp_path / "in"), "-o", str(out), "--model", "tiny", "--config", FAST_CONFIG,
                 "--no-progress", "--address", "ray://head:10001"]) == 1
    assert (f"1 shard(s) failed (errors above and in `pseudolabel status {out}`): once the cause is fixed, "
            f"`pseudolabel resume {out} --address ray://head:10001` redoes them\n") in capsys.readouterr().out
    (tmp_path / "in" / "voc-train-000000.tar").write_bytes(whole)
    assert main(["resume", str(out), "--no-progress"]) == 0
    assert _states(out) == ["done", "done"]
    assert "shards 1 done, 0 failed, 1 skipped" in capsys.readouterr().out


def test_a_resume_given_no_address_rejoins_the_cluster_its_last_run_was_given(shards, tmp_path, capsys,
                                                                            monkeypatch):
    """A job run on a cluster (--address) and resumed without it, in a shell without RAY_ADDRESS,
    ran on a private Ray of the machine it was resumed on (on a head without GPUs: on its CPU),
    and `status` said nothing of the cluster."""
    from pipeline.job import cluster, runner

    class Joining(Exception):
        """Where the job would start or join Ray: this test stops it there."""

    given = []

    def init_ray(address, source):
        given.append((address, source))
        raise Joining

    monkeypatch.setattr(runner, "init_ray", init_ray)
    monkeypatch.delenv("RAY_ADDRESS")  # as in a user's shell (the tests set it to `local`)
    out = tmp_path / "out"
    run = ["run", "--input", str(shards / "voc-train-000000.tar"), "-o", str(out), "--model", "tiny", "--config",
           FAST_CONFIG, "--no-progress"]
    with pytest.raises(Joining):
        main([*run, "--address", "ray://head:10001"])
    assert json.loads((out / "job.json").read_text())["ray_address"] == "ray://head:10001"
    assert main(["status", str(out)]) == 0
    assert ", Ray at ray://head:10001 (resume joins it again)\n" in capsys.readouterr().out
    with pytest.raises(Joining):
        main(["resume", str(out), "--no-progress"])
    with pytest.raises(Joining):
        main([*run, "--address", "h:6379"])
    monkeypatch.setenv("RAY_ADDRESS", "e:6379")
    with pytest.raises(Joining):
        main(["resume", str(out), "--no-progress"])  # RAY_ADDRESS before the last run's
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(Joining):
        main(["resume", str(out), "--no-progress", "--address", "local"])
    assert json.loads((out / "job.json").read_text())["ray_address"] is None
    with pytest.raises(Joining):
        main([*run, "--address", "h:6379"])
    with pytest.raises(Joining):
        main(run)  # `run` takes no address from the folder
    assert given == [("ray://head:10001", "--address"), ("ray://head:10001", cluster.LAST_RUN), ("h:6379", "--address"),
                     ("e:6379", "RAY_ADDRESS"), ("local", "--address"), ("h:6379", "--address"), (None, None)]


def _hold_every_cpu(ray, seconds: int):
    """The ObjectRef of a task, as of another job, that holds every CPU of the test's Ray for
    `seconds` (running once this returns)."""
    other_job = ray.remote(num_cpus=int(ray.cluster_resources()["CPU"]))(subprocess.run).remote(["sleep", str(seconds)])
    deadline = time.time() + 60
    while ray.available_resources().get("CPU", 0) > 0 and time.time() < deadline:
        time.sleep(0.2)
    return other_job


def test_a_job_waiting_for_the_clusters_resources_says_so_and_goes_on_once_they_are_free(ray_local, shards, tmp_path,
                                                                                        capsys, monkeypatch):
    """On a cluster whose CPUs or GPUs other jobs held, a job printed `joining ...` and then
    nothing for as long as it waited. Its post-processing workers start once its segmenter
    workers are placed: started with them, they held CPUs the segmenter workers were to be
    spread over, and the job's two workers on a three-node cluster started on one node now
    and then (test_cluster.py)."""
    from pipeline.job import runner

    monkeypatch.setattr(runner, "PLACEMENT_NOTICE_S", 1.0)
    cpus = int(ray_local.cluster_resources()["CPU"])
    other_job = _hold_every_cpu(ray_local, seconds=8)
    other_job_done_at_post_processing_start = []

    def start_post_processing_workers(ray):
        other_job_done_at_post_processing_start.append(bool(ray.wait([other_job], timeout=0)[0]))
        start(ray)

    start = runner.start_post_processing_workers
    monkeypatch.setattr(runner, "start_post_processing_workers", start_post_processing_workers)
    summary = run_job(str(shards / "voc-train-000000.tar"), tmp_path / "out", load_config(FAST_CONFIG), "tiny",
                      workers=1, progress=False)
    assert summary.shards_done == 1 and ray_local.get(other_job).returncode == 0  # it ran to its end first
    assert other_job_done_at_post_processing_start == [True]  # started once, after the worker had its CPU
    assert (f"waiting for the cluster's resources: 1 of 1 segmenter worker(s) not placed yet, each asking 1 CPU (0 of "
            f"{cpus} CPUs free; `ray status` shows what holds them): the job goes on once they are free, or Ctrl-C "
            "stops it\n") in capsys.readouterr().out


def test_a_signal_while_the_workers_start_ends_the_job_as_interrupted_with_nothing_in_flight(ray_local, shards,
                                                                                              tmp_path):
    """SIGTERM (`kill`, `ray job stop`) while the workers loaded their model or waited for the
    cluster's resources met Ray's own handler, which dumped a stack and aborted the driver."""
    import threading

    from pipeline.job.summary import JobInterrupted

    other_job = _hold_every_cpu(ray_local, seconds=6)  # the workers wait
    threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    with pytest.raises(JobInterrupted) as stopped:
        run_job(str(shards / "voc-train-000000.tar"), tmp_path / "out", load_config(FAST_CONFIG), "tiny", workers=1,
                progress=False)
    assert stopped.value.signum == signal.SIGTERM and stopped.value.interrupted == []
    assert list(Ledger(tmp_path / "out").entries()) == []  # no shard was sent: nothing to mark
    ray_local.get(other_job)


def test_a_restarting_worker_is_lost_after_the_notice_time_with_no_share_free_and_taken_back_once_ready(monkeypatch):
    """Which workers' shards go to the others (`LostWorkers`): a restarting worker with no new
    process for PLACEMENT_NOTICE_S while no node has its share free, once, where another is
    ready (else the job says once that it waits, until one is); ready again, it takes shards
    again. One with a new process (its model loading) is not lost."""
    from pipeline.job import runner

    class Ray:
        def available_resources(self):
            return {"CPU": 0.0}

    table = {slot: ("ALIVE", 0, 100 + slot) for slot in range(3)}  # the actor table: (state, restarts, pid)

    def set_ready(**slots):
        for name, is_ready in slots.items():  # not ready: restarting (one more restart), the pid its last one
            _, restarts, pid = table[int(name[1:])]
            table[int(name[1:])] = ("ALIVE", restarts, pid) if is_ready else ("RESTARTING", restarts + 1, pid)

    free_by_node, clock = [{"CPU": 0.5}, {"CPU": 0.0}], [100.0]
    monkeypatch.setattr(runner, "_actor_state", lambda actor: table[actor])
    monkeypatch.setattr(runner, "_free_by_node", lambda: free_by_node)
    monkeypatch.setattr(runner.time, "monotonic", lambda: clock[0])
    share, actors, lost = {"num_cpus": 1.5}, [0, 1, 2], runner.LostWorkers()
    lost.note_alive(actors)
    set_ready(w0=False)
    assert lost.look(Ray(), actors, [0, 1], share) == ([], [])  # not yet for PLACEMENT_NOTICE_S
    clock[0] += runner.PLACEMENT_NOTICE_S
    free_by_node[0] = {"CPU": 1.5}
    assert lost.look(Ray(), actors, [0, 1], share) == ([], [])  # a share free: placed soon, the time starts again
    free_by_node[0] = {"CPU": 0.5}
    assert lost.look(Ray(), actors, [0, 1], share) == ([], [])
    clock[0] += runner.PLACEMENT_NOTICE_S
    assert lost.look(Ray(), actors, [0, 1], share) == ([0], [1, 2])  # its shards go to workers 1 and 2
    assert lost.look(Ray(), actors, [1], share) == ([], []) and lost.ready_again(actors) == ([], [])
    table[0] = ("ALIVE", 1, 200)  # restarted on a node that joined
    assert lost.ready_again(actors) == ([0], []) and lost.handed_off == set()
    set_ready(w2=False)  # not ready for a while, then ready again, its shards done: it takes shards when 1 is lost
    assert lost.look(Ray(), actors, [1, 2], share) == ([], [])
    set_ready(w1=False, w2=True)
    clock[0] += runner.PLACEMENT_NOTICE_S
    assert lost.look(Ray(), actors, [1], share) == ([], [])
    clock[0] += runner.PLACEMENT_NOTICE_S
    assert lost.look(Ray(), actors, [1], share) == ([1], [0, 2])
    set_ready(w1=True)
    assert lost.ready_again(actors) == ([1], [])
    # restarting with a new process, loading its model for long, on a cluster with no share free: not lost
    table[2] = ("RESTARTING", 2, 300)
    assert lost.look(Ray(), actors, [1, 2], share) == ([], [])
    clock[0] += 3 * runner.PLACEMENT_NOTICE_S
    assert lost.look(Ray(), actors, [1, 2], share) == ([], [])
    table[2] = ("ALIVE", 2, 300)
    # every worker lost: nobody to take the shards, said once
    set_ready(w0=False, w1=False, w2=False)
    assert lost.look(Ray(), actors, [0, 1, 2], share) == ([], [])
    clock[0] += runner.PLACEMENT_NOTICE_S
    assert lost.look(Ray(), actors, [0, 1, 2], share) == ([0, 1, 2], [])
    assert lost.look(Ray(), actors, [0, 1, 2], share) == ([], [])
    assert lost.handed_off == set()  # they keep their shards
    # one back: it goes on with its own shards, and the others' go to it
    set_ready(w1=True)
    assert lost.ready_again(actors) == ([], [1])
    assert lost.look(Ray(), actors, [0, 1, 2], share) == ([0, 2], [1])
    assert lost.handed_off == {0, 2} and lost.said == set()


def test_the_lost_worker_line_says_where_their_shards_go_or_that_the_job_waits(monkeypatch):
    """`LostWorkers.notice`: a job whose lost workers had no other worker to take their shards
    waited at its end saying nothing; with one, where their shards went."""
    from pipeline.job import runner

    class Ray:
        def available_resources(self):
            return {"CPU": 1.0}

        def cluster_resources(self):
            return {"CPU": 3.0}

    monkeypatch.setattr(runner, "_free_by_node", lambda: [{"CPU": 1.0}, {"CPU": 0.0}])
    share = {"num_cpus": 2.0}
    assert runner.LostWorkers.notice(Ray(), [0], 1, share, 0, 0) == (
        f"1 of 1 segmenter worker(s) restarting (a node or process was lost) not ready after "
        f"{runner.PLACEMENT_NOTICE_S:g} s, and no node has the 2 CPU each asks free (1 of 3 CPUs free; `ray status` "
        "shows what holds them): the job waits for them, or Ctrl-C stops it")
    assert runner.LostWorkers.notice(Ray(), [0, 2], 3, share, 3, 1).endswith(
        "): their 3 shard(s) go to the other 1 worker(s), and they take shards again once ready")
    # a worker that died on its shards (their retries spent) and holds none: the others take the shards meanwhile
    assert runner.LostWorkers.notice(Ray(), [1], 2, share, 0, 1).endswith(
        "): the shards go to the other 1 worker(s), and it takes shards again once ready")


def test_the_placement_notice_says_waiting_only_where_a_workers_share_is_not_free():
    from pipeline.job.runner import PLACEMENT_NOTICE_S, placement_notice

    gpu_worker, cluster = {"num_gpus": 1, "num_cpus": 1}, {"GPU": 8.0, "CPU": 64.0}
    line = placement_notice(2, 2, 8, gpu_worker, {"GPU": 0.0, "CPU": 3.0}, cluster)
    assert line == ("waiting for the cluster's resources: 2 of 8 segmenter worker(s) not placed yet, each asking 1 GPU "
                    "and 1 CPU (0 of 8 GPUs free, 3 of 64 CPUs free; `ray status` shows what holds them): the job "
                    "goes on once they are free, or Ctrl-C stops it")
    assert "each asking 0.5 CPU (0 of 2 CPUs free;" in placement_notice(1, 1, 2, {"num_cpus": 0.5}, {}, {"CPU": 2})
    assert placement_notice(0, 8, 8, gpu_worker, {}, cluster) is None  # all placed: loading their model
    assert placement_notice(2, 2, 8, gpu_worker, {"GPU": 2.0, "CPU": 3.0}, cluster) is None  # processes starting
    # free on the cluster, but not together on one node (CPUs held on the GPU node by other jobs): waiting, said
    apart = [{"GPU": 2.0, "CPU": 0.0}, {"CPU": 3.0}]
    assert "(2 of 8 GPUs free, 3 of 64 CPUs free, but not a share on one node; `ray status`" in placement_notice(
        2, 2, 8, gpu_worker, {"GPU": 2.0, "CPU": 3.0}, cluster, apart)
    assert placement_notice(2, 2, 8, gpu_worker, {"GPU": 2.0, "CPU": 3.0}, cluster, [*apart, {"GPU": 1, "CPU": 1}]) \
        is None
    assert placement_notice(None, 3, 8, gpu_worker, {}, cluster) == (  # Ray Client: no actor table to read
        f"3 of 8 segmenter worker(s) not ready after {PLACEMENT_NOTICE_S:g} s: loading the model, or waiting for the "
        "cluster's resources (`ray status` shows them)")


@needs_curl
def test_shards_served_over_http_are_held_to_their_manifests_checksums(ray_local, shards, tmp_path, http_folder):
    """A job over a web server's shards (`--input URL/`) hashes what it reads: a shard whose
    bytes are not the ones its manifest lists fails, naming both; the others record theirs."""
    shutil.copytree(shards, tmp_path / "in")
    changed = tmp_path / "in" / "voc-train-000002.tar"
    samples = list(read_shard(str(changed)))
    samples[0]["json"] = samples[0]["json"].replace(b'"names"', b'"names" ')  # other bytes, same labels
    changed.write_bytes(tar_bytes(samples))
    base = http_folder(tmp_path / "in")
    summary = run_job(f"{base}/", tmp_path / "out", load_config(FAST_CONFIG), "tiny", workers=1, progress=False)
    assert (summary.shards_done, summary.shards_failed) == (2, 1)
    ledger = {e.shard: e for e in Ledger(tmp_path / "out").entries()}
    assert ledger["voc-train-000000"].input_fingerprint == {"sha256": file_sha256(shards / "voc-train-000000.tar")}
    assert ledger["voc-train-000002"].error.startswith(
        f"the shard's sha256 ({file_sha256(changed)[:12]}...) is not the "
        f"{file_sha256(shards / 'voc-train-000002.tar')[:12]}... its manifest.json lists: it was damaged")


@pytest.mark.faults  # two jobs: with the fault tests, out of the default run
def test_a_shard_cut_at_a_block_boundary_fails_by_its_manifest_checksum_or_count(ray_local, shards, tmp_path):
    # A copy stopped part-way, on a 512-byte boundary: a tar reader sees a whole, shorter tar.
    import tarfile

    copy = tmp_path / "in"
    shutil.copytree(shards, copy)
    tar = copy / "voc-train-000002.tar"
    with tarfile.open(tar) as archive:
        members = archive.getmembers()
    second = next(m.offset for m in members if not m.name.startswith(members[0].name.split(".")[0]))
    tar.write_bytes(tar.read_bytes()[:second])
    assert len(list(read_shard(str(tar)))) == 1  # no read error
    summary = run_job(str(copy), tmp_path / "out", load_config(FAST_CONFIG), "tiny", workers=1, progress=False)
    assert (summary.shards_done, summary.shards_failed) == (2, 1)
    entry = Ledger(tmp_path / "out").get("voc-train-000002")
    assert entry.state == "failed" and entry.outputs == {} and entry.error.startswith(
        f"the shard's sha256 ({file_sha256(tar)[:12]}...) is not the ")
    assert not (tmp_path / "out" / "masks" / "voc-train-000002.tar").exists()

    manifest = json.loads((copy / "manifest.json").read_text())  # a manifest listing counts only
    for listed in manifest["shards"]:
        del listed["sha256"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    summary = run_job(str(copy), tmp_path / "out", load_config(FAST_CONFIG), "tiny", workers=1, progress=False,
                      retry_failed=True)
    assert (summary.shards_done, summary.shards_failed) == (0, 1)
    assert Ledger(tmp_path / "out").get("voc-train-000002").error == (
        "the shard ends early, after 1 of the 2 samples its manifest.json lists; copy it again or shard the dataset "
        "again")


@pytest.mark.faults
def test_retries_spent_marks_the_shard_failed_and_resume_redoes_it(clean_run, shards, tmp_path, capsys):
    out = tmp_path / "out"
    job = _start_cli(shards, out, "--retries", "0")

    def busy_worker():
        return _busy_worker_on_first_shard(job, out)

    _wait_for(lambda: busy_worker() is not None, job)
    busy_worker().send_signal(signal.SIGKILL)
    log = job.communicate(timeout=400)[0]
    assert job.returncode == 1, log
    # Every shard in flight on the killed worker (it runs two at a time) failed; the rest are done.
    failed = [e for e in Ledger(out).entries() if e.state == "failed"]
    assert 1 <= len(failed) <= 2 and _states(out).count("done") == 3 - len(failed)
    assert all("worker died" in e.error for e in failed) and "failed:" in log
    # status and resume in this process, on the test's own Ray (a new process would start another)
    assert main(["status", str(out)]) == 0
    assert f"{3 - len(failed)} done, {len(failed)} failed" in capsys.readouterr().out
    # A worker a shard to redo; each on as many torch threads as the first run's one worker, for
    # the same float arithmetic (the CPU's sums follow the thread count: docs/method.md).
    threads = os.cpu_count()
    assert main(["resume", str(out), "--no-progress", "--workers", "3", "--cpu-threads", str(threads)]) == 0
    assert (f"--workers 3: starting {len(failed)}, one for each of the {len(failed)} shard(s) to do (a shard goes to "
            f"one worker: shard with a smaller --shard-size for more)\n{len(failed)} segmenter worker(s) on cpu "
            f"({threads} torch threads each)") in capsys.readouterr().out
    assert _states(out) == ["done"] * 3
    assert all(e.attempts == 2 for e in Ledger(out).entries() if e.shard in {f.shard for f in failed})
    assert _outputs(out) == _outputs(clean_run[0])


def test_device_failures_are_recognised():
    from pipeline.job.worker import is_device_failure

    assert is_device_failure(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_device_failure(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_device_failure(RuntimeError("shape mismatch"))
    assert not is_device_failure(ValueError("CUDA error"))


class _Cluster:
    """Ray's cluster tables for _actor_options: one node, or nodes of the CPUs `node_cpus` lists."""

    def __init__(self, node_cpus: tuple = (), **resources):
        self.resources = resources
        self.node_cpus = node_cpus or (resources.get("CPU", 0),)

    def cluster_resources(self):
        return self.resources

    def nodes(self):
        return [{"Alive": True, "Resources": {"CPU": cpus} if cpus else {}} for cpus in self.node_cpus] + [
            {"Alive": False, "Resources": {"CPU": 64.0}}]  # a node lost earlier


@pytest.mark.parametrize("cpus,workers,threads", [(2, 1, None), (2, 2, None), (2, 2, 1), (16, 2, 4), (16, 3, None),
                                                  (5, 3, 2)])
def test_cpu_workers_always_leave_a_cpu_for_post_processing(cpus, workers, threads):
    from pipeline.job.runner import _actor_options

    n, options, torch_threads = _actor_options(_Cluster(CPU=cpus), workers, 2, threads)
    assert n == workers and options["max_concurrency"] == 3  # two shards and the progress polls
    assert 0 < options["num_cpus"] and cpus - n * options["num_cpus"] >= 1
    assert torch_threads == (threads or max(1, cpus // workers))
    if threads:
        assert options["num_cpus"] <= threads
    # fewer shards to do than workers asked: as many start, sharing the CPUs among themselves
    assert _actor_options(_Cluster(CPU=cpus), workers + 1, 2, shards=1)[::2] == (1, cpus)


@pytest.mark.parametrize("node_cpus,workers", [((8, 3), 2), ((16, 4, 4), 3), ((32, 8), 2), ((0, 8, 8), 2),
                                               ((2, 1, 1), 2), ((4, 4, 4, 4), 4), ((3,), 2), ((8, 8, 8), 2),
                                               ((1, 2), 1)])
def test_cpu_workers_ask_for_shares_the_nodes_can_hold_all_at_once(node_cpus, workers):
    """Workers asked for a share of the cluster's total CPUs, 4.5 each on nodes of 8 and 3: one
    started, and the job waited for the other for ever, saying nothing. Nor does a worker run
    more torch threads than a node has CPUs (9 on nodes of 8, where a node was spare)."""
    from pipeline.job.runner import _actor_options

    cpus = sum(node_cpus)
    n, options, threads = _actor_options(_Cluster(node_cpus, CPU=cpus), workers, 2)
    share = options["num_cpus"]
    assert n == workers and sum(int(node // share) for node in node_cpus) >= workers  # all placed at once
    assert cpus - n * share >= 1 and threads <= share + 1 and threads <= max(node_cpus)
    nodes = [node for node in node_cpus if node]
    if len(set(nodes)) == 1 and workers >= len(nodes):  # equal nodes, none spare: all but a CPU a worker
        assert share == math.floor((cpus - n) / n * 100) / 100 and threads == cpus // n


def test_cpu_workers_start_with_the_allocator_settings_unless_the_shell_sets_them_or_asks_unchanged():
    from pipeline.job.allocator import KEEP_FREED_MEMORY, allocator_of, cpu_allocator_line, cpu_worker_env
    from pipeline.job.runner import _actor_options

    _, options, _ = _actor_options(_Cluster(CPU=4), 1, 2, cpu_env=cpu_worker_env("keep-freed", {}))
    assert options["runtime_env"] == {"env_vars": KEEP_FREED_MEMORY}
    assert KEEP_FREED_MEMORY == {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                                 "MALLOC_TRIM_THRESHOLD_": "68719476736"}
    # a variable the shell sets keeps its value (a tight host's MALLOC_ARENA_MAX=2, say)
    assert cpu_worker_env("keep-freed", {"MALLOC_ARENA_MAX": "2"})["MALLOC_ARENA_MAX"] == "2"
    unchanged = cpu_worker_env("unchanged", {"MALLOC_ARENA_MAX": "2"})
    assert "runtime_env" not in _actor_options(_Cluster(CPU=4), 1, 2, cpu_env=unchanged)[1]
    assert "runtime_env" not in _actor_options(_Cluster(CPU=4, GPU=1), 1, 2,
                                               cpu_env=cpu_worker_env("keep-freed", {}))[1]  # GPU workers
    with pytest.raises(ValueError, match="--cpu-allocator must be one of keep-freed, unchanged, got 'jemalloc'"):
        cpu_worker_env("jemalloc", {})
    assert allocator_of(KEEP_FREED_MEMORY) == "keep-freed"
    assert allocator_of({"MALLOC_ARENA_MAX": "1"}) == "unchanged"
    started = [{"pid": 11, "device": "cpu", "malloc": KEEP_FREED_MEMORY},
               {"pid": 12, "device": "cpu", "malloc": {"MALLOC_ARENA_MAX": "1"}}]
    assert "warning: CPU worker(s) 12 did not start with MALLOC_ARENA_MAX=1" in cpu_allocator_line(KEEP_FREED_MEMORY,
                                                                                                      started)
    assert cpu_allocator_line(KEEP_FREED_MEMORY, started[:1]).startswith("CPU workers keep freed memory")
    assert cpu_allocator_line({}, started) is None
    assert cpu_allocator_line(KEEP_FREED_MEMORY, [{"pid": 13, "device": "cuda:0", "malloc": {}}]) is None


# In a fresh process: 256 MiB malloc'd, written, freed; prints the allocator and how much of
# it the process still holds (MiB of resident memory gained).
_FREED_AND_HELD = """
import ctypes, sys
from pipeline.job.allocator import keep_freed_memory_here
print(keep_freed_memory_here(sys.argv[1]))
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
before = resident()
block = libc.malloc(256 << 20)
ctypes.memset(block, 1, 256 << 20)
libc.free(block)
print(round(resident() - before))
"""


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION")),
                    reason="glibc's mallopt and /proc: Linux with glibc only")
def test_an_in_process_command_keeps_freed_memory_like_a_cpu_worker():
    # glibc unmaps a freed 256 MiB block at once (the kernel faults it in again at the next
    # batch); under keep-freed, applied with mallopt in the running process, it stays for reuse
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    held = {}
    for allocator in ("keep-freed", "unchanged"):
        run = subprocess.run([sys.executable, "-c", _FREED_AND_HELD, allocator], env=environment,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        applied, held[allocator] = run.stdout.split()
        assert applied == allocator
    assert int(held["keep-freed"]) >= 200 and int(held["unchanged"]) <= 50, held


def test_mallopt_applies_only_what_the_start_environment_did_not_set(mallopt_calls):
    from pipeline.job.allocator import KEEP_FREED_MEMORY, keep_freed_memory_here

    assert keep_freed_memory_here("keep-freed", {"MALLOC_ARENA_MAX": "2"}) == "keep-freed"
    assert sorted(mallopt_calls) == [(-4, 0), (-1, -1)]  # the shell's MALLOC_ARENA_MAX=2 stays
    mallopt_calls.clear()
    assert keep_freed_memory_here("unchanged", {}) == "unchanged" and mallopt_calls == []
    # left as it is, a process the shell started with the settings runs under them anyway
    assert keep_freed_memory_here("unchanged", dict(KEEP_FREED_MEMORY)) == "keep-freed" and mallopt_calls == []
    with pytest.raises(ValueError, match="--cpu-allocator must be one of"):
        keep_freed_memory_here("tcmalloc", {})


def test_more_gpu_workers_than_gpus_is_a_clear_error_and_cpu_device_uses_cpu_slots():
    from pipeline.data.shards import InputError
    from pipeline.job.runner import _actor_options

    assert _actor_options(_Cluster(CPU=16, GPU=1), None, 2)[:1] == (1,)
    with pytest.raises(InputError, match="--workers 2 asks for one GPU each but the cluster has 1"):
        _actor_options(_Cluster(CPU=16, GPU=1), 2, 2)
    n, options, _ = _actor_options(_Cluster(CPU=16, GPU=1), 2, 2, 4, device="cpu")
    assert n == 2 and "num_gpus" not in options and options["num_cpus"] == 4


def test_a_job_refuses_a_numbered_gpu_before_anything_starts(tmp_path):
    from pipeline.data.shards import InputError

    with pytest.raises(InputError, match=r"--device cuda:1: Ray gives each of a job's workers one GPU, which it sees "
                                         r"as cuda: pass --device cuda, .* CUDA_VISIBLE_DEVICES=1 before the command"):
        run_job(str(tmp_path / "none-*.tar"), tmp_path / "out", load_config(FAST_CONFIG), "tiny", device="cuda:1")
    assert not (tmp_path / "out").exists()


def test_a_worker_ray_gives_a_gpu_is_told_to_use_it():
    """So a node whose torch is a CPU build stops with the reason instead of running on its CPU."""
    from pipeline.job.runner import _actor_options, worker_device

    on_gpus = _actor_options(_Cluster(CPU=16, GPU=2), None, 2)[1]
    assert worker_device(None, on_gpus) == "cuda" and worker_device("cuda:0", on_gpus) == "cuda:0"
    assert worker_device(None, _actor_options(_Cluster(CPU=16), None, 2)[1]) is None  # CPU slots: the default
    assert worker_device("cpu", _actor_options(_Cluster(CPU=16, GPU=2), None, 2, device="cpu")[1]) == "cpu"


def test_crafted_keys_fail_alone_and_nothing_is_written_outside(ray_local, tmp_path):
    from test_untrusted_shards import BAD_KEYS, crafted_members, crafted_shard

    work = tmp_path / "a" / "b"
    (work / "shards").mkdir(parents=True)
    crafted_shard(work / "shards" / "crafted-000000.tar", crafted_members())
    config = tmp_path / "limit.yaml"
    config.write_text(Path(FAST_CONFIG).read_text() + "max_image_pixels: 100000\n")
    before = set(tmp_path.rglob("*"))
    out, export = work / "out", work / "exp"
    summary = run_job(str(work / "shards" / "*.tar"), out, load_config(config), "tiny", workers=1, progress=False)
    assert (summary.images_ok, summary.images_failed) == (2, 6)
    assert main(["export", str(out), "-o", str(export), "--with-images"]) == 0
    written = set(tmp_path.rglob("*")) - before
    assert written and all(p.is_relative_to(out) or p.is_relative_to(export) or p in (out, export)
                           for p in written), sorted(map(str, written))
    assert sorted(p.name for p in (export / "SegmentationClassPseudo").iterdir()) == ["good_1.png", "good_2.png"]
    rows = ds.dataset(out / "stats", format="parquet").to_table().to_pylist()
    assert {r["id"] for r in rows if r["status"] == "failed"} >= set(BAD_KEYS[:4])


def test_ray_address_follows_rays_convention_and_a_resume_takes_its_last_runs():
    from pipeline.job.cluster import LAST_RUN, ClusterJoinError, given_address, ray_address

    assert given_address("ray://head:10001", "local", "h:6379") == ("ray://head:10001", "--address")  # --address wins
    assert given_address(None, "head:6379", "h:6379") == ("head:6379", "RAY_ADDRESS")  # then RAY_ADDRESS
    assert given_address(None, None, "h:6379") == ("h:6379", LAST_RUN)  # then, on resume, its last run's
    assert given_address(None, None) == (None, None)
    with pytest.raises(ClusterJoinError, match="RAY_ADDRESS=http://head:8265 is a Ray dashboard's address"):
        given_address(None, "http://head:8265", "h:6379")
    running, idle = (lambda: True), (lambda: False)
    assert ray_address("ray://head:10001", running) == "ray://head:10001"
    assert ray_address(None, running) == "auto"  # then the cluster `ray start` left here
    assert ray_address(None, idle) == "local"  # else a private instance
    assert ray_address("local", running) == "local"


def test_a_private_ray_starts_and_a_cluster_is_joined_without_rays_line_on_its_default_token_auth(monkeypatch,
                                                                                                    capsys):
    """On a join (a cluster `ray start` left on this machine, Ray's default auth mode) the line
    told the job's driver to opt out of the cluster's authentication."""
    import logging
    import socket

    import ray

    from pipeline.job.cluster import init_ray

    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    monkeypatch.setattr(logger, "disabled", False)  # as Ray's logging setup in an earlier test may leave it
    printed = []
    handler = logging.Handler()
    handler.emit = lambda record: printed.append(record.getMessage())

    def init(**kwargs):  # what ray.init logs as it starts a local instance
        # handed to the logger as a WARNING record, whatever levels earlier tests' logging setups left
        for text in ("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
                     "another warning"):
            logger.handle(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, text, None, None))

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    logger.addHandler(handler)
    try:
        assert init_ray("local") == (ray, True)
        with socket.socket() as listener:  # something answers where the join goes
            listener.bind(("", 0))
            listener.listen()
            assert init_ray(f"127.0.0.1:{listener.getsockname()[1]}") == (ray, False)
    finally:
        logger.removeHandler(handler)
    assert printed == ["another warning", "another warning"]
    assert capsys.readouterr().out.startswith("joining the Ray cluster at 127.0.0.1:")


@pytest.mark.faults  # several jobs: with the fault tests, as in the fault table of docs/architecture.md
def test_job_resumes_from_another_folder_with_another_batch_size(clean_run, shards, tmp_path, monkeypatch, capsys):
    # The job is started from the shard folder with a relative --input through `..` and batch
    # size auto (1 on a CPU), interrupted (one shard left in progress), then resumed from
    # elsewhere with batch size 3.
    out = tmp_path / "out"
    monkeypatch.chdir(shards)
    config = load_config(FAST_CONFIG).model_copy(update={"batch_size": "auto"})
    run_job("../shards/*.tar", out, config, "tiny", workers=1, progress=False)
    printed = capsys.readouterr().out
    assert (f"1 segmenter worker(s) on cpu ({os.cpu_count()} torch threads each); 1 image(s) per batch "
            "(batch_size: auto)") in printed
    # the worker's process started with the allocator settings (read from its /proc/self/environ)
    assert ("CPU workers keep freed memory for reuse: MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 "
            "MALLOC_TRIM_THRESHOLD_=68719476736") in printed
    job = json.loads((out / "job.json").read_text())
    assert job["input"] == str(shards / "*.tar")  # recorded absolute, `..` resolved
    entry = Ledger(out).get("voc-train-000002")
    entry.state = "in_progress"
    Ledger(out).put(entry)
    monkeypatch.chdir(tmp_path)
    assert main(["resume", str(out), "--batch-size", "3", "--no-progress", "--cpu-allocator", "unchanged"]) == 0
    printed = capsys.readouterr().out
    assert "1 done" in printed.split("shards ")[1] and "keep freed memory" not in printed
    assert "; 3 image(s) per batch\n" in printed
    clean_masks, clean_rows = _outputs(clean_run[0])  # batch size 2, glibc settings as resumed here
    masks, rows = _outputs(out)
    assert masks == clean_masks  # byte-identical masks at batch sizes 1, 2 and 3
    assert [r["id"] for r in rows] == [r["id"] for r in clean_rows]
    assert main(["export", str(out), "-o", str(tmp_path / "exp"), "--with-images"]) == 0
    assert len(list((tmp_path / "exp" / "JPEGImages").iterdir())) == 4
    assert main(["eval", str(out)]) == 0


@pytest.mark.parametrize("flag, value", [("--retries", "-1"), ("--workers", "0"), ("--batch-size", "0")])
def test_invalid_job_numbers_are_one_line_errors(shards, tmp_path, capsys, flag, value):
    code = main(["run", "--input", str(shards), "--output", str(tmp_path / "out"), "--model", "tiny", flag, value])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and flag in err
    assert not (tmp_path / "out").exists()


@pytest.mark.faults
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_stopped_job_marks_its_shards_and_says_how_to_resume(clean_run, shards, tmp_path, signum, code):
    out = tmp_path / "out"
    job = _start_cli(shards, out)
    _wait_for(lambda: "in_progress" in _states(out), job)
    job.send_signal(signum)
    log = job.communicate(timeout=120)[0]
    assert job.returncode == code, log
    (line,) = [line for line in log.splitlines() if line.startswith("interrupted: ")]
    assert line.endswith(f"resume with: pseudolabel resume {out}"), log
    assert "Traceback" not in log
    states = _states(out)
    assert "interrupted" in states and "in_progress" not in states
    if signum != signal.SIGTERM:
        return  # the ledger is the same after either signal: one resume covers both
    assert main(["resume", str(out), "--no-progress"]) == 0  # in this process, on the test's own Ray
    assert _states(out) == ["done"] * 3
    assert _outputs(out) == _outputs(clean_run[0])


@pytest.mark.faults
def test_a_job_whose_terminal_hangs_up_marks_its_shards_and_ends_as_stopped_by_sighup(shards, tmp_path):
    """The job on a pseudo-terminal that closes (an SSH session that ends): the kernel sends
    SIGHUP, and the line saying what was marked cannot be written (EIO). That write's error
    ended the job with a traceback and status 1, as a failure."""
    import pty
    import select

    out = tmp_path / "out"
    pid, terminal = pty.fork()
    if pid == 0:  # the job, leading a session whose terminal is the pty
        try:
            os.environ["PYTHONUNBUFFERED"] = "1"
            os.execv(sys.executable, [sys.executable, "-m", "pipeline.cli", *_run_args(shards, out)])
        finally:
            os._exit(127)  # never back into pytest
    deadline, said = time.time() + 240, b""
    while "in_progress" not in _states(out) and time.time() < deadline:
        if select.select([terminal], [], [], 0.1)[0]:  # drained, so that the job's writes never block
            with contextlib.suppress(OSError):
                said += os.read(terminal, 65536)
    os.close(terminal)  # the terminal hangs up
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGHUP, said.decode(errors="replace")
    states = _states(out)
    assert "interrupted" in states and "in_progress" not in states
    assert {e.error for e in Ledger(out).entries() if e.state == "interrupted"} == {"interrupted by signal 1"}


@pytest.mark.faults
def test_a_sigterm_while_ray_starts_ends_the_job_as_interrupted(shards, tmp_path):
    """ray.init sets Ray's own SIGTERM handler, which exited the job with status 15 and printed
    nothing: a `kill` in the first seconds of a job left no word of what happened."""
    import psutil

    out = tmp_path / "out"
    job = _start_cli(shards, out)

    def ray_starting():  # the private Ray's first process is up: ray.init is under way
        return [child for child in psutil.Process(job.pid).children() if "gcs_server" in " ".join(child.cmdline())]

    _wait_for(ray_starting, job)
    gcs = ray_starting()[0]
    job.send_signal(signal.SIGTERM)
    log = job.communicate(timeout=120)[0]
    assert job.returncode == 143, log
    assert (f"interrupted: 0 shard(s) done this run (0 images ok, 0 failed), 0 in flight marked interrupted; "
            f"resume with: pseudolabel resume {out}") in log.splitlines(), log
    assert "Traceback" not in log and Ledger(out).entries() == []
    gcs.wait(timeout=60)  # the private Ray it had begun to start ends with it


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: the terminal closed
def test_a_signal_is_recorded_and_raised_at_the_driver_loops_next_check_and_a_second_one_acts_at_once(signum):
    from pipeline.job.runner import _Stop, _stop_on_signals

    before = signal.getsignal(signum)
    with pytest.raises(_Stop) as stopped:
        with _stop_on_signals() as stop:
            stop.check()  # nothing came yet
            os.kill(os.getpid(), signum)
            time.sleep(0.1)  # the handler has run and raised nothing
            assert stop.signum == signum and signal.getsignal(signum) is before
            stop.check()
    assert stopped.value.signum == signum and signal.getsignal(signum) is before


def test_a_sigterm_that_meets_rays_handler_while_ray_starts_is_taken_as_the_jobs_own():
    """ray.init puts in a SIGTERM handler of Ray's that exits with status 15: one that came while
    Ray started is the job's stop, the job's handler is back once Ray is up, and Ray's after."""
    from pipeline.job.runner import _Stop, _stop_on_signals

    def rays_handler(signum, frame):  # what ray.init sets in the driver
        sys.exit(signum)

    before = signal.getsignal(signal.SIGTERM)
    try:
        with _stop_on_signals() as stop:
            with stop.around_ray_init():
                signal.signal(signal.SIGTERM, rays_handler)
            assert signal.getsignal(signal.SIGTERM) == stop._record
        assert signal.getsignal(signal.SIGTERM) is rays_handler
        signal.signal(signal.SIGTERM, before)
        with _stop_on_signals() as stop, stop.around_ray_init():
            pass  # a Ray that set no handler (Ray Client)
        assert signal.getsignal(signal.SIGTERM) is before
        with pytest.raises(_Stop) as stopped:
            with _stop_on_signals() as stop:
                with stop.around_ray_init():
                    signal.signal(signal.SIGTERM, rays_handler)
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.1)
        assert stopped.value.signum == signal.SIGTERM
        with pytest.raises(SystemExit):  # another exit inside ray.init is left as it is
            with _stop_on_signals() as stop, stop.around_ray_init():
                sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_job_succeeds_unless_a_shard_failed_or_every_image_it_segmented_failed():
    from pipeline.job.summary import JobSummary

    def summary(shards_failed, ok, failed):
        return JobSummary(shards_done=1, shards_failed=shards_failed, shards_skipped=0, images_ok=ok,
                          images_failed=failed, seconds=1.0)

    assert summary(0, 3, 2).succeeded and summary(0, 0, 0).succeeded  # some masks; nothing to run
    assert not summary(1, 3, 0).succeeded
    assert not summary(0, 0, 2).succeeded  # no image got a mask: wrong labels or classes, say
    failing = summary(0, 0, 4)
    failing.add_failed([("a", "unknown class name 'nope'"), ("b", "other")])
    failing.add_failed([("c", "third")])
    assert failing.failed_lines == ["failed images: a, b, c and 1 more (errors in stats/, status column 'failed')",
                                    "  a: unknown class name 'nope'"]


def test_status_summary_and_export_name_the_failed_images(clean_run, capsys, tmp_path):
    out, summary = clean_run
    assert summary.failed_ids == ["2010_000002", "2010_000003"]
    assert summary.failed_lines == ["failed images: 2010_000002, 2010_000003 (errors in stats/, status column 'failed')",
                                    "  2010_000002: " + summary.first_error]
    assert summary.first_error.startswith("cannot decode image 2010_000002")
    assert summary.succeeded
    assert main(["status", str(out)]) == 0
    assert "2 failed image(s): 2010_000002, 2010_000003" in capsys.readouterr().out
    assert main(["export", str(out), "-o", str(tmp_path / "export")]) == 0
    assert "2 for failed in the job" in capsys.readouterr().out


def test_status_counts_the_input_shards_not_started(shards, tmp_path, capsys):
    """A job stopped with shards still to run (here 2 of 3) counts them and names the command that runs them; so
    for the shards left in progress, and for failed ones (their errors listed, no command given before)."""
    out = tmp_path / "job"
    ledger = Ledger(out)
    ledger.claim({"config": {}, "config_hash": "h", "model": "tiny", "input": str(shards / "*.tar")}, force=False)
    ledger.put(ShardEntry(shard="voc-train-000001", url="u", state="done", config_hash="h", model="tiny"))
    assert main(["status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"2 of 3 input shard(s) not started (first: voc-train-000000): `pseudolabel resume {out}`" in printed
    assert "left unfinished" not in printed
    # a shard the stopped job was working on, left in_progress (it was killed): said, with the command
    ledger.put(ShardEntry(shard="voc-train-000002", url="u", state="in_progress", config_hash="h", model="tiny"))
    assert main(["status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ("1 shard(s) left unfinished by a job that stopped (interrupted, or in progress when it was killed): "
            f"`pseudolabel resume {out}` redoes them") in printed
    # a failed shard: the command that redoes it once its cause is fixed
    assert "failed (their errors above)" not in printed
    ledger.put(ShardEntry(shard="voc-train-000000", url="u", state="failed", config_hash="h", model="tiny",
                          error="worker died once on this shard: ..."))
    assert main(["status", str(out)]) == 0
    assert (f"1 shard(s) failed (their errors above): once the cause is fixed, `pseudolabel resume {out}` redoes "
            "them") in capsys.readouterr().out
    with ledger.locked():  # while a job runs, its shards in progress are its work: nothing to redo
        assert main(["status", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "left unfinished" not in printed and "failed (their errors above)" not in printed
    moved = tmp_path / "moved"
    shards.rename(moved)
    try:
        assert main(["status", str(out)]) == 0
        assert "input shards not listed: --input" in capsys.readouterr().out
    finally:
        moved.rename(shards)


def test_joining_an_address_where_nothing_answers_fails_at_once_in_one_line(shards, tmp_path):
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: no Ray listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Ray alone would retry for about 14 minutes; the subprocess timeout turns such a hang into a failure.
    job = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--input", str(shards), "--output",
                          str(tmp_path / "out"), "--model", "tiny", "--address", f"127.0.0.1:{port}", "--no-progress"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert job.returncode == 2, job.stdout + job.stderr
    error = job.stderr.strip().splitlines()
    assert len(error) == 1, job.stderr
    assert f"127.0.0.1:{port}" in error[0] and "nothing answers" in error[0] and "--address local" in error[0]


@pytest.mark.parametrize("address, environment, expected", [
    (None, "http://127.0.0.1:8265", "RAY_ADDRESS=http://127.0.0.1:8265 is a Ray dashboard's address, where `ray job "
     "submit` sends jobs (jobs/cluster_submit.sh takes it as RAY_ADDRESS), not one a job's driver joins: pass "
     "--address HEAD:6379 (the address `ray start --head` printed) or ray://HEAD:10001; or unset RAY_ADDRESS on the "
     "head, where a job joins its cluster by itself"),
    ("https://head:8265", None, "--address=https://head:8265 is a Ray dashboard's address"),
    ("127.0.0.1", None, "cannot join the Ray cluster at 127.0.0.1: Invalid address format: 127.0.0.1; check the "
     "address"),
    ("head:notaport", None, "cannot join the Ray cluster at head:notaport: Unable to parse port number from notaport"),
])
def test_an_address_no_driver_can_join_is_one_line(shards, tmp_path, address, environment, expected):
    """A dashboard address (RAY_ADDRESS exported for `ray job submit`, as Ray's job docs do) and
    addresses Ray cannot parse ended in a ValueError's traceback."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if environment:
        env["RAY_ADDRESS"] = environment
    job = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--input", str(shards), "--output",
                          str(tmp_path / "out"), "--model", "tiny", "--no-progress"]
                         + (["--address", address] if address else []),
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert job.returncode == 2, job.stdout + job.stderr
    assert job.stderr.startswith(f"pseudolabel: error: {expected}") and job.stderr.count("\n") == 1, job.stderr
    if "dashboard" in expected:  # refused before the job is recorded
        assert not (tmp_path / "out" / "job.json").exists()


def test_the_join_probe_tells_a_listening_address_from_a_silent_one():
    import socket

    from pipeline.job.cluster import silent_address

    with socket.socket() as listener:  # on every interface: Ray turns 127.0.0.1 into this node's IP
        listener.bind(("", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert silent_address(f"127.0.0.1:{port}") is None
        assert silent_address(f"ray://127.0.0.1:{port}") is None
    assert "nothing answers" in silent_address(f"127.0.0.1:{port}")
    assert f"127.0.0.1:{port}" in silent_address(f"ray://127.0.0.1:{port}")
    assert "nothing answers at nohost.invalid:6379" in silent_address("nohost.invalid:6379")
    assert silent_address("not an address") is None  # left to ray.init, which names it


def test_a_cluster_that_cannot_be_joined_is_one_line_naming_the_fix():
    from pipeline.job.cluster import join_failure

    auth = join_failure("10.0.0.5:6379", "Failed to connect to GCS. Last connection error: Traceback ...\n"
                                         "RPC error: InvalidAuthToken: Authentication token is missing or incorrect")
    assert "\n" not in auth and "RAY_AUTH_MODE=token" in auth and "RAY_AUTH_TOKEN" in auth and "10.0.0.5:6379" in auth
    # RAY_AUTH_MODE=token with no token anywhere: Ray's AuthenticationError, before any connection
    missing = join_failure("10.0.0.5:6379", "Token authentication is enabled but no authentication token was found. "
                                            "Ensure that the token for the cluster is available ...")
    assert "\n" not in missing and "sent no token or another one" in missing and "RAY_AUTH_TOKEN" in missing
    down = join_failure("10.0.0.5:6379", "Failed to connect to Ray cluster at 10.0.0.5:6379\nmore")
    assert "\n" not in down and "Failed to connect to Ray cluster" in down and "--address local" in down
    assert "RAY_AUTH" not in down
    # A cluster started from another environment: Ray's message put the releases on the lines the
    # first-line rule left out ("Version mismatch: The cluster was started with:; check the address")
    mismatch = ("Version mismatch: The cluster was started with:\n    Ray: 2.60.0\n    Python: {}\nThis process on "
                "node 10.0.0.9 was started with:\n    Ray: 2.60.0\n    Python: 3.11.7\n")
    other_minor = join_failure("10.0.0.5:6379", mismatch.format("3.12.1"))
    assert other_minor == (
        "cannot join the Ray cluster at 10.0.0.5:6379: it runs Ray 2.60.0 on Python 3.12.1, this environment Ray "
        "2.60.0 on Python 3.11.7, and Ray joins only the same releases: run pseudolabel in the environment that "
        "`ray start` ran in on the head (where the cluster's workers need it installed too), or submit it to run "
        "there with jobs/cluster_submit.sh")
    other_patch = join_failure("10.0.0.5:6379", mismatch.format("3.11.9"))
    assert other_patch.startswith("cannot join the Ray cluster at 10.0.0.5:6379: it runs Ray 2.60.0 on Python 3.11.9,")
    assert other_patch.endswith("; for another Python patch release alone, export "
                                "RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor")
    other_ray = join_failure("ray://10.0.0.5:10001", mismatch.format("3.11.7").replace("Ray: 2.60.0", "Ray: 2.61.0", 1))
    assert "it runs Ray 2.61.0 on Python 3.11.7, this environment Ray 2.60.0" in other_ray
    assert "MATCH_LEVEL" not in other_ray
    # Ray Client's server failing to start the job's session: its traceback follows the first line
    server = join_failure("ray://10.0.0.5:10001", "Initialization failure from server:\nTraceback (most recent call "
                          "last):\n  File \"server.py\", line 9, in Init\nRuntimeError: runtime_env setup failed\n")
    assert server.startswith("cannot join the Ray cluster at ray://10.0.0.5:10001: Initialization failure from server: "
                             "RuntimeError: runtime_env setup failed; check the address")


def test_nodes_whose_workers_cannot_import_the_package_are_named_before_any_worker_starts(ray_local, monkeypatch):
    """A cluster started from an environment without pseudolabel: the job printed about 120 lines
    of Ray's import tracebacks, retries and worker stack dumps before `No module named 'pipeline'`."""
    import site

    from pipeline.job import cluster

    cluster.check_nodes_have_this_package(ray_local)  # this environment has it: nothing raised
    host = ray_local.nodes()[0]["NodeManagerHostname"]
    packages = site.getsitepackages()[0]  # one machine, one environment: the same folder on both sides
    for module, missing in [("no_such_package.job.worker", "where it is not installed"),
                            ("pipeline.job.no_such_worker", "which holds a pseudolabel without "
                                                            "pipeline.job.no_such_worker (another release)")]:
        monkeypatch.setattr(cluster, "WORKER_MODULE", module)
        with pytest.raises(cluster.ClusterJoinError) as error:
            cluster.check_nodes_have_this_package(ray_local)
        assert str(error.value) == (
            f"the Ray workers on {host} cannot import pseudolabel: Ray there runs a Python with the packages of "
            f"{packages}, {missing} (this shell's are in {packages}): install this pseudolabel there on every node, "
            "or start Ray from the environment it is installed in")


def test_a_node_holding_other_code_of_the_package_is_said_with_the_files_that_differ(ray_local, capsys):
    """A node whose pseudolabel was an older release, or a checkout not updated, but still held
    the worker module, ran its segmenter workers on that code, and nothing said so."""
    from types import SimpleNamespace

    import ray as real_ray

    from pipeline.job import cluster, node_probe

    cluster.check_nodes_have_this_package(ray_local)  # the same environment on the test's Ray: nothing said
    assert "another pseudolabel" not in capsys.readouterr().out
    here = node_probe.package_on_this_node(cluster.WORKER_MODULE)
    assert here["has_module"] and "job/worker.py" in here["sources"] and "job/node_probe.py" in here["sources"]
    there = dict(here, package="/srv/old/pipeline", sources=dict(here["sources"]))
    there["sources"]["segment/maps.py"] = "0" * 64  # edited there
    del there["sources"]["job/node_probe.py"]  # newer here
    nodes = [{"Alive": True, "Resources": {"GPU": 1.0}, "NodeID": f"{n:02d}" * 28, "NodeManagerHostname": f"gpu-{n}"}
             for n in range(6)]
    answers = {node["NodeID"]: there for node in nodes[1:]} | {nodes[0]["NodeID"]: here}  # gpu-0 is up to date

    def on_node(**options):
        return SimpleNamespace(remote=lambda module: answers[options["scheduling_strategy"].node_id])

    fake_ray = SimpleNamespace(nodes=lambda: nodes, remote=lambda function: SimpleNamespace(options=on_node),
                               get=lambda answer, timeout: answer, exceptions=real_ray.exceptions)
    cluster.check_nodes_have_this_package(fake_ray)
    assert capsys.readouterr().out == (  # one line for the five nodes holding that copy
        f"the Ray workers on gpu-1, gpu-2, gpu-3 and 2 more hold another pseudolabel than this shell's "
        f"(/srv/old/pipeline there, {here['package']} here; 2 file(s) differ: job/node_probe.py, segment/maps.py): "
        "their masks can differ from this copy's; install this one on every node, or start Ray from its "
        "environment\n")


def test_differing_sources_counts_other_bytes_and_missing_files_but_not_extra_files_or_package_markers():
    from pipeline.job.cluster import differing_sources

    here = {"a.py": "1", "b.py": "2", "c.py": "3", "configs/__init__.py": "4", "job/__init__.py": "5"}
    node = {"a.py": "1", "b.py": "9", "extra.py": "7", "job/__init__.py": "6"}
    assert differing_sources(node, here) == ["b.py", "c.py", "job/__init__.py"]
    assert differing_sources(here, here) == []


def test_token_mode_without_a_token_is_one_line_naming_where_the_token_goes(shards, tmp_path):
    """RAY_AUTH_MODE=token in a shell that has no token (another user, another machine) printed
    Ray's AuthenticationError as a traceback."""
    import socket

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", HOME=str(tmp_path))  # no ~/.ray/auth_token there
    with socket.socket() as listener:  # something answers (on every interface: Ray turns 127.0.0.1 into this
        listener.bind(("", 0))          # node's IP); Ray refuses before connecting
        listener.listen()
        port = listener.getsockname()[1]
        job = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--input", str(shards), "--output",
                              str(tmp_path / "out"), "--model", "tiny", "--address", f"127.0.0.1:{port}",
                              "--no-progress"], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert job.returncode == 2, job.stdout + job.stderr
    assert job.stderr.strip().splitlines() == [
        f"pseudolabel: error: cannot join the Ray cluster at 127.0.0.1:{port}: it uses Ray's token authentication and "
        "this shell sent no token or another one: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the token `ray "
        "get-auth-token` prints on the head> (or copy the head's ~/.ray/auth_token here)"]


def test_export_eval_and_report_of_a_running_job_say_they_read_what_is_done(clean_run, tmp_path, capsys):
    out, _ = clean_run
    with Ledger(out).locked():
        assert main(["export", str(out), "-o", str(tmp_path / "export")]) == 0
        assert f"a job is still running on {out} (pid {os.getpid()} on " in capsys.readouterr().out
    assert main(["export", str(out), "-o", str(tmp_path / "export2")]) == 0
    assert "still running" not in capsys.readouterr().out


def test_a_job_whose_shards_moved_resumes_with_their_new_place(ray_local, shards, tmp_path, capsys):

    shutil.copytree(shards, tmp_path / "old")
    out = tmp_path / "out"
    config = load_config(FAST_CONFIG)
    run_job(str(tmp_path / "old" / "voc-train-00000{0,2}.tar"), out, config, "tiny", workers=1, progress=False)
    (tmp_path / "old").rename(tmp_path / "new")
    assert main(["resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "voc-train-000000.tar does not exist" in err
    assert f"; if the shards moved: pseudolabel resume {out} --input NEW_PATTERN" in err
    assert main(["resume", str(out), "--device", "cuda:1", "--no-progress"]) == 2  # not about moved shards
    assert "--device cuda:1: Ray gives" in (err := capsys.readouterr().err) and "shards moved" not in err
    before = {e.shard: e.updated for e in Ledger(out).entries()}
    assert main(["resume", str(out), "--input", str(tmp_path / "new" / "voc-train-00000{0,2}.tar"),
                 "--no-progress"]) == 0
    assert {e.shard: e.updated for e in Ledger(out).entries()} == before  # done by name: nothing redone
    assert json.loads((out / "job.json").read_text())["input"].startswith(str(tmp_path / "new"))
    assert main(["export", str(out), "-o", str(tmp_path / "export"), "--with-images"]) == 0  # reads the new place
    assert len(list((tmp_path / "export" / "JPEGImages").iterdir())) == 4


def test_a_model_folder_given_relative_is_recorded_absolute_and_a_resume_elsewhere_loads_it(ray_local, shards,
                                                                                             tmp_path, monkeypatch,
                                                                                             capsys):
    """`--model mymodel` (a folder here) was recorded as given: the workers of a cluster started in
    another folder, and a resume from another folder, could not find it. (Its progress bar, drawn
    into a log, as here, is whole lines.)"""
    from pipeline.segment.builtin_models import tiny_model_path

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(tiny_model_path(), work / "mymodel")
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    run_job(str(shards / "voc-train-000000.tar"), "out", load_config(FAST_CONFIG), "mymodel", workers=1)
    assert json.loads((work / "out" / "job.json").read_text())["model"] == str(work / "mymodel")
    log = capsys.readouterr().err
    assert "\r" not in log and log.splitlines()[-1].startswith("100%|") and "2/2 [" in log.splitlines()[-1]
    monkeypatch.chdir(elsewhere)
    assert main(["resume", str(work / "out"), "--no-progress"]) == 0  # the done shard is kept, nothing rerun
    assert [e.state for e in Ledger(work / "out").entries()] == ["done"]


@pytest.mark.faults  # four jobs: with the fault tests, out of the default run
def test_a_shard_changed_since_it_was_done_is_redone_and_one_unlike_its_manifest_fails(ray_local, shards, tmp_path,
                                                                                      capsys):
    shutil.copytree(shards, tmp_path / "in")
    pattern, out = str(tmp_path / "in" / "voc-train-00000{0,2}.tar"), tmp_path / "out"
    config = load_config(FAST_CONFIG)
    run_job(pattern, out, config, "tiny", workers=1, progress=False)
    first = {e.shard: e for e in Ledger(out).entries()}
    assert first["voc-train-000002"].input_fingerprint["sha256"] == file_sha256(tmp_path / "in" / "voc-train-000002.tar")

    # Sharded again with other labels (the manifest follows); the other shard is rewritten with its own bytes.
    changed = tmp_path / "in" / "voc-train-000002.tar"
    samples = list(read_shard(str(changed)))
    meta = json.loads(samples[0]["json"])
    meta["names"], meta["labels"] = ["dog"], [12]
    samples[0]["json"] = encode_json(meta)
    changed.write_bytes(tar_bytes(samples))
    same = tmp_path / "in" / "voc-train-000000.tar"
    same.write_bytes(same.read_bytes())  # a new modification time, the same bytes
    _update_manifest(tmp_path / "in")
    capsys.readouterr()
    assert main(["status", str(out)]) == 0  # status tells from sizes, times and the manifest, reading no shard
    assert (f"1 done shard(s) hold other bytes in their input shard now (first: voc-train-000002): `pseudolabel "
            f"resume {out}` redoes them\n") in capsys.readouterr().out
    summary = run_job(pattern, out, config, "tiny", workers=1, progress=False)
    assert "1 shard(s) done before hold other bytes now (a new shard or a new copy), so they are redone: " \
           "voc-train-000002" in capsys.readouterr().out
    assert (summary.shards_done, summary.shards_failed) == (1, 0)
    second = {e.shard: e for e in Ledger(out).entries()}
    assert second["voc-train-000000"].updated == first["voc-train-000000"].updated
    assert second["voc-train-000002"].updated > first["voc-train-000002"].updated
    rows = {r["id"]: r for r in ds.dataset(out / "stats").to_table().to_pylist()}
    assert rows[samples[0]["__key__"]]["names"] == ["dog"]

    # A damaged copy of a done shard: the manifest says its shard is the one done, so it stays done ...
    damaged = bytearray(changed.read_bytes())
    damaged[600] ^= 0xFF  # one byte of the first member's data changed
    changed.write_bytes(bytes(damaged))
    summary = run_job(pattern, out, config, "tiny", workers=1, progress=False)
    assert (summary.shards_done, summary.shards_failed, summary.shards_skipped) == (0, 0, 2)
    # ... and a job that reads it fails it, naming both checksums.
    summary = run_job(pattern, tmp_path / "out2", config, "tiny", workers=1, progress=False)
    assert (summary.shards_done, summary.shards_failed) == (1, 1)
    entry = Ledger(tmp_path / "out2").get("voc-train-000002")
    assert entry.state == "failed" and entry.error.endswith(
        "its manifest.json lists: it was damaged or changed since it was written; copy it again, or shard the "
        "dataset again (which writes a new manifest)")
    assert entry.error.startswith(f"the shard's sha256 ({file_sha256(changed)[:12]}...) is not the ")
    assert not (tmp_path / "out2" / "masks" / "voc-train-000002.tar").exists()


def test_batch_size_option_takes_auto_as_the_config_does(capsys):
    from pipeline.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["run", "--input", "s", "-o", "o", "--batch-size", "auto"]).batch_size == "auto"
    assert parse(["resume", "o", "--batch-size", "8"]).batch_size == 8
    with pytest.raises(SystemExit):
        parse(["run", "--input", "s", "-o", "o", "--batch-size", "many"])
    assert "argument --batch-size: takes a number of images or auto, not 'many'" in capsys.readouterr().err
