import importlib.util
import os
import shutil
import tempfile

import numpy as np
import pytest

# Built-in models are built into a per-session cache, never the user's, removed when the
# session ends (about 140 MB a run; one set in the environment is the caller's and is kept).
_SESSION_CACHE = None if "PSEUDOLABEL_CACHE" in os.environ else tempfile.mkdtemp(prefix="pseudolabel-test-cache-")
if _SESSION_CACHE:
    os.environ["PSEUDOLABEL_CACHE"] = _SESSION_CACHE
# Every Ray the tests start, in this process or a CLI subprocess, is a new private instance:
# never a cluster of the user's (`ray start`) that RAY_ADDRESS or /tmp/ray points at.
os.environ["RAY_ADDRESS"] = "local"


def pytest_unconfigure(config):
    if _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def mallopt_calls(monkeypatch):
    """The mallopt calls an in-process command asks for (segment, compare, bench), recorded
    instead of made: the test process keeps glibc's settings (test_runner runs the real call
    in a subprocess)."""
    from pipeline.job import allocator

    calls = []
    monkeypatch.setattr(allocator, "_mallopt", lambda param, value: calls.append((param, value)) or True)
    return calls


@pytest.fixture(scope="session")
def tiny_model():
    from pipeline.segment.models import load_model

    return load_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def tokenizer():
    from pipeline.segment.builtin_models import clip_tokenizer

    return clip_tokenizer()


def synthetic_image(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3]: two flat colour regions (left/right) plus mild noise."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), dtype=np.float32)
    image[:, : width // 2] = (200, 40, 40)
    image[:, width // 2 :] = (30, 60, 190)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def image_tensor(image: np.ndarray):
    """uint8 [H, W, 3] array -> the [3, H, W] view of it that the worker gives the segmenter."""
    import torch

    return torch.from_numpy(image).permute(2, 0, 1)


@pytest.fixture(scope="module")
def ray_local():
    """A private Ray for one test module, shut down after it (never a cluster already running)."""
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


FAST_CONFIG = os.path.join(os.path.dirname(__file__), "fast.yaml")

# The dense CRF's module is not installed with the project on Python 3.13+ (README.md says why)
needs_crf = pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None,
                               reason="the pydensecrf module is not installed (on Python 3.13+ see README.md)")


def write_voc_folder(root, images: dict, annotations: dict | None = None, split="train"):
    """A small VOC2012-style folder: images {id: (uint8 image, mask or None)}; annotations
    {id: [names]} become Annotations/<id>.xml."""
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "Annotations"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (image, mask) in images.items():
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        if mask is not None:
            Image.fromarray(mask, mode="L").convert("P").save(root / "SegmentationClass" / f"{image_id}.png")
    for image_id, names in (annotations or {}).items():
        objects = "".join(f"<object><name>{n}</name></object>" for n in names)
        (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objects}</annotation>")
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(images) + "\n")
    return root


