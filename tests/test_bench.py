"""The benchmark command prints its figures and the tracked last line (no speed is asserted)."""

import re

from conftest import FAST_CONFIG
from pipeline.job.allocator import KEEP_FREED_MEMORY, as_shell
from pipeline.results.bench import BenchResult, allocator_line, benchmark_images
from pipeline.cli import main


def test_bench_prints_figures_and_the_tracked_last_line(capsys, monkeypatch, mallopt_calls):
    monkeypatch.setattr("pipeline.job.allocator.startup_malloc_settings", dict)  # started without MALLOC_*
    assert main(["bench", "--model", "tiny", "--config", FAST_CONFIG, "--device", "cpu", "--num-images", "2",
                 "--batch-sizes", "1,2", "--no-pipeline", "--no-compile"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"segmenter/bare=\d+\.\d\d pipeline/bare=n/a", lines[-1])
    report = "\n".join(lines)
    assert "2 images (500x375 / 375x500; up to 100 distinct label sets, cycled)" in report
    assert re.search(r"bare model +\d+\.\d+ images/s .*batch 1: \d+\.\d+, batch 2: \d+\.\d+", report)
    assert re.search(r"segmenter stages, seconds per image \(one more batch, synchronised per stage\): text [\d.]+, vae [\d.]+, unet [\d.]+, refine [\d.]+", report)
    assert re.search(r"prompts +\d+ label sets encoded before the timed pass, [\d.]+ ms each", report)
    assert re.search(r"segmenter +\d+\.\d+ images/s \(full method in-process, UNet stopped after the last layer read\)",
                     report)
    assert re.search(r"segmenter +\d+\.\d+ images/s \(the same, whole UNet: early_exit false\)", report)
    assert "peak host RSS" in report
    # on the CPU the bench keeps freed memory in its own process, as a job's CPU workers do
    assert sorted(mallopt_calls) == [(-8, 1), (-4, 0), (-1, -1)]
    assert f"allocator     keep-freed here and in the pipeline's workers ({as_shell(KEEP_FREED_MEMORY)})" in report
    assert allocator_line("unchanged").startswith("allocator     glibc's defaults here and in the pipeline's workers")


def test_ratio_line_format_and_images():
    result = BenchResult(bare_images_per_s=2.0, segmenter_images_per_s=1.8, pipeline_images_per_s=1.7)
    assert result.ratio_line == "segmenter/bare=0.90 pipeline/bare=0.85"
    images = benchmark_images(3)
    assert [img.shape for img, _ in images] == [(500, 375, 3), (375, 500, 3), (375, 500, 3)]
    assert [len(labels) for _, labels in images] == [1, 2, 3]


def test_benchmark_shards_stream_the_same_images(tmp_path):
    from pipeline.results.bench import write_benchmark_shards
    from pipeline.data.shards import read_shard

    pattern = write_benchmark_shards(tmp_path / "shards", 5, 2)
    tars = sorted((tmp_path / "shards").glob("bench-*.tar"))
    assert pattern.endswith("bench-*.tar") and [len(list(read_shard(str(t)))) for t in tars] == [2, 2, 1]
    first = next(iter(read_shard(str(tars[0]))))
    assert first["__key__"] == "bench_000000"
    assert benchmark_images(1)[0][0].shape == (500, 375, 3)


def test_bench_rejects_bad_pipeline_sizes(capsys):
    assert main(["bench", "--model", "tiny", "--device", "cpu", "--pipeline-num-images", "0"]) == 2
    assert "--pipeline-num-images must be at least 1" in capsys.readouterr().err


def test_benchmark_label_sets_cycle():
    images = benchmark_images(12, label_sets=5)
    labels = [tuple(lab) for _, lab in images]
    assert len(set(labels)) <= 5 and len(set(labels)) >= 3
    assert all(labels[i] == labels[i + 5] for i in range(7))
    assert not all(images[i][0].shape == images[i + 5][0].shape and (images[i][0] == images[i + 5][0]).all()
                   for i in range(7))  # images themselves are not repeated
    assert all(1 <= len(lab) <= 3 and list(lab) == sorted(lab) for lab in labels)


def test_bench_rejects_bad_label_sets(capsys):
    assert main(["bench", "--model", "tiny", "--device", "cpu", "--label-sets", "0"]) == 2
    assert "--label-sets must be at least 1" in capsys.readouterr().err


def test_ratio_over_rounds_is_the_median_of_each_rounds_ratio():
    # A machine twice as fast in round 2 and four times in round 3: the ratio of the medians
    # (1.6 / 2.0) mixes rounds, the median of the rounds' ratios does not.
    result = BenchResult(bare_images_per_s=2.0, segmenter_images_per_s=1.6,
                         rounds={"bare": [1.0, 2.0, 4.0], "segmenter": [1.1, 1.6, 4.4]})
    assert result.ratio_line == "segmenter/bare=1.10 pipeline/bare=n/a"
    assert BenchResult(bare_images_per_s=2.0, segmenter_images_per_s=1.6).over_bare("segmenter") == 0.8


def test_bench_rounds_print_each_round_and_medians(capsys):
    assert main(["bench", "--model", "tiny", "--config", FAST_CONFIG, "--device", "cpu", "--num-images", "2",
                 "--batch-sizes", "2", "--no-pipeline", "--no-compile", "--rounds", "2"]) == 0
    report = capsys.readouterr().out
    assert re.search(r"^rounds +2: ", report, re.M)
    rounds = {m.group(1): m.group(2) for m in re.finditer(r"^  (bare|segmenter|whole UNet) +([\d. ]+) images/s by round",
                                                          report, re.M)}
    assert sorted(rounds) == ["bare", "segmenter", "whole UNet"]
    assert all(len(rates.split()) == 2 for rates in rounds.values())
    seg = sorted(float(r) for r in rounds["segmenter"].split())
    median = float(re.search(r"segmenter +([\d.]+) images/s \(full method", report).group(1))
    assert abs(median - sum(seg) / 2) <= 0.0011  # the median of two rounds (printed rounded)
    assert main(["bench", "--model", "tiny", "--device", "cpu", "--rounds", "0"]) == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err


def test_the_benchmarks_pipeline_runs_on_a_private_ray(monkeypatch, tmp_path):
    """With a cluster `ray start` left on this machine, the pipeline figure joined it (`auto`):
    it timed other machines, which could not read the benchmark's shards in a temporary folder."""
    from pipeline.config import load_config
    from pipeline.job import runner
    from pipeline.results.bench import pipeline_path

    given = []
    monkeypatch.setattr(runner, "run_job", lambda *args, **options: given.append(options["address"]))
    pipeline_path("tiny", load_config(FAST_CONFIG), str(tmp_path / "*.tar"), tmp_path / "out", None, crf=False)
    assert given == ["local"]
