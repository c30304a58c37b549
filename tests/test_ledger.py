"""Ledger: resume decisions, job identity, atomic writes."""

import os

import pytest

from pipeline.data.atomic import atomic_write_bytes, file_sha256
from pipeline.data.ledger import DONE, FAILED, IN_PROGRESS, JobMismatchError, Ledger, ShardEntry


def _entry(ledger, shard, state, digest="h1", outputs=None):
    ledger.put(ShardEntry(shard=shard, url=f"{shard}.tar", state=state, config_hash=digest, model="m",
                          attempts=1, outputs=outputs or {}))


def test_plan_runs_what_is_not_done_under_this_config(tmp_path):
    ledger = Ledger(tmp_path)
    atomic_write_bytes(tmp_path / "masks" / "a.tar", b"mask")
    _entry(ledger, "a", DONE, outputs={"masks/a.tar": file_sha256(tmp_path / "masks" / "a.tar")})
    _entry(ledger, "b", FAILED)
    _entry(ledger, "c", IN_PROGRESS)
    _entry(ledger, "d", DONE, digest="other", outputs={"masks/a.tar": file_sha256(tmp_path / "masks" / "a.tar")})
    shards = ["a", "b", "c", "d", "e"]
    assert ledger.plan(shards, "h1", retry_failed=False) == {"run": ["c", "d", "e"], "done": ["a"], "failed": ["b"],
                                                               "changed": []}
    assert ledger.plan(shards, "h1", retry_failed=True)["run"] == ["b", "c", "d", "e"]


def test_damaged_outputs_are_redone(tmp_path):
    ledger = Ledger(tmp_path)
    atomic_write_bytes(tmp_path / "masks" / "a.tar", b"mask")
    _entry(ledger, "a", DONE, outputs={"masks/a.tar": file_sha256(tmp_path / "masks" / "a.tar")})
    (tmp_path / "masks" / "a.tar").write_bytes(b"mas")  # truncated by hand
    assert ledger.plan(["a"], "h1", False)["run"] == ["a"]
    (tmp_path / "masks" / "a.tar").unlink()
    assert ledger.plan(["a"], "h1", False)["run"] == ["a"]


def test_job_with_another_config_is_refused_unless_forced(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.claim({"config_hash": "h1", "model": "m"}, force=False)
    ledger.claim({"config_hash": "h1", "model": "m"}, force=False)
    _entry(ledger, "a", DONE)
    with pytest.raises(JobMismatchError, match="another config or model .* --force"):
        ledger.claim({"config_hash": "h2", "model": "m"}, force=False)
    ledger.claim({"config_hash": "h2", "model": "m"}, force=True)
    assert ledger.job()["config_hash"] == "h2"
    # the refusal names what differs, both values each
    ledger.claim({"config_hash": "h3", "model": "m", "config": {"ent": 0.015, "crf": {"enabled": False}, "a": 1}},
                 force=True)
    with pytest.raises(JobMismatchError) as refused:
        ledger.claim({"config_hash": "h4", "model": "n", "config": {"ent": 0.5, "crf": {"enabled": True}, "b": 2}},
                     force=False)
    assert ("differs in model m -> n, a 1 -> absent, b absent -> 2, crf.enabled false -> true, ent 0.015 -> 0.5); "
            "use a new --output folder") in str(refused.value)


def test_a_job_that_recorded_no_shard_does_not_hold_its_folder(tmp_path):
    """A job that stopped before its first shard (a cluster it could not join) protects nothing."""
    ledger = Ledger(tmp_path)
    ledger.claim({"config_hash": "h1", "model": "m"}, force=False)
    ledger.claim({"config_hash": "h2", "model": "m"}, force=False)
    assert ledger.job()["config_hash"] == "h2"


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_bytes(tmp_path / "x" / "f.bin", b"123")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["f.bin"]


def test_a_write_that_fills_the_disk_names_its_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno
    import os

    from pipeline.data import atomic

    target = tmp_path / "masks" / "voc-000000.tar"
    atomic_write_bytes(target, b"the shard's masks")

    def disk_full(fd):  # as a real full disk answers: errno and message, no file name
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(OSError) as raised:
        atomic_write_bytes(target, b"x" * 100_000)
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(target))
    assert [p.name for p in target.parent.iterdir()] == ["voc-000000.tar"]  # the half-written copy is gone
    assert target.read_bytes() == b"the shard's masks"  # and the file it was to replace is whole


