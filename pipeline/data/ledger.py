"""Per-shard job state and resume decisions.

`out/ledger/<shard>.json` holds one shard's state (done / failed / in_progress), attempts,
output checksums, config hash, model and its input's fingerprint; `out/job.json` the job's
config, model and input.
Every file is written to a temporary name and renamed, so a crash never leaves a partial file
under a final name.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.data.atomic import atomic_write_json, file_sha256

DONE, FAILED, IN_PROGRESS = "done", "failed", "in_progress"
INTERRUPTED = "interrupted"  # in flight when the job was stopped (Ctrl-C, SIGTERM); redone on resume
NOT_STARTED = "not started"  # an input shard without a ledger entry
STALE = "stale"  # done under an earlier config or model (before a `run --force` with others); redone on resume


_ABSENT = object()  # a key one config lacks (any JSON value, the string "absent" too, is a value)


def differing_keys(recorded: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs as JSON, each with both values
    (`crf.enabled false -> true`); a key one of them lacks shows as `absent`."""
    changed = []
    for key in sorted(set(recorded) | set(new)):
        old_value, new_value = recorded.get(key, _ABSENT), new.get(key, _ABSENT)
        if isinstance(old_value, dict) and isinstance(new_value, dict):
            changed += differing_keys(old_value, new_value, f"{prefix}{key}.")
        elif old_value != new_value:
            shown = ["absent" if v is _ABSENT else json.dumps(v) for v in (old_value, new_value)]
            shown = [v if len(v) <= 40 else v[:37] + "..." for v in shown]
            changed.append(f"{prefix}{key} {shown[0]} -> {shown[1]}")
    return changed


@dataclass
class ShardEntry:
    """One input shard's state. outputs: output path (relative to the job folder) -> sha256;
    input_fingerprint: the input shard's size, modification time and sha256 as its worker read
    it (`shards.input_fingerprint`: the sha256 of a URL or `pipe:` input; None before it was read)."""

    shard: str
    url: str
    state: str
    config_hash: str
    model: str
    attempts: int = 0
    outputs: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    failed_samples: int = 0
    seconds: float = 0.0
    error: str | None = None
    input_fingerprint: dict | None = None
    updated: float = field(default_factory=time.time)


def count_states(counts: dict[str, int]) -> str:
    """{state: how many} -> "1 failed, 3 not started"."""
    return ", ".join(f"{n} {state}" for state, n in counts.items())


def no_job_reason(folder: Path, missing: str) -> str:
    """What `folder`, given as a job's folder, is instead: missing, a file, a shard folder, or a
    folder without the job's file `missing` (job.json, masks/)."""
    if not folder.exists():
        return f"{folder} does not exist"
    if not folder.is_dir():
        return f"{folder} is a file, not a job's folder"
    if (folder / "manifest.json").is_file():
        return f"{folder} holds image shards (manifest.json), not a job's outputs"
    job = folder.resolve().parent
    if (job / "job.json").is_file():  # masks/, stats/ or ledger/ inside a job's folder
        return f"{folder} is the {folder.resolve().name}/ folder inside the job {job} (the folder to pass)"
    return f"{folder} holds no job's outputs (no {missing})"


class JobMismatchError(PipelineError, RuntimeError):
    """The output folder belongs to a job with another config or model."""


class NoJobError(PipelineError, FileNotFoundError):
    """The folder given as a job's output holds no job.json."""


class DamagedJobError(PipelineError, ValueError):
    """The folder's job.json cannot be read."""


class JobBusyError(PipelineError, RuntimeError):
    """Another running job holds the output folder."""


