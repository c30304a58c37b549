"""The `pseudolabel segment` command as a user runs it."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import make_job_output, needs_crf, synthetic_image
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
                                       "--device", "cpu", "-o", str(out), "--overlay", str(over)],
                         capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"wrote {out} (160x120)" in run.stdout
    mask = Image.open(out)
    assert mask.mode == "P" and mask.size == (160, 120)
    assert set(np.unique(np.array(mask))) <= {0, 8, 18}
    assert Image.open(over).size == (320, 120)


@needs_crf
def test_segment_with_crf(image_file, tmp_path, capsys):
    out = tmp_path / "mask.png"
    assert main(["segment", str(image_file), "--labels", "dining table", "--model", "tiny", "--device", "cpu",
                 "-o", str(out), "--crf"]) == 0
    assert set(np.unique(np.array(Image.open(out)))) <= {0, 11}


def test_segment_lays_a_phone_photo_out_upright(tmp_path, capsys):
    # stored 160 wide and 120 high, tagged to be shown turned 90 degrees clockwise: 120 wide, 160 high
    photo, out, over = tmp_path / "phone.jpg", tmp_path / "mask.png", tmp_path / "overlay.png"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(synthetic_image(120, 160, seed=4)).save(photo, exif=exif)
    assert main(["segment", str(photo), "--labels", "cat", "--model", "tiny", "--device", "cpu", "-o", str(out),
                 "--overlay", str(over)]) == 0
    assert f"wrote {out} (120x160, upright by its EXIF orientation 6)" in capsys.readouterr().out
    assert Image.open(out).size == (120, 160) and Image.open(over).size == (240, 160)


def test_segment_takes_classes_of_your_own(image_file, tmp_path, capsys):
    # -o a folder: the mask is <image name>.png in it
    out = tmp_path / "masks" / f"{image_file.stem}.png"
    (tmp_path / "masks").mkdir()
    assert main(["segment", str(image_file), "--classes", "red car, street lamp,sky", "--labels", "Street_Lamp,sky",
                 "--model", "tiny", "--device", "cpu", "-o", str(tmp_path / "masks")]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (160x120): background " in printed and "red car" not in printed
    assert set(np.unique(np.array(Image.open(out)))) <= {0, 2, 3} and "street lamp" in printed
    for argv, message in ((["--classes", "sky", "--overlay", str(tmp_path / "masks")],
                           f"-o and --overlay both name {out}: the overlay would replace the mask"),
                          (["--classes", "lamp,Lamp"], "--classes: class names must be unique"),
                          (["--classes", "background,lamp"], "--classes: classes lists 'background'"),
                          (["--classes", ","], "--classes: at least one class is needed"),
                          ([], "--labels is needed: the classes present in the image"),
                          (["--labels", "lamp"], "unknown class name 'lamp': use one of aeroplane, bicycle, bird, "
                                                 "boat, bottle, bus, car, cat, chair, cow, diningtable, dog, horse, "
                                                 "motorbike, person, pottedplant, sheep, sofa, train, tvmonitor (or "
                                                 "name classes of your own with --classes)")):
        assert main(["segment", str(image_file), *argv, "--model", "tiny", "-o", str(tmp_path / "masks")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"pseudolabel: error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize("labels, message", [
    ("cat,giraffe", "unknown class name 'giraffe' (a class of --config coco): use one of aeroplane, bicycle"),
    (" , ", "--labels ' , ' names no class: give at least one"),
    ("Background", "--labels 'Background' names no class: give at least one, e.g. --labels cat,sofa (the background "
                   "is in every mask)"),
])
def test_bad_labels_are_one_line_errors(image_file, tmp_path, capsys, labels, message):
    code = main(["segment", str(image_file), "--labels", labels, "--model", "tiny", "-o", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "m.png").exists()


def test_unreadable_and_missing_images_are_one_line_errors(tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    phone = tmp_path / "IMG_0001.HEIC"  # the start of an iPhone photo: an ISO-BMFF box of brand heic
    phone.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_bytes(b"shopping list: milk")
    for path, message in ((broken, f"cannot decode {broken}"), (tmp_path / "nope.jpg", "not found"),
                          (phone, "is a HEIF/HEIC image, which Pillow cannot decode without a plug-in: convert it "
                                  "to JPEG or PNG"),
                          (empty, f"cannot decode {empty}: the file is empty (0 bytes); replace or remove the file"),
                          (text, f"cannot decode {text}: not an image format Pillow reads (its first bytes are "
                                 "b'shopping'); replace or remove the file"),
                          (tmp_path, f"image {tmp_path} is a folder: pass one image file (a folder of images is "
                                     "sharded with pseudolabel shard-folder")):
        code = main(["segment", str(path), "--labels", "cat", "--model", "tiny", "-o", str(tmp_path / "m.png")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1 and "BytesIO" not in err


def test_an_output_path_of_the_wrong_kind_is_a_one_line_error(image_file, tmp_path, capsys):
    from conftest import make_job_output, write_voc_shards

    shards = write_voc_shards(tmp_path, "img", [(1, 2)])
    job, _ = make_job_output(tmp_path / "job", lambda gt, i: gt)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    a_folder = tmp_path / "eval.json"
    a_folder.mkdir()
    for argv, message in (
            (["run", "--input", str(shards), "--model", "tiny", "-o", str(a_file)],
             f"File exists: {a_file}: a file stands where a folder is needed: pass another path or move that file"),
            (["shard-voc", "--voc-root", str(tmp_path / "VOC2012"), "--split", "train", "-o", str(a_file / "shards")],
             f"Not a directory: {a_file / 'shards'}: a file stands where a folder of that path is needed"),
            (["eval", str(job), "--processes", "1", "--no-progress", "-o", str(a_file / "scores" / "eval.json")],
             f"Not a directory: {a_file}: a file stands where a folder of that path is needed")):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert err.startswith("pseudolabel: error: ") and message in err and err.count("\n") == 1
        assert "mIoU" not in out  # eval refuses its output before scoring, not after
    assert a_file.read_text() == "keep me"
    # a folder of the scores' path that does not exist yet is made; a folder (or a path ending in /) takes eval.json
    nested = tmp_path / "scores" / "run-1" / "eval.json"
    for output, written in ((nested, nested), (a_folder, a_folder / "eval.json"),
                            (f"{tmp_path / 'evals'}/", tmp_path / "evals" / "eval.json")):
        assert main(["eval", str(job), "--processes", "1", "--no-progress", "-o", str(output)]) == 0
        assert json.loads(written.read_text())["classes"][0] == "background"
        assert capsys.readouterr().out.endswith(f"wrote {written}\n")


def test_bad_config_value_is_a_one_line_error(image_file, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("iterations: -3\n")
    code = main(["segment", str(image_file), "--labels", "cat", "--config", str(config), "-o", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert code == 2 and "key iterations" in err


def test_a_mask_path_that_is_not_a_png_or_an_overlay_that_is_no_picture_is_refused_before_the_model_loads(
        image_file, tmp_path, capsys, monkeypatch):
    import pipeline.segment.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    for extra, message in (
            (["-o", str(tmp_path / "m.jpg")], f"-o {tmp_path / 'm.jpg'}: the mask is written as a PNG of class indices "
                                              "(a JPEG would change them): pass a path ending in .png"),
            (["-o", str(tmp_path / "m.png"), "--overlay", str(tmp_path / "look")],
             f"--overlay {tmp_path / 'look'}: name a picture file (.png, .jpg, ...)")):
        assert main(["segment", str(image_file), "--labels", "cat", "--model", "tiny", *extra]) == 2
        assert capsys.readouterr().err == f"pseudolabel: error: {message}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["photo.jpg"]  # nothing written
    # a mask folder that cannot be made (a file stands there) fails before the model loads too
    blocker = tmp_path / "taken"
    blocker.write_text("")
    assert main(["segment", str(image_file), "--labels", "cat", "--model", "tiny", "-o", str(blocker / "m.png")]) == 2
    assert "a file stands where a folder is needed" in capsys.readouterr().err


def test_an_output_given_as_a_url_is_refused_before_a_local_folder_of_its_name_is_made(tmp_path, monkeypatch,
                                                                                      capsys):
    """`-o s3://bucket/out` made a folder `s3:/bucket/out` here and said it wrote to s3://bucket/out."""
    monkeypatch.chdir(tmp_path)
    for argv, option, url in (
            (["shard-voc", "--voc-root", "VOC2012", "-o", "s3://bucket/shards"], "-o/--output", "s3://bucket/shards"),
            (["run", "--input", "shards/", "-o", "gs://bucket/out"], "-o/--output", "gs://bucket/out"),
            (["export", "out", "-o", "https://host/export"], "-o/--output", "https://host/export"),
            (["segment", "a.jpg", "--labels", "cat", "-o", "m.png", "--overlay", "s3://b/o.png"], "--overlay",
             "s3://b/o.png")):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        last = capsys.readouterr().err.splitlines()[-1]
        assert last.startswith(f"pseudolabel {argv[0]}: error: argument {option}: {url} is a URL, and this command "
                               "writes to this machine's file system")
        assert f"{url.replace('://', ':/')} would be made here instead; pass a local path" in last
    assert list(tmp_path.iterdir()) == []


