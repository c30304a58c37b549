"""Loading Stable Diffusion components: a hub id, a local diffusers folder, or a built-in
spec (`tiny`, `sd21-random`: pipeline/segment/builtin_models.py), onto one device and dtype."""

from __future__ import annotations

import os
import platform
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import DEFAULT_MODEL
from pipeline.errors import DeviceError, ModelLoadError
from pipeline.segment.builtin_models import (SD21_RANDOM_MODEL, TINY_MODEL, build_random_components, cache_dir,
                                             tiny_model_path)


@dataclass
class ModelBundle:
    """The components the segmenter runs, on one device and dtype."""

    name: str
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object
    device: torch.device
    dtype: torch.dtype

    @property
    def heads_per_block(self) -> list[int]:
        """Attention heads of each down block's transformers (SD 2.1-base: [5, 10, 20, 20])."""
        heads = self.unet.config.num_attention_heads or self.unet.config.attention_head_dim
        if isinstance(heads, int):
            heads = [heads] * len(self.unet.config.block_out_channels)
        return list(heads)

    @property
    def notes(self) -> tuple[str, ...]:
        """How this model differs from SD 2.1-base (512 px, epsilon prediction), for whose
        attention the methods' constants and published numbers hold: one line each, or none."""
        size = self.unet.config.sample_size * 8
        prediction = self.scheduler.config.get("prediction_type", "epsilon")
        if size == 512 and prediction == "epsilon":
            return ()
        predicts = {"epsilon": "the noise", "v_prediction": "v"}.get(prediction, prediction)
        return (f"this model works at {size} px and predicts {predicts} (SD 2.1-base: 512 px, the noise; "
                "stabilityai/stable-diffusion-2-1 is the 768 px v-prediction one): the methods' constants and "
                "published numbers are 2.1-base's, so pass that model for them",)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device a model runs on: `device`, else CUDA when available. A DeviceError naming
    it and the fix when it is no device, or a CUDA device this process cannot use."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"device {str(device)!r} is not a torch device: pass cpu, cuda or cuda:N") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {str(device)!r}: the segmenter runs on cpu or cuda (cuda:N), not on "
                          f"{resolved.type}: pass --device cpu")
    if resolved.type == "cuda":
        if torch.version.cuda is None:
            raise DeviceError(f"device {str(device)!r}: this torch ({torch.__version__}) is a CPU build: install "
                              "torch's CUDA build before the project (README, install notes), or pass --device cpu")
        count = torch.cuda.device_count()
        if count == 0:
            raise DeviceError(f"device {str(device)!r}: no CUDA GPU is visible (check nvidia-smi and "
                              "CUDA_VISIBLE_DEVICES), or pass --device cpu")
        if resolved.index is not None and resolved.index >= count:
            raise DeviceError(f"device {str(device)!r}: {count} CUDA GPU(s) visible, cuda:0 to cuda:{count - 1}")
    return resolved


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def weights_variant(component: Path) -> str | None:
    """None where a component folder (unet/, vae/, text_encoder/) holds plain weight files;
    "fp16" where it holds only fp16-variant ones (`diffusion_pytorch_model.fp16.safetensors`,
    as a download of a hub repository's fp16 files alone leaves it)."""
    weights = [p.name for p in component.glob("*") if p.name.endswith((".safetensors", ".bin", ".index.json"))]
    if weights and all(".fp16." in name for name in weights):
        return "fp16"
    return None


def _load_components(folder: Path, dtype: torch.dtype) -> dict:
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    source, kwargs = str(folder), {"local_files_only": True}
    variant = {part: weights_variant(folder / part) for part in ("text_encoder", "vae", "unet")}
    return dict(
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs),
        text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype,
                                                   variant=variant["text_encoder"], **kwargs),
        vae=AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, variant=variant["vae"], **kwargs),
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype,
                                                  variant=variant["unet"], **kwargs),
        scheduler=DDIMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs),
    )


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and not os.path.isabs(spec)


