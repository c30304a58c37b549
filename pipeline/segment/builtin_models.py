"""The built-in models: Stable Diffusion 2.1-base architectures with random weights, for
tests and benchmarks on machines with no model hub.

- `tiny`: the SD 2.1-base family (per-block heads 5/10/20/20, linear projections,
  cross-attention to a CLIP text encoder) at toy width, random weights from a fixed seed.
  It is built once, saved with `save_pretrained` into the cache folder and then loaded
  through the same folder path as any local model.
- `sd21-random`: the full-size SD 2.1-base architecture with random weights, built in
  memory; it costs exactly what the real model costs (for throughput benchmarks).
Both use the real CLIP BPE tokenizer, derived from the vocabulary file that the
`open_clip_torch` wheel ships.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

import torch

from pipeline.config import SD21_RANDOM_MODEL, TINY_MODEL
from pipeline.errors import ModelLoadError

_TINY_VERSION = "v1"
_SEED = 0


def cache_dir() -> Path:
    """Where built-in models are saved: $PSEUDOLABEL_CACHE, else ~/.cache/pseudolabel."""
    root = os.environ.get("PSEUDOLABEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pseudolabel"
    )
    return Path(root)


# --- the CLIP tokenizer from open_clip's BPE file -------------------------------------------

def _byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _open_clip_bpe_path() -> Path:
    """The BPE merges file inside the installed open_clip package, found without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the CLIP vocabulary comes from the open_clip_torch wheel, which is not installed: "
            "run `pip install --no-deps open_clip_torch==3.3.0`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall open_clip_torch (`pip install --no-deps open_clip_torch`)")
    return path


def write_clip_tokenizer_files(dest: Path) -> tuple[Path, Path]:
    """Derive the standard CLIP `vocab.json` and `merges.txt` (49,408 tokens) into dest."""
    lines = gzip.open(_open_clip_bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(_byte_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    dest.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = dest / "vocab.json", dest / "merges.txt"
    vocab_path.write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def build_clip_tokenizer(workdir: Path):
    """The SD 2.x CLIP tokenizer (pad token "!", 77 tokens), written as a tokenizer folder from
    the derived files and loaded back with `CLIPTokenizer.from_pretrained`."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(workdir)
    settings = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "!",
        "do_lower_case": True,
    }
    (workdir / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return CLIPTokenizer.from_pretrained(str(workdir))


# --- built-in architectures -------------------------------------------------------------------

def _unet_config(width: int, cross_dim: int, groups: int) -> dict:
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=[width, 2 * width, 4 * width, 4 * width],
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        attention_head_dim=[5, 10, 20, 20],
        cross_attention_dim=cross_dim,
        use_linear_projection=True,
        norm_num_groups=groups,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def _vae_config(channels: list[int], layers: int, groups: int) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=512,
        scaling_factor=0.18215,
    )


def _text_config(hidden: int, layers: int, heads: int, intermediate: int) -> dict:
    return dict(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=512,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )


_ARCHITECTURES = {
    TINY_MODEL: dict(
        unet=_unet_config(width=40, cross_dim=64, groups=8),
        vae=_vae_config([16, 32, 32, 32], layers=1, groups=8),
        text=_text_config(hidden=64, layers=2, heads=4, intermediate=128),
    ),
    SD21_RANDOM_MODEL: dict(
        unet=_unet_config(width=320, cross_dim=1024, groups=32),
        vae=_vae_config([128, 256, 512, 512], layers=2, groups=32),
        text=_text_config(hidden=1024, layers=23, heads=16, intermediate=4096),
    ),
}


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def build_random_components(spec: str, workdir: Path) -> dict:
    """Random-weight components of a built-in spec, from a fixed seed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = _ARCHITECTURES[spec]
    torch.manual_seed(_SEED)
    return dict(
        tokenizer=build_clip_tokenizer(workdir / "bpe"),
        text_encoder=CLIPTextModel(CLIPTextConfig(**arch["text"])),
        vae=AutoencoderKL(**arch["vae"]),
        unet=UNet2DConditionModel(**arch["unet"]),
        scheduler=_scheduler(),
    )


def save_diffusers_folder(components: dict, dest: Path) -> None:
    """Save components in the diffusers pipeline layout (model_index.json + one folder each)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    dest.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0"}
    libraries = {
        "tokenizer": "transformers",
        "text_encoder": "transformers",
        "vae": "diffusers",
        "unet": "diffusers",
        "scheduler": "diffusers",
    }
    for name, component in components.items():
        component.save_pretrained(dest / name)
        index[name] = [libraries[name], type(component).__name__]
    (dest / "model_index.json").write_text(json.dumps(index, indent=2))


def tiny_model_path() -> Path:
    """The tiny model's folder, built and saved on first use."""
    dest = cache_dir() / f"tiny-{_TINY_VERSION}"
    if (dest / "model_index.json").is_file():
        return dest
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    save_diffusers_folder(build_random_components(TINY_MODEL, tmp), tmp)
    try:
        tmp.rename(dest)
    except OSError:  # another process finished first
        if not (dest / "model_index.json").is_file():
            raise
    return dest


@lru_cache(maxsize=1)
def clip_tokenizer():
    """The CLIP tokenizer alone (for prompts and tests), built in the cache folder."""
    return build_clip_tokenizer(cache_dir() / "bpe")
