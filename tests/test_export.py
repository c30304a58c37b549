"""Export in the VOC layout, read back the way mmsegmentation reads masks (PIL index values)."""

import numpy as np
import pytest
from PIL import Image

from conftest import make_job_output
from pipeline.cli import main


def _read_like_mmseg(path):
    # mmseg's LoadAnnotations decodes seg maps with pillow, flag 'unchanged': index values.
    with Image.open(path) as img:
        return np.array(img)


def test_export_writes_masks_split_list_and_images(tmp_path, capsys):
    out, gts = make_job_output(tmp_path, lambda gt, i: gt)
    dest = tmp_path / "export"
    assert main(["export", str(out), "--format", "voc", "-o", str(dest), "--with-images"]) == 0
    assert "exported 4 masks" in capsys.readouterr().out
    ids = (dest / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    assert ids == sorted(gts)
    for image_id in ids:
        mask = _read_like_mmseg(dest / "SegmentationClassPseudo" / f"{image_id}.png")
        assert mask.dtype == np.uint8 and (mask == gts[image_id]).all()
        assert Image.open(dest / "SegmentationClassPseudo" / f"{image_id}.png").mode == "P"
        assert Image.open(dest / "JPEGImages" / f"{image_id}.jpg").size == (45, 30)


def test_a_pairs_list_reads_like_deeplabs_train_aug(tmp_path, capsys):
    """DeepLab-style loaders read a list of `/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`
    lines, each path under the dataset's root: an id list left them to be rewritten by hand."""
    out, gts = make_job_output(tmp_path, lambda gt, i: gt)
    dest = tmp_path / "export"
    assert main(["export", str(out), "-o", str(dest), "--with-images", "--list", "pairs", "--split", "train"]) == 0
    assert capsys.readouterr().out.endswith(f"split list {dest / 'ImageSets/Segmentation/train.txt'}\n")
    lines = (dest / "ImageSets/Segmentation/train.txt").read_text().splitlines()
    assert len(lines) == len(gts)
    for line, image_id in zip(lines, sorted(gts)):
        image_path, mask_path = line.split()  # read as DeepLab loaders do: the root, then the path without its "/"
        assert (image_path, mask_path) == (f"/JPEGImages/{image_id}.jpg", f"/SegmentationClassPseudo/{image_id}.png")
        mask = _read_like_mmseg(dest / mask_path[1:])
        assert (mask == gts[image_id]).all() and Image.open(dest / image_path[1:]).size == mask.shape[::-1]
    # without the images, the list names files the export does not hold: said, with the two ways to have them
    assert main(["export", str(out), "-o", str(dest), "--list", "pairs", "--force"]) == 0
    assert capsys.readouterr().out.endswith(f"its lines name /JPEGImages/<id>.jpg under {dest}, which holds no "
                                            "images: export with --with-images, or link the dataset's JPEGImages "
                                            "folder there\n")


def test_export_filters_and_ignore(tmp_path, capsys):
    # image i has confidence 0.2 + 0.2 i; image 1's prediction drops its labelled class 12.
    out, gts = make_job_output(tmp_path, lambda gt, i: np.where(gt == 12, 0, gt) if i == 1 else gt)
    dest = tmp_path / "e1"
    assert main(["export", str(out), "-o", str(dest), "--min-confidence", "0.5"]) == 0
    assert (dest / "ImageSets/Segmentation/train_aug.txt").read_text().split() == ["2011_000002", "2011_000003"]
    assert main(["export", str(out), "-o", str(tmp_path / "e2"), "--require-all-labels", "--split", "x"]) == 0
    assert "2011_000001" not in (tmp_path / "e2/ImageSets/Segmentation/x.txt").read_text()
    assert main(["export", str(out), "-o", str(tmp_path / "e3"), "--ignore-below", "0.5"]) == 0
    low = _read_like_mmseg(tmp_path / "e3/SegmentationClassPseudo/2011_000000.png")  # confidence 0.2
    high = _read_like_mmseg(tmp_path / "e3/SegmentationClassPseudo/2011_000003.png")  # confidence 0.8
    assert (low == 255).all() and (high == gts["2011_000003"]).all()
    # a filter that drops every image writes no empty split list, and leaves the earlier export
    capsys.readouterr()
    assert main(["export", str(out), "-o", str(dest), "--min-confidence", "0.95", "--force"]) == 2
    assert capsys.readouterr().err == (
        "pseudolabel: error: nothing to export (4 for mean confidence): loosen --min-confidence or "
        "--require-all-labels, or redo the failed images; an earlier export at -o/--output is left as it was\n")
    assert (dest / "ImageSets/Segmentation/train_aug.txt").read_text().split() == ["2011_000002", "2011_000003"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


@pytest.mark.parametrize("argv, message", [
    (["export", "JOB", "-o", "EXPORT", "--min-confidence", "2"], "--min-confidence takes a score from 0 to 1, got 2.0"),
    (["export", "JOB", "-o", "EXPORT", "--ignore-below", "-0.1"], "--ignore-below takes a score from 0 to 1, got -0.1"),
    (["eval", "JOB", "--gt", "MISSING"], "--gt MISSING does not exist: pass the folder of <id>.png ground-truth masks"),
    (["eval", "JOB", "--gt", "JOB/job.json"], "--gt JOB/job.json is a file: pass the folder of <id>.png"),
    (["eval", "JOB", "--gt", "OBJECTS"], "--gt OBJECTS holds VOC's instance masks (a value per object, not per "
                                         "class): pass SegmentationClass or SegmentationClassAug, beside it"),
])
def test_bad_hand_off_options_are_one_line_errors(tmp_path, capsys, argv, message):
    out, _ = make_job_output(tmp_path, lambda gt, i: gt)
    paths = {"JOB": str(out), "EXPORT": str(tmp_path / "export"), "MISSING": str(tmp_path / "SegmentationClassAug"),
             "OBJECTS": str(tmp_path / "SegmentationObject")}
    (tmp_path / "SegmentationObject").mkdir()

    def concrete(text):
        for name, path in paths.items():
            text = text.replace(name, path)
        return text
    assert main([concrete(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pseudolabel: error: {concrete(message)}")
    assert err.count("\n") == 1 and not (tmp_path / "export").exists() and not (out / "eval.json").exists()


def test_export_is_all_or_nothing(tmp_path, capsys):
    out, _ = make_job_output(tmp_path, lambda gt, i: gt)
    dest = tmp_path / "export"
    dest.mkdir()
    (dest / "mine.txt").write_text("not the export's")
    assert main(["export", str(out), "-o", str(dest)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]
    # The input shards are gone: --with-images fails before anything is written.
    for shard in (tmp_path / "shards").glob("*.tar"):
        shard.unlink()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["export", str(out), "-o", str(tmp_path / "new"), "--with-images"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # --force replaces an earlier export in one rename, and nothing else: not a folder holding
    # other files, as the job's own folder or the folder above it
    for target, held in ((dest, "mine.txt"), (out, "job.json and more"), (tmp_path, "VOC2012 and more")):
        assert main(["export", str(out), "-o", str(target), "--force"]) == 2
        assert capsys.readouterr().err == (f"pseudolabel: error: {target} holds {held}, which no export writes: "
                                           "--force replaces only an earlier export (SegmentationClassPseudo, "
                                           "ImageSets, JPEGImages); pass a new -o/--output\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (out / "job.json").is_file()
    (dest / "mine.txt").unlink()
    assert main(["export", str(out), "-o", str(dest)]) == 0
    (dest / "SegmentationClassPseudo" / "stale.png").write_bytes(b"an earlier export's mask")
    assert main(["export", str(out), "-o", str(dest), "--force"]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["ImageSets", "SegmentationClassPseudo"]
    assert not (dest / "SegmentationClassPseudo" / "stale.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_export_eval_and_report_of_an_unfinished_job_say_which_part_they_read(tmp_path, capsys):
    from pipeline.data.ledger import FAILED, Ledger

    out, _ = make_job_output(tmp_path, lambda gt, i: gt, per_shard=1)  # 4 shards, all done
    assert main(["export", str(out), "-o", str(tmp_path / "whole")]) == 0
    assert "not complete" not in capsys.readouterr().out
    ledger = Ledger(out)
    failed = ledger.get("voc-train-000001")
    failed.state, failed.error = FAILED, "RuntimeError: CUDA error"
    ledger.put(failed)
    (out / "ledger" / "voc-train-000003.json").unlink()  # never started (the job was stopped)
    line = (f"the job is not complete: 2 of 4 input shards done (1 failed, 1 not started), and this reads those; "
            f"`pseudolabel resume {out}` runs the rest\n")
    for command in (["export", str(out), "-o", str(tmp_path / "part")], ["eval", str(out)],
                    ["report", str(out), "-o", str(tmp_path / "report")]):
        assert main(command) == 0
        assert capsys.readouterr().out.startswith(line), command
    assert ("<b>The job is not complete</b>: 2 of 4 input shards done (1 failed, 1 not started)"
            in (tmp_path / "report" / "index.html").read_text())
    for done in ("voc-train-000000", "voc-train-000002"):
        (out / "ledger" / f"{done}.json").unlink()
    assert main(["eval", str(out)]) == 2  # not "no image has ground truth"
    assert capsys.readouterr().err == (f"pseudolabel: error: {out} has no shard done yet (1 failed, 3 not started): "
                                       f"run `pseudolabel resume {out}`\n")


def test_after_a_forced_run_with_another_config_only_its_own_shards_are_read(tmp_path, capsys):
    from pipeline.data.ledger import Ledger

    out, gts = make_job_output(tmp_path, lambda gt, i: gt, per_shard=1)  # 4 shards done under config A
    ledger = Ledger(out)
    ledger.claim({**ledger.job(), "config_hash": "config B"}, force=True)  # `run --force` with config B ...
    redone = ledger.get("voc-train-000002")
    redone.config_hash = "config B"  # ... stopped after redoing one shard
    ledger.put(redone)
    assert main(["export", str(out), "-o", str(tmp_path / "export")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("the job is not complete: 1 of 4 input shards done (3 stale), and this reads those "
                              "(stale: done under an earlier config or model); ")
    assert (tmp_path / "export/ImageSets/Segmentation/train_aug.txt").read_text().split() == [sorted(gts)[2]]
    assert main(["status", str(out)]) == 0
    assert "1 done, 0 failed, 0 interrupted, 0 in progress, 3 stale (done under an earlier config or model; " \
           "redone on resume)" in capsys.readouterr().out


def test_a_full_disk_is_a_one_line_error_and_leaves_no_export(tmp_path, capsys, monkeypatch):
    import errno

    from pipeline.results import export

    out, _ = make_job_output(tmp_path, lambda gt, i: gt)
    written = []

    def fills_the_disk(path, data):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        real(path, data)

    real = export.write_staged_bytes
    monkeypatch.setattr(export, "write_staged_bytes", fills_the_disk)
    assert main(["export", str(out), "-o", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pseudolabel: error: No space left on device: ") and err.count("\n") == 1
    assert "free space there or make it writable, then run the command again" in err
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export*"))  # no partial export left

    def fails_otherwise(path, data):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(export, "write_staged_bytes", fails_otherwise)
    with pytest.raises(OSError, match="Input/output error"):  # other failures keep their traceback
        main(["export", str(out), "-o", str(tmp_path / "export")])


def test_a_damaged_mask_shard_names_the_resume_that_redoes_it(tmp_path, capsys):
    import tarfile

    from pipeline.data.ledger import Ledger

    out, _ = make_job_output(tmp_path, lambda gt, i: gt)
    tar = out / "masks" / "voc-train-000001.tar"
    whole = tar.read_bytes()
    with tarfile.open(tar) as archive:
        members = archive.getmembers()
    second_sample = next(m.offset for m in members if m.name.startswith("2011_000003"))
    inside_a_file = members[0].offset_data + members[0].size // 2
    cuts = {"in a file": (inside_a_file, "ReadError: unexpected end of data"),
            "at a block boundary, after a whole sample": (second_sample, "it holds 1 masks, the ledger recorded 2"),
            "at a block boundary, inside a sample": (second_sample + 1024, "its sample '2011_000003' has no mask")}
    for where, (size, cause) in cuts.items():
        tar.write_bytes(whole[:size])  # a copy cut short
        for command in (["eval", str(out), "--processes", "2"], ["export", str(out), "-o", str(tmp_path / "export")],
                        ["report", str(out), "-o", str(tmp_path / "report")]):
            assert main([*command, "--no-progress"]) == 2, (where, command)
            assert capsys.readouterr().err == (
                f"pseudolabel: error: cannot read {tar}, written by the job in {out}: {cause}; `pseudolabel resume "
                f"{out}` redoes each shard whose outputs no longer match the ledger's checksums\n"), (where, command)
        assert not (tmp_path / "export").exists()
        ledger = Ledger(out)
        assert not ledger.outputs_intact(ledger.get("voc-train-000001"))  # so resume redoes it


def test_with_images_a_mask_whose_image_left_its_input_shard_is_dropped_and_counted(tmp_path, capsys):
    from pipeline.data.shards import read_shard, tar_bytes

    out, gts = make_job_output(tmp_path, lambda gt, i: gt)
    shard = tmp_path / "shards" / "voc-train-000001.tar"
    kept = [s for s in read_shard(str(shard)) if s["__key__"] != "2011_000003"]  # the shard rewritten since
    shard.write_bytes(tar_bytes(kept))
    dest = tmp_path / "export"
    assert main(["export", str(out), "-o", str(dest), "--with-images", "--no-progress"]) == 0
    assert "(dropped: 1 for image not in its input shard)" in capsys.readouterr().out
    ids = (dest / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    assert ids == ["2011_000000", "2011_000001", "2011_000002"]
    assert sorted(p.stem for p in (dest / "JPEGImages").iterdir()) == ids
    assert sorted(p.stem for p in (dest / "SegmentationClassPseudo").iterdir()) == ids


def test_status_of_a_job_of_many_shards_lists_those_not_done(tmp_path, capsys):
    from pipeline.data.ledger import DONE, FAILED, Ledger, ShardEntry

    out, _ = make_job_output(tmp_path, lambda gt, i: gt, per_shard=1)  # 4 shards done: all listed
    assert main(["status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\nvoc-train-") == 4 and "not listed" not in printed
    ledger = Ledger(out)
    digest = ledger.job()["config_hash"]
    for index in range(4, 30):  # a job of 30 shards, one failed
        ledger.put(ShardEntry(shard=f"voc-train-{index:06d}", url="x", config_hash=digest, model="fake",
                              state=FAILED if index == 17 else DONE, samples=0 if index == 17 else 10,
                              error="RuntimeError: CUDA error" if index == 17 else None))
    assert main(["status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert [line.split()[0] for line in printed.splitlines() if line.startswith("voc-train-")] == ["voc-train-000017"]
    assert "(29 done shards not listed: --all lists them)\n254 images in the done shards, 0 of them failed\n" in printed
    assert "29 done, 1 failed, 0 interrupted, 0 in progress; no job is running here" in printed
    assert main(["status", str(out), "--all"]) == 0
    assert capsys.readouterr().out.count("\nvoc-train-") == 30


def test_status_reads_the_ledger_without_importing_torch_or_ray(tmp_path):
    """`status` is run often (`watch pseudolabel status out/`): telling which of a job's input
    shards exist once imported WebDataset, and with it torch, for 2-3 s of start."""
    import subprocess
    import sys

    out, _ = make_job_output(tmp_path, lambda gt, i: gt, per_shard=1)
    code = (f"import sys; from pipeline.cli import main; main(['status', {str(out)!r}]); "
            "print(sorted(m for m in ('torch', 'ray', 'webdataset', 'diffusers') if m in sys.modules))")
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "4 done, 0 failed" in printed
    assert printed.splitlines()[-1] == "[]"


def test_a_damaged_mask_shard_holding_no_example_stops_the_report_too(tmp_path, capsys):
    from pipeline.data.outputs import JobOutput
    from pipeline.results.report import pick_examples

    out, _ = make_job_output(tmp_path, lambda gt, i: gt, per_shard=1)
    rows = JobOutput(out).stats().to_pylist()
    shown = {r["shard"] for group in pick_examples(rows, 4).values() for r in group}
    (unshown,) = {r["shard"] for r in rows} - shown  # only the evaluation reads it
    tar = out / "masks" / f"{unshown}.tar"
    tar.write_bytes(tar.read_bytes()[:700])
    assert main(["report", str(out), "-o", str(tmp_path / "report"), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith(f"pseudolabel: error: cannot read {tar}, written by the job in {out}: ")


def test_a_damaged_statistics_file_or_job_record_is_one_line_and_a_damaged_ledger_entry_is_redone(tmp_path, capsys):
    from pipeline.data.ledger import Ledger

    out, _ = make_job_output(tmp_path, lambda gt, i: gt)
    stats = out / "stats" / "voc-train-000001.parquet"
    whole = stats.read_bytes()
    stats.write_bytes(whole[:300])  # a copy cut short
    for command in (["status", str(out)], ["eval", str(out), "--no-progress"],
                    ["export", str(out), "-o", str(tmp_path / "export"), "--no-progress"],
                    ["report", str(out), "-o", str(tmp_path / "report"), "--no-progress"]):
        assert main(command) == 2, command
        assert capsys.readouterr().err == (
            f"pseudolabel: error: cannot read {stats}, written by the job in {out}: Parquet magic bytes not found in "
            f"footer; `pseudolabel resume {out}` redoes each shard whose outputs no longer match the ledger's "
            "checksums\n"), command
    ledger = Ledger(out)
    assert ledger.plan(["voc-train-000000", "voc-train-000001"], ledger.job()["config_hash"], False)["run"] == [
        "voc-train-000001"]
    stats.write_bytes(whole)

    entry = out / "ledger" / "voc-train-000001.json"
    entry.write_text(entry.read_text()[:40])  # an entry damaged: its shard counts as not run, and is redone
    assert ledger.get("voc-train-000001") is None and [e.shard for e in ledger.entries()] == ["voc-train-000000"]
    assert ledger.plan(["voc-train-000000", "voc-train-000001"], ledger.job()["config_hash"], False)["run"] == [
        "voc-train-000001"]

    (out / "job.json").write_text('{"config": {"classes"')
    for command in (["status", str(out)], ["eval", str(out)], ["resume", str(out)]):
        assert main(command) == 2, command
        assert capsys.readouterr().err == (
            f"pseudolabel: error: cannot read {out}/job.json: Expecting ':' delimiter: line 1 column 22 (char 21); "
            f"delete it and run the job's command again (pseudolabel run --input SHARDS -o {out}, its config and "
            "model): the shards its ledger records as done under them stay done\n"), command


def test_a_folder_that_is_no_job_says_what_it_is(tmp_path, capsys):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    (tmp_path / "photos").mkdir()
    (tmp_path / "labels.csv").write_text("image,labels\n")
    (tmp_path / "job" / "masks").mkdir(parents=True)  # a folder inside a job's folder
    (tmp_path / "job" / "job.json").write_text("{}")
    needs_job = ": pass the -o/--output folder of a pseudolabel run"
    for folder, command, said in (
            ("job/masks", "eval", f"job/masks is the masks/ folder inside the job {tmp_path / 'job'} (the folder "
                                  "to pass)"),
            ("nope", "status", "nope does not exist"),
            ("labels.csv", "resume", "labels.csv is a file, not a job's folder"),
            ("photos", "status", "photos holds no job's outputs (no job.json)"),
            ("shards", "eval", "shards holds image shards (manifest.json), not a job's outputs"),
            ("photos", "report", "photos holds no job's outputs (no masks/)")):
        path = tmp_path / folder
        assert main([command, str(path)] + (["-o", str(tmp_path / "r")] if command == "report" else [])) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"pseudolabel: error: {tmp_path}/{said}{needs_job}") and err.count("\n") == 1, err


@pytest.mark.parametrize("split, problem", [("../../../evil", "it holds a path separator"), ("", "it is empty"),
                                            (".hidden", "it starts with a dot")])
def test_a_split_that_is_not_a_plain_name_is_refused_before_anything_is_written(tmp_path, capsys, split, problem):
    # '../../../evil' wrote evil.txt beside the export, outside it
    out, _ = make_job_output(tmp_path, lambda gt, i: gt)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["export", str(out), "-o", str(tmp_path / "export"), "--split", split]) == 2
    assert capsys.readouterr().err == (f"pseudolabel: error: --split {split!r}: {problem}; the split names the file "
                                       "ImageSets/Segmentation/<split>.txt, so give a plain name such as train_aug\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