# The files a segmenter needs from a Stable Diffusion repository (no checkpoints, no variants).
_HUB_FILES = [
    "model_index.json", "scheduler/*.json", "tokenizer/*",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
]


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the hub endpoint's host name resolves and accepts a connection."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_model_available(spec: str) -> None:
    """Raise ModelLoadError now if `spec` could not be loaded (missing folder, or a hub id that
    is neither cached nor reachable), without loading or downloading anything."""
    if spec in (TINY_MODEL, SD21_RANDOM_MODEL):
        return
    if _names_local_path(spec):
        resolve_model(spec)
    elif _cached_hub_folder(spec) is None:
        _require_hub(spec)


def _names_local_path(spec: str) -> bool:
    """Whether a model spec (not a built-in name) is a path here: one that exists, or any spec
    that is no hub id (`org/name`)."""
    return Path(spec).expanduser().exists() or not _looks_like_hub_id(spec)


def _cached_hub_folder(repo_id: str) -> Path | None:
    """The repository's snapshot in the local Hugging Face cache, or None."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=True))
    except Exception:  # not cached: any hub error means "not here"
        return None


def _require_hub(repo_id: str) -> None:
    """Raise ModelLoadError unless the hub can be reached to download repo_id."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or not _hub_reachable():
        raise ModelLoadError(
            f"model {repo_id!r} is not in the local cache and the hub ({constants.ENDPOINT}) cannot be reached: "
            "pass a local diffusers folder with --model /path/to/stable-diffusion-2-1-base, "
            "or --model tiny for the offline demo"
        )


def _hub_folder(repo_id: str) -> Path:
    """A hub repository's local snapshot: from the cache, else downloaded once."""
    from huggingface_hub import snapshot_download

    cached = _cached_hub_folder(repo_id)
    if cached is not None:
        return cached
    _require_hub(repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as exc:
        raise ModelLoadError(f"cannot download model {repo_id!r} from the hub: {exc}") from exc


def absolute_model(spec: str) -> str:
    """spec with a local folder made absolute (`~` expanded), so that a job's workers, which
    run in other folders and on other nodes, and a resume from another folder load the same
    folder; built-in names and hub ids (`org/name` with no such folder here) unchanged."""
    if spec in (TINY_MODEL, SD21_RANDOM_MODEL) or not _names_local_path(spec):
        return spec
    return os.path.abspath(os.path.expanduser(spec))


def resolve_model(spec: str) -> Path:
    """The local diffusers folder of a model spec (`tiny`, a folder, or a hub id)."""
    if spec == TINY_MODEL:
        return tiny_model_path()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "unet").is_dir():
            raise ModelLoadError(
                f"model folder {path} is not a diffusers Stable Diffusion folder (no unet/ inside): "
                "pass the folder that holds model_index.json"
            )
        return path
    if path.is_file() and path.suffix in (".safetensors", ".ckpt"):
        raise ModelLoadError(
            f"model {spec!r} is a single-file checkpoint: convert it to a diffusers folder once, e.g. "
            "python -c \"from diffusers import StableDiffusionPipeline as P; "
            f"P.from_single_file('{path}').save_pretrained('sd21-folder')\", then pass --model sd21-folder"
        )
    if _looks_like_hub_id(spec):
        return _hub_folder(spec)
    if path.is_absolute() or spec.startswith((".", "~")) or "/" in spec:  # a path (a job's: absolute_model)
        raise ModelLoadError(
            f"model folder {os.path.expanduser(spec)} does not exist on {platform.node()}: pass a diffusers "
            f"folder (for a job on a cluster, at that path on every node: a shared file system), a hub id such as "
            f"{DEFAULT_MODEL}, or `tiny`"
        )
    raise ModelLoadError(
        f"model {spec!r} is neither a local folder nor a hub id: pass a diffusers folder, "
        f"a hub id such as {DEFAULT_MODEL}, or `tiny`"
    )


