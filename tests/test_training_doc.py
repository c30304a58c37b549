"""Every code block of docs/training.md runs as written, from a folder holding a job as out/."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_job_output

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_its_snippets():
    assert [language for language, _ in BLOCKS] == ["bash", "python", "python", "bash"]


@pytest.fixture(scope="module")
def job_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("doc")
    make_job_output(tmp, lambda gt, i: gt, per_shard=1)
    return tmp


def _run(language: str, code: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
    run = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run.stdout


def test_every_snippet_runs_in_order(job_folder):
    outputs = []
    for language, code in BLOCKS:
        if "torchvision" in code and importlib.util.find_spec("torchvision") is None:
            continue  # the DeepLabV3 block: test_deeplabv3_snippet says why it is skipped
        outputs.append(_run(language, code, job_folder))
    assert "exported 4 masks" in outputs[0]
    assert "4 images an epoch on this rank; 4 exported" in outputs[1]
    assert (job_folder / "report" / "index.html").is_file() and (job_folder / "out" / "eval.json").is_file()


def test_deeplabv3_snippet(job_folder):
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed: beside the CPU torch 2.13.0 of this project it needs "
                    "torch 2.14.1 + torchvision 0.29.1 (a 5.5 GB CUDA build), see the env notes")
    (code,) = [code for _, code in BLOCKS if "torchvision" in code]
    lines = _run("python", code, job_folder).splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1"]
