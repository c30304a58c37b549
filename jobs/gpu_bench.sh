#!/usr/bin/env bash
# GPU figures for docs/performance.md, on an offline GPU machine whose python3 already has torch.
#
# Usage: WHEELS=.whl RESULTS=results bash jobs/gpu_bench.sh STEP...
#   `bash jobs/gpu_wheels.sh` fills .whl beforehand, where the package registry is reachable (40 MB).
#   Through the device tool: carry [".whl"], command
#   `RESULTS=$OUT bash jobs/gpu_bench.sh install cudatests fused bench layout`, then `CRF=off`, `COMPILE=true ... trainaug`.
#   install   put the wheels of WHEELS into SITE (ray may come as a .tar.xz of its unpacked wheel,
#             pydensecrf2 as its sdist, built here); skipped when SITE already has them
#   cudatests the tests of the CUDA-only paths (tests/test_cuda.py: pinned copies, a batch queued
#             with no host-device sync, GPU against CPU results, a job on a GPU worker); WHEELS
#             needs pytest and its dependencies (pluggy, iniconfig, packaging, pygments)
#   profile   stage times and top CUDA operators of one segmenter batch of BATCH (default 32)
#   bench     pseudolabel bench on sd21-random: batch sizes 1-32, the segmenter with and without early
#             exit and compile (3 rounds in turn, medians), pipeline CRF off and on (CRF=off|on|both)
#   fused     the same in-process figures at batch 32 with attention_kernel: fused (the official
#             kernel's GPU cost is the difference)
#   trainaug  a VOC train_aug-sized job: 10,582 synthetic VOC-sized images in shards of 256, CRF off,
#             configs/voc.yaml with batch_size 16 (COMPILE=true: with compile on)
#   layout    the VAE encoder and the UNet at BATCH (default 16) in NCHW, with NHWC activations (what
#             a batch of 2+ runs today) and all NHWC (jobs/measure_layout.py): is channels-last worth a
#             switch on a GPU?
#   scaling   the pipeline with 1 and then 2 CPU workers of 4 threads each (tiny model, CPU slots)
#   headroom  how close the segmenter is to host-bound: images/s beside decoding threads, the
#             host's time to queue a batch against when its results arrive, and the calls that
#             made the host wait for the GPU while queueing (jobs/measure_host_headroom.py)
# Each step writes RESULTS/<step>.txt; the figures go to docs/performance.md by hand.
set -uo pipefail
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/pseudolabel-site}
RESULTS=${RESULTS:-gpu-results}
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PSEUDOLABEL_CACHE=${PSEUDOLABEL_CACHE:-/tmp/pseudolabel-cache}
mkdir -p "$RESULTS"
PL="python3 -m pipeline.cli"

install() {
    if [ -f "$SITE/.installed" ]; then return; fi
    mkdir -p "$SITE"
    for archive in "$WHEELS"/ray-*.tar.xz; do [ -f "$archive" ] && tar -xJf "$archive" -C "$SITE"; done
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    local sdist
    sdist=$(ls "$WHEELS"/pydensecrf2-*.tar.gz 2>/dev/null | head -1)
    if [ -n "$sdist" ]; then
        rm -rf /tmp/pydensecrf-build && mkdir -p /tmp/pydensecrf-build && tar -xzf "$sdist" -C /tmp/pydensecrf-build
        # built in the background while the first steps run; `bench` waits for it
        (cd /tmp/pydensecrf-build/pydensecrf2-* && sed -i '/setup_requires/d' setup.py \
            && python3 setup.py -q build_ext --inplace && cp -r pydensecrf "$SITE/") \
            > "$RESULTS/pydensecrf-build.txt" 2>&1 &
    fi
    touch "$SITE/.installed"
    python3 -c "import torch, ray, diffusers, transformers, webdataset, pydantic, pyarrow; \
print('torch', torch.__version__, torch.cuda.get_device_name(0), '| ray', ray.__version__, '| diffusers', \
diffusers.__version__, '| transformers', transformers.__version__)"
}

cudatests() {
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$RESULTS/cudatests.txt"
}

profile() {
    python3 jobs/profile_segmenter.py --model sd21-random --device cuda --batch "${BATCH:-32}" --rows 30 2>&1 | tee "$RESULTS/profile.txt"
}

bench() {
    wait  # for the CRF build
    python3 -c "import pydensecrf.densecrf" || echo "pydensecrf did not build: see pydensecrf-build.txt"
    $PL bench --model sd21-random --device cuda --num-images 128 --batch-sizes 1,4,8,16,32 --rounds 3 \
        --pipeline-num-images 1024 --shard-size 128 --pipeline-crf "${CRF:-both}" 2>&1 | tee "$RESULTS/bench.txt"
}

fused() {
    printf 'attention_kernel: fused\n' > /tmp/pseudolabel-fused.yaml
    $PL bench --config /tmp/pseudolabel-fused.yaml --model sd21-random --device cuda --num-images 128 \
        --batch-sizes 32 --rounds 3 --no-pipeline 2>&1 | tee "$RESULTS/fused.txt"
}

trainaug() {
    local work=/tmp/pseudolabel-trainaug
    rm -rf "$work"
    python3 -c "from pathlib import Path; from pipeline.results.bench import write_benchmark_shards; \
write_benchmark_shards(Path('$work/shards'), 10582, 256)"
    local start end
    start=$(date +%s.%N)
    sed "s/^batch_size: .*/batch_size: 16/; s/^compile: .*/compile: ${COMPILE:-false}/" configs/voc.yaml \
        > "$work/voc-batch16.yaml"
    $PL run --config "$work/voc-batch16.yaml" --input "$work/shards/bench-*.tar" --output "$work/job" \
        --model sd21-random --no-progress 2>&1 \
        | tee "$RESULTS/trainaug.txt"
    end=$(date +%s.%N)
    $PL status "$work/job" 2>&1 | tee -a "$RESULTS/trainaug.txt"
    echo "train_aug-sized job: $(python3 -c "print(f'{$end - $start:.1f}')") s wall, Ray start and model load included" \
        | tee -a "$RESULTS/trainaug.txt"
}

layout() {
    python3 jobs/measure_layout.py --model sd21-random --device cuda --batch "${BATCH:-16}" --rounds 5 2>&1 \
        | tee "$RESULTS/layout.txt"
}

scaling() {
    python3 jobs/measure_scaling.py --model tiny --config tests/fast.yaml --device cpu --num-images 96 \
        --per-shard 8 --workers 2 --cpu-threads 4 2>&1 | grep -v WARNING | tee "$RESULTS/scaling.txt"
}

headroom() {
    python3 jobs/measure_host_headroom.py --model sd21-random --device cuda --batch "${BATCH:-32}" 2>&1 \
        | tee "$RESULTS/headroom.txt"
}

nvidia-smi -L 2>/dev/null || true
for step in "$@"; do
    echo "== $step"
    "$step"
done