def test_a_quoted_tilde_is_the_home_folder_in_every_path(image_file, tmp_path, monkeypatch):
    """The shell leaves `~` as it is inside quotes, as a brace pattern must be given
    (`--input '~/shards/voc-{000000..000041}.tar'`): a folder named `~` was made in the working folder."""
    from pipeline.cli import build_parser

    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    parser = build_parser()
    h = str(home)
    for argv, option, expected in (
            (["run", "--input", "~/s/a-{0..1}.tar", "pipe:cat ~/b.tar", "-o", "o"], "input",
             f"{h}/s/a-{{0..1}}.tar::pipe:cat ~/b.tar"),  # a pipe: command's own shell expands its ~
            (["run", "--input", "x.tar", "-o", "~/out"], "output", f"{h}/out"),
            (["run", "--input", "x.tar", "-o", "o", "--model", "~/sd21"], "model", f"{h}/sd21"),
            (["run", "--input", "x.tar", "-o", "o", "--config", "~/my.yaml"], "config", f"{h}/my.yaml"),
            (["resume", "~/out"], "job", f"{h}/out"),
            (["eval", "~/out", "--gt", "~/gt"], "gt", f"{h}/gt"),
            (["compare", "--input", "s/", "--gt", "~/gt"], "gt", f"{h}/gt"),
            (["segment", "~/a.jpg", "--labels", "cat", "-o", "m.png"], "image", f"{h}/a.jpg"),
            (["segment", "a.jpg", "--labels", "cat", "-o", "m.png", "--overlay", "~/o.png"], "overlay", f"{h}/o.png"),
            (["shard-voc", "--voc-root", "~/VOC2012", "-o", "s"], "voc_root", f"{h}/VOC2012"),
            (["shard-voc", "--voc-root", "v", "--labels-file", "~/l.npy", "-o", "s"], "labels_file", f"{h}/l.npy"),
            (["shard-coco", "--coco-root", "~/coco", "--split", "val2017", "-o", "s"], "coco_root", f"{h}/coco"),
            (["shard-coco", "--coco-root", "c", "--split", "x", "--annotations", "~/a.json", "-o", "s"],
             "annotations", f"{h}/a.json"),
            (["shard-coco", "--coco-root", "c", "--split", "x", "--config", "~/c.yaml", "-o", "s"], "config",
             f"{h}/c.yaml"),
            (["shard-folder", "--image-dir", "~/photos", "--labels-file", "l.csv", "--classes", "cat", "-o", "s"],
             "image_dir", f"{h}/photos"),
            (["shard-folder", "--image-dir", "p", "--labels-file", "~/l.csv", "--config", "~/c.yaml", "-o", "s"],
             "labels_file", f"{h}/l.csv"),
            (["shard-folder", "--image-dir", "p", "--labels-file", "l.csv", "--config", "~/c.yaml", "-o", "s"],
             "config", f"{h}/c.yaml")):
        assert getattr(parser.parse_args(argv), option) == expected, argv
    assert parser.parse_args(["run", "--input", "x", "-o", "o", "--model", "org/name"]).model == "org/name"
    assert parser.parse_args(["run", "--input", "x", "-o", "o", "--config", "coco"]).config == "coco"
    # and a whole command: the image from the home folder, the mask into it, nothing made here
    (home / "photos").mkdir(parents=True)
    shutil.copy(image_file, home / "photos" / "cat.jpg")
    assert main(["segment", "~/photos/cat.jpg", "--labels", "cat", "--model", "tiny", "-o", "~/masks/"]) == 0
    assert (home / "masks" / "cat.png").is_file() and list(work.iterdir()) == []


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path):
    out, _ = make_job_output(tmp_path, lambda gt, i: gt)
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `pseudolabel status out/ | head -0` leaves it
    run = subprocess.run(_command() + ["status", str(out)], stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    assert (run.returncode, run.stderr) == (141, "")  # SIGPIPE's status, and no traceback


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "segment" in capsys.readouterr().out


def _subcommands():
    import argparse

    from pipeline.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def _option_kind(action) -> tuple:
    """What an option is: a flag, or a value of a type (and choices)."""
    return (type(action).__name__, getattr(action.type, "__name__", None), tuple(action.choices or ()))


def test_one_cli_vocabulary():
    """Every output is -o/--output, and an option name means one kind of thing in every command."""
    _, commands = _subcommands()
    kinds: dict[str, set] = {}
    for name, command in commands.items():
        options = {s for a in command._actions for s in a.option_strings}
        assert not options & {"--out", "--dest", "--json", "--images", "--limit"}, name
        if "--output" in options:
            output = next(a for a in command._actions if "--output" in a.option_strings)
            assert output.option_strings == ["-o", "--output"], name
        for action in command._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    kinds.setdefault(option, set()).add(_option_kind(action))
    assert {o: k for o, k in kinds.items() if len(k) > 1} == {}
    writers = {"demo", "run", "segment", "shard-voc", "shard-coco", "shard-folder", "export", "eval", "report"}
    assert all("--output" in {s for a in commands[c]._actions for s in a.option_strings} for c in writers)


def test_every_command_has_examples_that_parse():
    import shlex

    parser, commands = _subcommands()
    for name, command in commands.items():
        assert command.epilog and command.epilog.startswith("examples:\n"), name
        for line in command.epilog.splitlines()[1:]:
            words = shlex.split(line)
            assert words[:2] == ["pseudolabel", name], line
            args = parser.parse_args(words[1:])  # an example with a wrong option exits here
            assert args.func is command.get_default("func")


def test_input_takes_several_shards_as_an_unquoted_glob_gives_them(tmp_path, monkeypatch):
    """`--input shards/*.tar` unquoted reaches the command as several files; a repeated --input
    adds to the first. Both are kept as one input, recorded absolute (WebDataset's `::` between)."""
    from pipeline.cli import build_parser
    from pipeline.job.runner import absolute_input

    parser = build_parser()
    args = parser.parse_args(["run", "--input", "a.tar", "b.tar", "-o", "out", "--input", "pipe:cat c.tar"])
    assert args.input == "a.tar::b.tar::pipe:cat c.tar" and args.output == "out"
    monkeypatch.chdir(tmp_path)
    assert absolute_input(args.input) == f"{tmp_path}/a.tar::{tmp_path}/b.tar::pipe:cat c.tar"
    assert parser.parse_args(["resume", "out", "--input", "x/a.tar", "x/b.tar"]).input == "x/a.tar::x/b.tar"
    assert parser.parse_args(["resume", "out"]).input is None
    # --input takes every word after it: a job's folder last is the JOB
    from pipeline.cli.options import job_after_input
    from pipeline.config import ConfigError

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "job.json").write_text("{}")
    args = parser.parse_args(["resume", "--input", "x/a.tar", "x/b.tar", "out"])
    job_after_input(args)
    assert (args.job, args.input) == ("out", "x/a.tar::x/b.tar")
    for argv, message in ((["resume", "--input", "x/a.tar", "x/b.tar"], "JOB is missing: name the job's folder before "
                           "--input, which takes every word after it (pseudolabel resume out/ --input NEW_PATTERN)"),
                          (["resume"], "JOB is missing: the job's folder, e.g. pseudolabel resume out/")):
        with pytest.raises(ConfigError) as error:
            job_after_input(parser.parse_args(argv))
        assert str(error.value) == message
    # the status line (and other messages) shows the first three of many, as an unquoted glob of 42 shards gives
    from pipeline.data.shards import describe_input

    many = parser.parse_args(["run", "-o", "out", "--input"] + [f"s/voc-{i:06d}.tar" for i in range(42)]).input
    assert describe_input(many) == "s/voc-000000.tar::s/voc-000001.tar::s/voc-000002.tar and 39 more"
    assert describe_input(args.input) == args.input


