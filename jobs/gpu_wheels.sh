#!/usr/bin/env bash
# Fill WHEELS (default .whl, git-ignored) with what `jobs/gpu_bench.sh install` puts on an offline
# GPU machine whose python3 (CPython 3.12, x86-64) already has torch, transformers, accelerate,
# huggingface-hub, pyarrow, numpy, pillow, aiohttp, grpcio, pytest and the rest of a PyTorch
# image: the project's dependencies such an image lacks, at the versions the project is tested
# with here. Run it on a machine that reaches the package registry, before asking for a GPU:
# it costs no device time.
#
# Ray's wheel (79 MB) travels as a .tar.xz of the unpacked wheel without its Java jars (28 MB),
# so that the folder fits the device tool's 64 MiB beside the repository; pydensecrf2 has no
# wheel and travels as its sdist (`install` builds it there, in the background).
#
# Usage: bash jobs/gpu_wheels.sh           (WHEELS=dir to put them elsewhere)
set -euo pipefail
WHEELS=${WHEELS:-.whl}
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
PACKAGES=(
    diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0
    ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
    webdataset==1.0.2 braceexpand==0.1.7
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    pycocotools==2.0.11
    open_clip_torch==3.3.0  # installed without its dependencies: only for the CLIP vocabulary file of the built-in models
)
mkdir -p "$WHEELS"
python3 -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$WHEELS" "${PACKAGES[@]}"
python3 -m pip download -q --no-deps --no-binary=:all: -d "$WHEELS" pydensecrf2==1.1
ray_wheel=$(ls "$WHEELS"/ray-*.whl)
unpacked=$(mktemp -d)
unzip -q "$ray_wheel" -d "$unpacked"  # unzip keeps the exec bits of raylet and gcs_server
rm -rf "$unpacked/ray/jars"
tar -C "$unpacked" -cf - . | xz -9 -T0 > "${ray_wheel%.whl}.tar.xz"
rm -rf "$unpacked" "$ray_wheel"
du -sh "$WHEELS"
