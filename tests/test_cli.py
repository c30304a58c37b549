"""The `pseudolabel segment` command as a user runs it."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import synthetic_image
from pipeline.cli import main


@pytest.fixture()
def image_file(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(synthetic_image(120, 160, seed=4)).save(path, quality=90)
    return path


def _command():
    exe = shutil.which("pseudolabel")
    return [exe] if exe else [sys.executable, "-m", "pipeline.cli"]


def test_segment_writes_a_palette_mask_and_overlay(image_file, tmp_path):
    out, over = tmp_path / "mask.png", tmp_path / "overlay.png"
    run = subprocess.run(_command() + ["segment", str(image_file), "--labels", "cat,sofa", "--model", "tiny",
                                       "--device", "cpu", "--out", str(out), "--overlay", str(over)],
                         capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"wrote {out} (160x120)" in run.stdout
    mask = Image.open(out)
    assert mask.mode == "P" and mask.size == (160, 120)
    assert set(np.unique(np.array(mask))) <= {0, 8, 18}
    assert Image.open(over).size == (320, 120)


def test_segment_with_crf(image_file, tmp_path, capsys):
    out = tmp_path / "mask.png"
    assert main(["segment", str(image_file), "--labels", "dining table", "--model", "tiny", "--device", "cpu",
                 "--out", str(out), "--crf"]) == 0
    assert set(np.unique(np.array(Image.open(out)))) <= {0, 11}


@pytest.mark.parametrize("labels, message", [
    ("cat,giraffe", "unknown class name 'giraffe': use one of aeroplane, bicycle"),
    (" , ", "--labels is empty"),
])
def test_bad_labels_are_one_line_errors(image_file, tmp_path, capsys, labels, message):
    code = main(["segment", str(image_file), "--labels", labels, "--model", "tiny", "--out", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "m.png").exists()


def test_unreadable_and_missing_images_are_one_line_errors(tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    for path, message in ((broken, f"cannot decode {broken}"), (tmp_path / "nope.jpg", "not found")):
        code = main(["segment", str(path), "--labels", "cat", "--model", "tiny", "--out", str(tmp_path / "m.png")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1


def test_bad_config_value_is_a_one_line_error(image_file, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("iterations: -3\n")
    code = main(["segment", str(image_file), "--labels", "cat", "--config", str(config), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2 and "key iterations" in err


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "segment" in capsys.readouterr().out