def _own_aligned_copies(module: torch.nn.Module) -> None:
    """Give every parameter and buffer its own freshly allocated (64-byte aligned) storage.
    Loaded from safetensors on the CPU they are views at 8-byte offsets into the file's buffer,
    and CPU matmul kernels round differently by alignment: the same weights then give other
    last bits than a model whose weights were copied (the official code's), and other bits
    from a file with a longer header."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        tensor.data = tensor.data.clone()


def load_model(spec: str = DEFAULT_MODEL, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> ModelBundle:
    """Load a model by hub id, local diffusers folder, `tiny` or `sd21-random`.

    Device defaults to CUDA when available; dtype to fp16 on CUDA, fp32 on CPU.
    """
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    if spec == SD21_RANDOM_MODEL:
        with device:  # random init on the target device: seconds on a GPU instead of a minute on CPU
            components = build_random_components(SD21_RANDOM_MODEL, cache_dir() / "sd21-random")
    else:
        folder = resolve_model(spec)
        try:
            components = _load_components(folder, dtype)
        # what a folder with missing files or keys raises depends on the library versions: with
        # transformers 4.x a tokenizer without its vocabulary is a TypeError (a None path)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            if not text or not isinstance(exc, (OSError, ValueError)):  # the type says what the text alone does not
                text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            raise ModelLoadError(f"cannot load model {spec!r} from {folder}: {text} (a diffusers folder of SD 2.1-base "
                                 "holds model_index.json, scheduler/, tokenizer/, and text_encoder/, vae/, unet/ "
                                 "with their weights: copy the missing files, or download the model again)") from exc
    for name in ("text_encoder", "vae", "unet"):
        module = components[name].requires_grad_(False).eval()
        module = module.to(device) if module.dtype == dtype else module.to(device=device, dtype=dtype)
        if device.type == "cpu":
            _own_aligned_copies(module)
        components[name] = module
    return ModelBundle(name=spec, device=device, dtype=dtype, **components)



# The blocks CompiledBlocks compiles: every block of the VAE encoder and the UNet that holds no
# attention (convolutions, group norms, the feed-forward of transformer blocks): most of the
# model's work. Attention stays eager, so capture, the official kernel and early exit are
# untouched.
COMPILED_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D", "FeedForward")

# Compiled graphs a block's forward may hold: one per distinct shape of its inputs (the SD UNet
# has about a dozen resnet shapes); past torch's default of 8 the rest would run eagerly.
_GRAPHS_PER_BLOCK = 64


class CompiledBlocks:
    """torch.compile'd stand-ins for the COMPILED_BLOCKS modules of a model's VAE encoder and
    UNet (regional compilation: one graph per block shape, shared by the blocks of that shape).

    They are in the model only inside `active()`, so other users of the same model (the bare
    model in the bench, another config in compare) run it eagerly. The first batch of each new
    shape pays the compile (seconds on a GPU, a minute on a CPU); a new batch size compiles
    once more, with the batch dimension dynamic. No CUDA graphs: a block's graph runs several
    times in one forward while the outputs of its earlier runs (the skip connections) are still
    in use, which CUDA graph replays would overwrite."""

    def __init__(self, model: ModelBundle, backend: str = "inductor"):
        import torch._dynamo

        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, _GRAPHS_PER_BLOCK)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 16 * _GRAPHS_PER_BLOCK)
        self.swaps = [(parent, name, child, torch.compile(child, fullgraph=True, backend=backend))
                      for root in (model.vae.encoder, model.unet)
                      for parent in root.modules()
                      for name, child in parent.named_children()
                      if type(child).__name__ in COMPILED_BLOCKS]

    @contextmanager
    def active(self):
        """The compiled blocks in place of the eager ones for the duration."""
        for parent, name, _, compiled in self.swaps:
            setattr(parent, name, compiled)
        try:
            yield
        finally:
            for parent, name, eager, _ in self.swaps:
                setattr(parent, name, eager)