def test_one_running_job_holds_its_folder_until_its_process_lets_go(tmp_path):
    import os
    import subprocess
    import sys

    from pipeline.data.ledger import JobBusyError

    ledger = Ledger(tmp_path / "out")
    assert ledger.running_job() is None
    with ledger.locked():
        assert ledger.running_job().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(JobBusyError, match=rf"out is in use by a running job \(pid {os.getpid()} on .*\): wait"):
            with Ledger(tmp_path / "out").locked():
                pass
    assert ledger.running_job() is None
    # a driver killed with SIGKILL holds nothing: the kernel ends its lock with it
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pipeline.data.ledger import Ledger\n"
                               f"with Ledger({str(tmp_path / 'out')!r}).locked():\n"
                               "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert ledger.running_job().startswith(f"pid {holder.pid} on ")
        holder.kill()
        holder.wait(timeout=30)
        assert ledger.running_job() is None
        with ledger.locked():
            pass
    finally:
        holder.kill()
        holder.stdout.close()


def test_a_file_system_without_locks_runs_the_job_unguarded(tmp_path, monkeypatch):
    import errno

    from pipeline.data import ledger as ledger_module

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(ledger_module.fcntl, "flock", no_locks)
    ledger = Ledger(tmp_path / "out")
    with ledger.locked():
        assert ledger.running_job() is None
    assert (tmp_path / "out").is_dir()


def test_a_done_shard_whose_input_changed_is_planned_again(tmp_path):
    from pipeline.data.shards import input_fingerprint

    shard = tmp_path / "a.tar"
    shard.write_bytes(b"x" * 4096)
    ledger = Ledger(tmp_path / "out")
    (tmp_path / "out" / "masks").mkdir(parents=True)
    (tmp_path / "out" / "masks" / "a.tar").write_bytes(b"mask")
    ledger.put(ShardEntry(shard="a", url=str(shard), state="done", config_hash="h1", model="m",
                          outputs={"masks/a.tar": file_sha256(tmp_path / "out" / "masks" / "a.tar")},
                          input_fingerprint=input_fingerprint(str(shard))))
    urls = {"a": str(shard)}
    assert ledger.plan(["a"], "h1", False, urls) == {"run": [], "done": ["a"], "failed": [], "changed": []}
    recorded = ledger.get("a").input_fingerprint["mtime_ns"]
    os.utime(shard, ns=(1, 1))  # touched or copied: the same bytes
    assert ledger.plan(["a"], "h1", False, urls)["done"] == ["a"]
    shard.write_bytes(b"y" * 4096)  # the same size, other bytes
    os.utime(shard, ns=(1, recorded))
    assert ledger.plan(["a"], "h1", False, urls)["done"] == ["a"]  # size and time as recorded: taken as it is, unread
    os.utime(shard, ns=(1, 2))
    assert ledger.plan(["a"], "h1", False, urls) == {"run": ["a"], "done": [], "failed": [], "changed": ["a"]}
    assert ledger.plan(["a"], "h1", False)["done"] == ["a"]  # inputs not looked at
    # Where a manifest lists the shard's sha256, it tells, and the shard is not read.
    recorded_sha = ledger.get("a").input_fingerprint["sha256"]
    assert ledger.plan(["a"], "h1", False, urls, {str(shard): recorded_sha})["done"] == ["a"]
    assert ledger.plan(["a"], "h1", False, urls, {str(shard): "0" * 64})["changed"] == ["a"]