def test_method_option_runs_a_peer_or_an_iseg_ablation_in_place_of_the_configs(tmp_path):
    from pipeline.cli import build_parser
    from pipeline.cli.options import input_config

    (tmp_path / "images-000000.tar").write_bytes(b"")  # another tool's shard: no manifest
    parser = build_parser()
    for method, expected in (("goca", {"method": "goca"}), ("iseg-naive", {"method": "iseg", "ent_self": False}),
                             (None, {"method": "iseg", "ent_self": True, "cat_cross": True})):
        chosen = ["--method", method] if method else []
        args = parser.parse_args(["run", "--input", str(tmp_path), "-o", "out"] + chosen)
        config = input_config(args.config, args.input, args.classes, args.method)
        assert {key: getattr(config, key) for key in expected} == expected
    assert parser.parse_args(["segment", "a.jpg", "--labels", "cat", "-o", "m.png", "--method", "diffseg"]).method == \
        "diffseg"
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--input", "s/", "-o", "out", "--method", "sam"])


def test_segment_given_several_images_names_the_way_to_segment_a_folder(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "photos/a.jpg", "photos/b.jpg", "photos/c.jpg", "--labels", "cat", "-o", "masks/"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(
        "error: unrecognized arguments: photos/b.jpg photos/c.jpg; segment reads one image (a glob the shell expanded "
        "gives several): for a folder of images, shard them with their labels (pseudolabel shard-folder) and run the "
        "job on the shards (pseudolabel run)\n")
    with pytest.raises(SystemExit):  # other commands say it as argparse does
        main(["status", "out/", "extra"])
    assert capsys.readouterr().err.endswith("error: unrecognized arguments: extra\n")


def test_ctrl_c_outside_a_jobs_shard_loop_ends_in_one_line_not_a_traceback(monkeypatch, capsys):
    """Ctrl-C while a job waited for its workers (or during sharding, eval, export) printed
    Python's KeyboardInterrupt traceback."""
    from pipeline.cli import job

    def waiting(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "run_status", waiting)
    assert main(["status", "out/"]) == 130
    assert capsys.readouterr().err == "pseudolabel: status interrupted\n"


def test_help_loads_neither_torch_nor_ray():
    code = ("import sys; from pipeline.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'ray', 'numpy', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_demo_runs_on_a_private_ray_whatever_cluster_runs_here(tmp_path, monkeypatch):
    """A cluster `ray start` left on this machine was joined by the demo (`auto`), whose shards
    are in a folder of this machine only, and RAY_ADDRESS left set to a dashboard for `ray job
    submit` refused it, naming an --address the demo does not take."""
    from pipeline.job import runner

    class Started(Exception):
        """Where the demo's job starts: this test stops it there."""

    def run_job(*args, **options):
        raise Started(options.get("address"))

    monkeypatch.setattr(runner, "run_job", run_job)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(Started) as started:
        main(["demo", "--model", "tiny", "-o", str(tmp_path / "demo"), "--no-progress"])
    assert started.value.args == ("local",)


def test_resume_given_a_run_option_says_what_resume_redoes_and_with_what(capsys):
    """`resume --retry-failed` (run's flag) was refused with argparse's bare line."""
    with pytest.raises(SystemExit) as exit_info:
        main(["resume", "out/", "--retry-failed"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(
        "error: unrecognized arguments: --retry-failed; resume redoes the job's failed and interrupted shards with the "
        "config and model it recorded (for others: pseudolabel run with --force)\n")
