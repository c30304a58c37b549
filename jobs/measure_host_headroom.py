"""How close the segmenter is to being bound by the host (the Python thread that launches its
kernels), on a GPU.

Usage: python jobs/measure_host_headroom.py [--model sd21-random] [--device cuda] [--batch 32] [--num-images 256]
Prints the in-process segmenter's images/s alone and with threads decoding JPEGs beside it
(as fast as they can, and at a pipeline's pace), and, for a few batches, how long the host
takes to queue a whole batch against when its results are on the host, alone and behind a
running batch (as a worker launches them). When queueing takes nearly as long as the
device's work, anything else on the worker's cores slows the model. On a GPU it also lists
the calls that make the host wait for the device while it queues a batch (there should be
none). On a CPU the figures only check that the script runs.
"""

import argparse
import io
import threading
import time
import warnings

import torch
from PIL import Image

from pipeline.results.bench import benchmark_images, segment_queued, sync_device
from pipeline.config import load_config
from pipeline.mask.codec import decode_image
from pipeline.segment.models import load_model
from pipeline.segment.segmenter import Segmenter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd21-random")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--paced", type=float, default=60.0, help="images/s of each paced decoding thread")
    args = parser.parse_args()
    model = load_model(args.model, device=args.device)
    config = load_config(None).model_copy(update={"batch_size": args.batch})
    segmenter = Segmenter(model, config)
    samples = benchmark_images(args.num_images)
    images = [torch.from_numpy(image).permute(2, 0, 1) for image, _ in samples]
    labels = [classes for _, classes in samples]
    jpegs = []
    for image, _ in samples:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    segmenter.encode_prompts(labels)  # text embeddings cached: every pass below measures the same work
    segmenter.segment(images[: args.batch], labels[: args.batch])

    def images_per_s() -> float:
        sync_device(model.device)
        start = time.perf_counter()
        segment_queued(segmenter, images, labels, args.batch)
        return len(images) / (time.perf_counter() - start)

    print(f"{args.model} on {model.device}, batch {args.batch}: segmenter alone {images_per_s():.1f} images/s")
    for threads, pace in ((1, None), (2, None), (2, args.paced)):
        stop, decoded = threading.Event(), [0]

        def decode() -> None:
            while not stop.is_set():
                for data in jpegs:
                    if stop.is_set():
                        break
                    decode_image(data)
                    decoded[0] += 1
                    if pace:
                        time.sleep(1.0 / pace)

        workers = [threading.Thread(target=decode) for _ in range(threads)]
        for worker in workers:
            worker.start()
        start = time.perf_counter()
        rate = images_per_s()
        elapsed = time.perf_counter() - start
        stop.set()
        for worker in workers:
            worker.join()
        how = f"at {pace:.0f} images/s each" if pace else "as fast as they can"
        print(f"with {threads} thread(s) decoding JPEGs {how} ({decoded[0] / elapsed:.0f} images/s decoded): "
              f"{rate:.1f} images/s")

    batch, classes = images[: args.batch], labels[: args.batch]
    for _ in range(3):
        sync_device(model.device)
        start = time.perf_counter()
        pending = segmenter.launch(batch, classes)
        launched = time.perf_counter()
        pending.wait()
        done = time.perf_counter()
        print(f"one batch (text, VAE, UNet with capture, method, results' copy): queued by the host in "
              f"{1e3 * (launched - start):.0f} ms, results on the host at {1e3 * (done - start):.0f} ms")
    sync_device(model.device)
    running = segmenter.launch(batch, classes)
    start = time.perf_counter()
    behind = segmenter.launch(batch, classes)
    queued = time.perf_counter() - start
    running.wait()
    running_done = time.perf_counter() - start
    behind.wait()
    print(f"a batch launched behind a running one: queued in {1e3 * queued:.0f} ms, the running one's "
          f"results on the host {1e3 * running_done:.0f} ms after that launch began (about equal on a "
          f"GPU: the launch waited for the running batch)")
    if model.device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            segmenter.launch(batch, classes)
        torch.cuda.set_sync_debug_mode("default")
        sync_device(model.device)
        waits = [str(w.message).strip().splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        print(f"calls that made the host wait for the device while it queued a batch: {len(waits)}")
        for line in sorted(set(waits)):
            print(f"  {waits.count(line)} x {line}")


if __name__ == "__main__":
    main()
