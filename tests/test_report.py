"""The HTML report: self-contained, with overlays, plots and the eval table."""

import re

import numpy as np
import pytest

from conftest import make_job_output
from pipeline.cli import main
from pipeline.results.report import _strip, pick_examples


def test_report_is_one_self_contained_page(tmp_path, capsys):
    out, _ = make_job_output(tmp_path, lambda gt, i: np.roll(gt, i, axis=1))
    assert main(["report", str(out), "-o", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    images = re.findall(r"<img src='data:image/png;base64,", page)
    assert len(images) == 3 + 4  # worst, median and best strips (one each of 4 images) and four plots
    assert "Worst by mean confidence" in page and "mIoU" in page and "Mean confidence per image" in page
    assert "src='http" not in page and "href=" not in page
    # the worst image is labelled cat (mask value 8) and sofa (18): each name after its colour in the masks
    assert ("<span class='swatch' style='background:#400000'></span>cat, "
            "<span class='swatch' style='background:#00c000'></span>sofa") in page


def test_an_html_output_is_the_page_itself_and_a_path_that_cannot_take_it_fails_before_the_evaluation(
        tmp_path, capsys, monkeypatch):
    out, _ = make_job_output(tmp_path, lambda gt, i: gt)
    page = tmp_path / "reports" / "voc-run1.html"
    assert main(["report", str(out), "-o", str(page), "--no-progress", "--processes", "1"]) == 0
    assert page.is_file() and "Pseudo-mask report" in page.read_text()
    assert capsys.readouterr().out.endswith(f"wrote {page}\n")
    import pipeline.results.report as report

    monkeypatch.setattr(report, "evaluate_job", lambda *a, **k: pytest.fail("evaluated before the path was checked"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert main(["report", str(out), "-o", str(a_file / "r.html"), "--no-progress", "--processes", "1"]) == 2
    assert f"Not a directory: {a_file}: a file stands where a folder" in capsys.readouterr().err
    assert a_file.read_text() == "keep me"


def test_examples_are_disjoint_groups():
    rows = [{"id": str(i), "status": "ok", "mean_confidence": i / 10} for i in range(10)]
    groups = pick_examples(rows + [{"id": "x", "status": "failed", "mean_confidence": None}], 3)
    ids = {k: [r["id"] for r in v] for k, v in groups.items()}
    assert ids == {"worst": ["0", "1", "2"], "median": ["4", "5", "6"], "best": ["9", "8", "7"]}
    assert list(pick_examples(rows[:2], 3)) == ["all"]


def test_a_job_whose_every_image_failed_reports_that_and_the_reasons(tmp_path):
    out, _ = make_job_output(tmp_path, lambda gt, i: None)
    assert main(["report", str(out), "-o", str(tmp_path / "report"), "--no-progress", "--processes", "1"]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "4 images: 0 ok, 4 failed" in page and "<h3>" not in page  # no empty example headings
    assert "No image got a mask: every image failed (the reasons are below)." in page
    assert page.count("failed on purpose") == 4


@pytest.mark.parametrize("height, width, strip_size", [
    (375, 500, (2 * 213, 160)),  # a VOC photo: 160 pixels high, its aspect kept
    (8, 4000, (2 * 320, 16)),  # a panorama strip: not 2 x 80,000 pixels wide
    (2000, 3, (2 * 16, 160)),  # a sliver: each panel still 16 pixels wide, not the whole strip 1
    (1, 1, (2 * 160, 160)),
])
def test_report_strips_fit_a_panel_box_whatever_the_image_shape(height, width, strip_size):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[: max(1, height // 2)] = 15  # person (192, 128, 128) over the top half
    strip = _strip(image, mask, None)
    assert strip.size == strip_size
    panel = np.asarray(strip)[:, strip_size[0] // 2:]
    assert (panel[0, 0] == (192, 128, 128)).all()  # the label map scaled by nearest neighbour: no blended colours
    assert set(map(tuple, panel.reshape(-1, 3))) <= {(192, 128, 128), (0, 0, 0)}
    with_gt = _strip(image, mask, mask)
    assert with_gt.size == (strip_size[0] * 3 // 2, strip_size[1])