class Ledger:
    """The state of a job's output folder."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / "ledger"

    def _path(self, shard: str) -> Path:
        return self.dir / f"{shard}.json"

    @staticmethod
    def _read_entry(path: Path) -> ShardEntry | None:
        """The entry in path; None where it is missing or cannot be read as one (damaged by
        something outside the job, which writes each whole): its shard is then redone."""
        try:
            return ShardEntry(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def get(self, shard: str) -> ShardEntry | None:
        return self._read_entry(self._path(shard))

    def put(self, entry: ShardEntry) -> None:
        entry.updated = time.time()
        atomic_write_json(self._path(entry.shard), asdict(entry))

    def entries(self) -> list[ShardEntry]:
        if not self.dir.is_dir():
            return []
        return [entry for entry in map(self._read_entry, sorted(self.dir.glob("*.json"))) if entry is not None]

    def states(self) -> dict[str, str]:
        """Shard name -> its state, STALE for one done under another job's config."""
        job = self.job()
        return {entry.shard: STALE if entry.state == DONE and job and entry.config_hash != job["config_hash"]
                else entry.state for entry in self.entries()}

    def done_shards(self) -> list[str]:
        """The shards done under the folder's job, by name: those whose outputs are its results.
        Not a shard done under an earlier config, nor one whose job stopped between writing its
        outputs and recording them (both are redone on resume)."""
        return [name for name, state in self.states().items() if state == DONE]

    def unfinished(self) -> tuple[int, dict[str, int]]:
        """(how many input shards the job has, {state: how many} of those not done, by state);
        (0, {}) where the recorded input can no longer be listed."""
        try:
            states = self.input_states()
        except PipelineError:
            return 0, {}
        return len(states), dict(sorted(Counter(s for s in states.values() if s != DONE).items()))

    def input_states(self) -> dict[str, str]:
        """The job's input shards, in input order: name -> its state (DONE, FAILED, IN_PROGRESS,
        INTERRUPTED, STALE or NOT_STARTED). An InputError where the recorded input can
        no longer be listed."""
        from pipeline.data.shards import expand_input, shard_name

        states = self.states()
        names = [shard_name(url) for url in expand_input(self.recorded_job()["input"])]
        return {name: states.get(name, NOT_STARTED) for name in names}

    # --- the job --------------------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return self.out_dir / ".job.lock"

    def running_job(self) -> str | None:
        """Who holds the folder (`pid N on HOST, since ...`) while a job runs on it, else None."""
        if not self.lock_path.is_file():
            return None
        with open(self.lock_path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return handle.read().strip() or "another process"
            except OSError:  # a file system without locks: nothing can be said
                return None
        return None

    @contextmanager
    def locked(self):
        """Hold the folder for one running job: a second job on it, from this machine or
        another that shares the file system, is refused with a JobBusyError naming the holder.
        The lock is the kernel's (flock on `.job.lock`), so it ends with the holding process,
        however that ends; the file itself stays."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise JobBusyError(f"{self.out_dir} is in use by a running job ({holder}): wait for it to end or "
                                   "stop it, then resume") from exc
            except OSError:  # a file system without locks (some network mounts): run unguarded, as before
                yield
                return
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            handle.flush()
            yield

    @property
    def job_path(self) -> Path:
        return self.out_dir / "job.json"

    def job(self) -> dict | None:
        """The folder's job.json, None where no job has run; a DamagedJobError where it cannot be
        read (the job writes it whole: a copy cut short, an edit)."""
        if not self.job_path.is_file():
            return None
        try:
            job = json.loads(self.job_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problem = str(exc)
        else:
            if isinstance(job, dict) and isinstance(job.get("config_hash"), str):
                return job
            problem = "not a job's record (it has no config_hash)"
        raise DamagedJobError(f"cannot read {self.job_path}: {problem}; delete it and run the job's command again "
                              f"(pseudolabel run --input SHARDS -o {self.out_dir}, its config and model): the shards "
                              "its ledger records as done under them stay done")

    def recorded_job(self) -> dict:
        """The job.json of this folder; NoJobError when no job has run here."""
        job = self.job()
        if job is None:
            raise NoJobError(f"{no_job_reason(self.out_dir, 'job.json')}: pass the -o/--output folder of a "
                             "pseudolabel run, or start one with pseudolabel run --input SHARDS -o FOLDER")
        return job

    def claim(self, job: dict, force: bool) -> None:
        """Record the job in the folder; refuse a folder where a job with another config or
        model has recorded a shard, unless force (a job that never got to its first shard, say
        one whose cluster could not be joined, leaves nothing to protect)."""
        previous = self.job()
        if previous and previous["config_hash"] != job["config_hash"] and self.entries() and not force:
            changed = differing_keys(previous.get("config", {}), job.get("config", {}))
            if previous.get("model") != job["model"]:
                changed.insert(0, f"model {previous.get('model')} -> {job['model']}")
            raise JobMismatchError(
                f"{self.out_dir} holds a job with another config or model (hash {previous['config_hash'][:12]}, "
                f"model {previous['model']}; differs in {', '.join(changed) or 'nothing recorded'}); use a new "
                "--output folder, or --force to redo every shard"
            )
        atomic_write_json(self.job_path, job)

    def outputs_intact(self, entry: ShardEntry) -> bool:
        """Whether every output the entry lists exists with its recorded checksum."""
        for rel, digest in entry.outputs.items():
            path = self.out_dir / rel
            if not path.is_file() or file_sha256(path) != digest:
                return False
        return bool(entry.outputs)

    def plan(self, shards: list[str], config_hash: str, retry_failed: bool, urls: dict[str, str] | None = None,
             checksums: dict[str, str] | None = None) -> dict[str, list[str]]:
        """Split shards into `run` (never run, interrupted, done under another config, with
        damaged outputs or from an input shard that changed since, failed when retry_failed) and
        `done` / `failed` (skipped); `changed` lists the done shards redone for their input
        (`shards.input_changed`; urls: shard name -> where its input is now, checksums: shard
        path -> the sha256 its manifest lists; without urls inputs are not looked at)."""
        from pipeline.data.shards import input_changed

        plan: dict[str, list[str]] = {"run": [], "done": [], "failed": [], "changed": []}
        for shard in shards:
            entry = self.get(shard)
            if entry is None or entry.state in (IN_PROGRESS, INTERRUPTED) or entry.config_hash != config_hash:
                plan["run"].append(shard)
            elif entry.state == DONE:
                changed = urls is not None and input_changed(entry.input_fingerprint, urls[shard],
                                                             (checksums or {}).get(urls[shard]))
                if changed:
                    plan["changed"].append(shard)
                plan["run" if changed or not self.outputs_intact(entry) else "done"].append(shard)
            else:  # failed
                plan["run" if retry_failed else "failed"].append(shard)
        return plan
