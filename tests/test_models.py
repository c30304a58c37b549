"""Model loading: the tiny model round-trips through the folder path; clear errors otherwise."""

import json

import pytest
import torch

from pipeline.segment import models
from pipeline.segment.builtin_models import tiny_model_path
from pipeline.segment.models import ModelLoadError, load_model, resolve_model


def test_tiny_model_is_saved_as_a_diffusers_folder_and_loaded_back(tiny_model):
    folder = tiny_model_path()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).is_dir()
    again = load_model(str(folder), device="cpu")  # the same path a user's local folder takes
    for (name, a), (_, b) in zip(tiny_model.unet.state_dict().items(), again.unet.state_dict().items()):
        assert torch.equal(a, b), name
    assert tiny_model.heads_per_block == [5, 10, 20, 20]
    assert tiny_model.unet.config.use_linear_projection
    assert tiny_model.unet.config.cross_attention_dim == tiny_model.text_encoder.config.hidden_size
    assert tiny_model.scheduler.config.beta_schedule == "scaled_linear"
    assert tiny_model.dtype == torch.float32 and tiny_model.device.type == "cpu"


def test_cpu_weights_own_aligned_memory(tiny_model):
    # safetensors leaves them at 8-byte offsets into the file buffer, where CPU matmuls round
    # differently from the same weights copied (as the official code's are).
    tensors = list(tiny_model.unet.parameters()) + list(tiny_model.vae.parameters())
    assert all(t.data_ptr() % 64 == 0 for t in tensors)


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers Stable Diffusion folder"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="^model 'missing' is neither a local folder nor a hub id"):
        resolve_model("missing")
    # a job's workers get the folder absolute: one missing on a cluster node says where, and that every node needs it
    import platform

    with pytest.raises(ModelLoadError, match=f"^model folder {tmp_path}/missing does not exist on {platform.node()}: "
                                             "pass a diffusers folder \\(for a job on a cluster, at that path on "
                                             "every node: a shared file system\\)"):
        resolve_model(str(tmp_path / "missing"))


@pytest.mark.parametrize("raised", [OSError("Error no file named model.safetensors found in directory x"),
                                    TypeError("expected str, bytes or os.PathLike object, not NoneType"),
                                    KeyError("sample_size")])
def test_a_folder_with_missing_files_is_a_load_error_whatever_the_library_raises(tmp_path, monkeypatch, raised):
    # transformers 4.x raises a TypeError for a tokenizer folder without its vocabulary, 5.x an OSError
    (tmp_path / "unet").mkdir()

    def fails(folder, dtype):
        raise raised

    monkeypatch.setattr(models, "_load_components", fails)
    with pytest.raises(ModelLoadError, match=rf"^cannot load model '{tmp_path}' from {tmp_path}: .*a diffusers folder"):
        load_model(str(tmp_path), device="cpu")


def test_unreachable_hub_id_says_how_to_pass_a_local_folder(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="--model /path/to/stable-diffusion-2-1-base, or --model tiny"):
        load_model("nobody/no-such-model", device="cpu")


def test_cached_hub_snapshot_is_used_without_network(monkeypatch, tmp_path):
    # A hub id whose files are in the local cache loads with no network call at all.
    from huggingface_hub import constants

    folder = tiny_model_path()
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=5.0: pytest.fail("network was asked"))
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo_id, **kw: str(folder))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("someone/cached-model") == folder


def test_folder_of_fp16_variant_files_loads(tiny_model, tmp_path):
    # A download of a hub repository's fp16 files alone: `*.fp16.safetensors` and no plain weights.
    import shutil

    folder = tmp_path / "sd"
    shutil.copytree(tiny_model_path(), folder)
    for part, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        (folder / part / f"{name}.safetensors").rename(folder / part / f"{name}.fp16.safetensors")
    assert models.weights_variant(folder / "unet") == "fp16"
    assert models.weights_variant(tiny_model_path() / "unet") is None
    again = load_model(str(folder), device="cpu")
    for part in ("unet", "vae", "text_encoder"):
        for (name, a), (_, b) in zip(getattr(tiny_model, part).state_dict().items(),
                                     getattr(again, part).state_dict().items()):
            assert torch.equal(a, b), f"{part}.{name}"


def test_single_file_checkpoint_says_how_to_convert_it(tmp_path, monkeypatch):
    checkpoint = tmp_path / "v2-1_512-ema-pruned.safetensors"
    checkpoint.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="single-file checkpoint: convert it to a diffusers folder once"):
        resolve_model(str(checkpoint))
    # a relative path of two parts looks like a hub id (owner/name), and is still the file
    monkeypatch.chdir(tmp_path.parent)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=5.0: pytest.fail("the hub was asked"))
    with pytest.raises(ModelLoadError, match="single-file checkpoint"):
        models.check_model_available(f"{tmp_path.name}/v2-1_512-ema-pruned.safetensors")


def test_a_device_that_cannot_run_here_is_named_with_the_fix(monkeypatch, capsys, tmp_path):
    import re

    from PIL import Image

    from conftest import synthetic_image
    from pipeline.cli import main
    from pipeline.errors import DeviceError

    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_device(None) == models.default_device()
    with pytest.raises(DeviceError, match=r"device 'gpu0' is not a torch device: pass cpu, cuda or cuda:N"):
        models.resolve_device("gpu0")
    for other in ("mps", "xpu:0", "meta"):  # torch devices the segmenter does not run on: no traceback later
        with pytest.raises(DeviceError, match=f"^device '{other}': the segmenter runs on cpu or cuda \\(cuda:N\\), not "):
            models.resolve_device(other)
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build of torch, as README's first command installs
    with pytest.raises(DeviceError, match=r"this torch \(.*\) is a CPU build: install torch's CUDA build"):
        models.resolve_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a CUDA build on a machine whose GPUs are hidden, or one
    for count, device, message in ((0, "cuda", "no CUDA GPU is visible"),
                                   (2, "cuda:2", "2 CUDA GPU(s) visible, cuda:0 to cuda:1")):
        monkeypatch.setattr(torch.cuda, "device_count", lambda count=count: count)
        with pytest.raises(DeviceError, match=re.escape(message)):
            models.resolve_device(device)
    Image.fromarray(synthetic_image(20, 30, seed=1)).save(tmp_path / "photo.jpg")
    assert main(["segment", str(tmp_path / "photo.jpg"), "--labels", "cat", "--model", "tiny", "--device", "cuda:2",
                 "-o", str(tmp_path / "m.png")]) == 2
    assert capsys.readouterr().err == "pseudolabel: error: device 'cuda:2': 2 CUDA GPU(s) visible, cuda:0 to cuda:1\n"


def test_a_job_on_its_own_ray_refuses_such_a_device_before_its_workers_start(monkeypatch, capsys, tmp_path):
    """Its private Ray's workers run this very torch: one line, not Ray's log of each worker's failure."""
    import ray

    from conftest import write_voc_shards
    from pipeline.cli import main

    if ray.is_initialized():
        pytest.skip("Ray is already running in this process: the job would not start a private one")
    shards = write_voc_shards(tmp_path, "img", [(1, 2)])
    monkeypatch.setattr(torch.version, "cuda", None)
    try:
        code = main(["run", "--input", str(shards), "--model", "tiny", "--address", "local", "--device", "cuda",
                     "--no-progress", "-o", str(tmp_path / "out")])
    finally:
        ray.shutdown()  # the private instance this test's job started
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines()[-1].startswith("pseudolabel: error: device 'cuda': this torch (")
    assert "ShardWorker" not in err and "Traceback" not in err