def two_class_mask(height, width, left_label, right_label):
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, : width // 3] = left_label
    mask[:, 2 * width // 3 :] = right_label
    return mask


def make_job_output(tmp_path, predict, per_shard: int = 2, model: str = "fake"):
    """A job folder made without the model (recorded as `model`): VOC-style input shards
    (per_shard images each) of 4 synthetic images whose ground truth is two_class_mask, and mask
    shards holding predict(gt, index) as the masks (None: the image failed, with no mask).
    Returns (job folder, {id: gt})."""

    from pipeline.config import VOC_CLASS_NAMES, SegmenterConfig
    from pipeline.data.ledger import DONE, Ledger, ShardEntry
    from pipeline.mask.codec import encode_confidence, encode_mask
    from pipeline.mask.postprocess import MaskResult
    from pipeline.data.outputs import write_shard_outputs
    from pipeline.job.runner import config_hash
    from pipeline.data.shards import ShardingReport, encode_json, voc_sources, write_image_shards
    from pipeline.mask.stats import failed_row, mask_statistics

    pairs = [(8, 18), (12, 0), (15, 1), (7, 20)]
    gts = {f"2011_00000{i}": two_class_mask(30, 45, a, b) for i, (a, b) in enumerate(pairs)}
    root = write_voc_folder(tmp_path / "VOC2012", {k: (synthetic_image(30, 45, seed=i), gt)
                                                   for i, (k, gt) in enumerate(gts.items())})
    report = ShardingReport()
    write_image_shards(voc_sources(root, "train", None, report), tmp_path / "shards", "voc-train", per_shard,
                       list(VOC_CLASS_NAMES), report)
    out = tmp_path / "out"
    config = SegmenterConfig()
    ledger = Ledger(out)
    job = {"config": config.model_dump(mode="json"), "config_hash": config_hash(config, model), "model": model,
           "input": str(tmp_path / "shards")}
    ledger.claim(job, force=False)
    ids = list(gts)
    for shard_index in range(len(ids) // per_shard):
        samples, rows = [], []
        for image_id in ids[per_shard * shard_index: per_shard * (shard_index + 1)]:
            index = ids.index(image_id)
            predicted = predict(gts[image_id], index)
            if predicted is None:
                rows.append(failed_row(image_id, f"voc-train-00000{shard_index}", "failed on purpose"))
                continue
            labels = predicted.astype(np.uint8)
            confidence = np.full(labels.shape, 0.2 + 0.2 * index, dtype=np.float32)
            classes = sorted(int(v) - 1 for v in np.unique(gts[image_id]) if 0 < v < 255)
            result = MaskResult(labels=labels, confidence=confidence, scores=np.zeros(1), classes=classes)
            row = {"id": image_id, "shard": f"voc-train-00000{shard_index}", "status": "ok", "error": None,
                   **mask_statistics(result, list(VOC_CLASS_NAMES)), "refinement_delta": 0.0, "seconds": 1.0}
            rows.append(row)
            samples.append({"__key__": image_id, "png": encode_mask(labels), "conf.png": encode_confidence(confidence),
                            "json": encode_json(row)})
        shard = f"voc-train-00000{shard_index}"
        ledger.put(ShardEntry(shard=shard, url=str(tmp_path / "shards" / f"{shard}.tar"), state=DONE,
                              config_hash=job["config_hash"], model=model, attempts=1, samples=len(rows),
                              failed_samples=sum(row["status"] != "ok" for row in rows),
                              outputs=write_shard_outputs(out, shard, samples, rows)))
    return out, gts


def write_voc_shards(tmp, id_prefix: str, labels: list[tuple[int, int]], per_shard: int = 2):
    """VOC-style shards `tmp/shards/voc-train-*.tar` of 48 x 64 synthetic images with two-class
    ground truth, ids id_prefix + index; returns the shard folder."""
    from pipeline.config import VOC_CLASS_NAMES
    from pipeline.data.shards import ShardingReport, voc_sources, write_image_shards

    images = {f"{id_prefix}{i}": (synthetic_image(48, 64, seed=i), two_class_mask(48, 64, a, b))
              for i, (a, b) in enumerate(labels)}
    root = write_voc_folder(tmp / "VOC2012", images)
    report = ShardingReport()
    write_image_shards(voc_sources(root, "train", None, report), tmp / "shards", "voc-train", per_shard,
                       list(VOC_CLASS_NAMES), report)
    return tmp / "shards"


@pytest.fixture
def http_folder():
    """serve(folder) -> the base URL (no trailing /) of a local HTTP server over folder, as shards
    on a web server or an object store's HTTP endpoint are read; stopped after the test."""
    import functools
    import socket
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    servers = []

    class IPv6Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6

    def serve(folder, host: str = "127.0.0.1") -> str:
        """host "::1": served on IPv6, the URL's host in brackets (skips the test where it has none)."""
        server_class, url_host = (IPv6Server, f"[{host}]") if ":" in host else (ThreadingHTTPServer, host)
        try:
            server = server_class((host, 0), functools.partial(QuietHandler, directory=str(folder)))
        except OSError as exc:
            pytest.skip(f"cannot serve on {host}: {exc}")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://{url_host}:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="WebDataset reads http(s) shards with curl")
