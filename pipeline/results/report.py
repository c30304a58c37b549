"""A self-contained HTML quality report of a job: overlays of the worst, median and best images
by mean confidence, plots of the statistics, the evaluation table when ground truth exists, and
the failed images. Pictures are embedded as base64 PNG; the page needs no other file."""

from __future__ import annotations

import base64
import html
import io
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import random_weights_note
from pipeline.data.atomic import atomic_write_bytes, check_file_can_be_written
from pipeline.results.evaluate import evaluate_job
from pipeline.data.ledger import Ledger, count_states
from pipeline.data.safe_paths import file_in
from pipeline.data.outputs import DamagedOutputError
from pipeline.data.shards import InputError, ShardReadError, sample_image
from pipeline.mask.codec import decode_image, decode_mask, mask_colour, overlay


def _png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def pick_examples(rows: list[dict], per_group: int) -> dict[str, list[dict]]:
    """Disjoint worst / median / best ok rows by mean confidence, up to per_group each (fewer
    when there are fewer than 3 * per_group images; all in one group under 3 images)."""
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["mean_confidence"])
    size = min(per_group, len(ok) // 3)
    if size == 0:
        return {"all": ok[::-1]}
    start = min(max(size, len(ok) // 2 - size // 2), len(ok) - 2 * size)
    return {"worst": ok[:size], "median": ok[start : start + size], "best": ok[-size:][::-1]}


def panel_size(width: int, height: int, box_height: int = 160, max_width: int = 320,
               min_side: int = 16) -> tuple[int, int]:
    """(width, height) in pixels of one panel of a report strip: the image's aspect kept,
    `box_height` high unless that makes it wider than `max_width` (a panorama); neither side
    under `min_side`, so that a 3 x 2,000 image still shows (stretched) and a 4,000 x 8 one
    does not make a strip 80,000 pixels wide."""
    scale = min(box_height / height, max_width / width)
    return max(min_side, round(width * scale)), max(min_side, round(height * scale))


def _strip(image: np.ndarray, mask: np.ndarray, gt: np.ndarray | None) -> Image.Image:
    """The overlay (image with mask | mask | ground truth), each panel scaled to `panel_size`
    (the image smoothly, the label maps by nearest neighbour)."""
    size = panel_size(image.shape[1], image.shape[0])

    def labels(values: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(values.astype(np.uint8)).resize(size, Image.NEAREST))

    return overlay(np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR)), labels(mask),
                   None if gt is None else labels(gt))


def _plots(rows: list[dict]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    share: dict[str, list[float]] = defaultdict(list)
    missed: Counter = Counter()
    for row in ok:
        for name, fraction, label in zip(row["names"], row["class_pixel_fraction"], row["labels"]):
            share[name].append(fraction)
            if label in (row["missed_labels"] or []):
                missed[name] += 1
    names = sorted(share, reverse=True)  # top to bottom in alphabetical order
    figures = {}
    panels = [  # (title, draw, value axis label, per class)
        ("Mean confidence per image", lambda ax: ax.hist([r["mean_confidence"] for r in ok], bins=20, color="#4472c4"),
         "mean winning score", False),
        ("Pixel share of each class where labelled",
         lambda ax: ax.barh(names, [float(np.mean(share[n])) for n in names], color="#70ad47"), "mean share", True),
        ("Labelled classes that received no pixel",
         lambda ax: ax.barh(names, [missed[n] for n in names], color="#c00000"), "images", True),
        ("Seconds per image", lambda ax: ax.hist([r["seconds"] for r in ok], bins=20, color="#7f7f7f"),
         "seconds", False),
    ]
    for title, draw, value_label, per_class in panels:
        # one class per 0.17 inch: 20 VOC or 80 COCO class names stay readable
        height = max(3.0, 0.8 + 0.17 * len(names)) if per_class else 3.0
        fig, ax = plt.subplots(figsize=(5.2, height))
        draw(ax)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(value_label)
        if per_class:
            ax.tick_params(axis="y", labelsize=8)
            ax.set_ylim(-0.6, len(names) - 0.4)
            ax.set_xlim(left=0, right=max(ax.get_xlim()[1], 1 if "no pixel" in title else 0.01))
        else:
            ax.set_ylabel("images")
            ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 1))
        fig.tight_layout()
        figures[title] = _figure_uri(fig)
        plt.close(fig)
    return figures


def _pictures(record, sample: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A mask's image [H, W, 3], labels [H, W] and ground truth [H, W] (None when its input sample
    has none, or one of another size)."""
    gt = decode_mask(sample["gt.png"]) if "gt.png" in sample else None
    if gt is not None and gt.shape != record.labels.shape:
        gt = None
    return decode_image(sample_image(sample), record.id), record.labels, gt


def write_overlays(job, dest: str | Path) -> int:
    """An overlay PNG (image with mask | mask | ground truth) per mask of the job in dest/<id>.png;
    returns how many were written."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    for record, sample in job.joined():
        if sample is not None:
            overlay(*_pictures(record, sample)).save(file_in(dest, record.id, ".png"))
            count += 1
    return count


def _named_colours(row: dict) -> str:
    """A row's class names, each after a square of the colour its pixels have in the masks."""
    return ", ".join(f"<span class='swatch' style='background:{mask_colour(value)}'></span>{html.escape(name)}"
                     for value, name in zip(row["labels"], row["names"]))


def _examples_html(job, rows: list[dict], per_group: int) -> str:
    groups = pick_examples(rows, per_group)
    wanted = {r["id"]: r for group in groups.values() for r in group}
    holding = {r["shard"] for r in wanted.values()}  # only these mask and input shards are read
    strips: dict[str, str] = {}
    for record, sample in job.joined([tar for tar in job.mask_shards() if tar.stem in holding], ids=wanted):
        if sample is not None:
            strips[record.id] = _png_data_uri(_strip(*_pictures(record, sample)))
    parts = []
    for group, chosen in groups.items():
        title = "All images" if group == "all" else f"{group.capitalize()} by mean confidence"
        parts.append(f"<h3>{title}</h3><div class='sheet'>")
        for row in chosen:
            if row["id"] in strips:
                caption = (f"{html.escape(row['id'])} · {_named_colours(row)} · "
                           f"confidence {row['mean_confidence']:.2f}")
                parts.append(f"<figure><img src='{strips[row['id']]}' alt='{html.escape(row['id'])}'>"
                             f"<figcaption>{caption}</figcaption></figure>")
        parts.append("</div>")
    return "\n".join(parts)


def write_report(job, dest: str | Path, per_group: int = 4, processes: int = 1, progress=None) -> Path:
    """Write the job's report to dest/index.html, or to dest itself where it names an .html file;
    returns its path. The evaluation scores the mask shards in up to `processes` processes,
    moving `progress` (a tqdm bar) by their images."""
    dest = Path(dest)
    path = dest if dest.suffix.lower() in (".html", ".htm") else dest / "index.html"
    check_file_can_be_written(path)  # before the evaluation, which takes minutes on a large job
    rows = job.stats().to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    job_info = job.job()
    class_names = job.class_names

    sections = [f"<h1>Pseudo-mask report</h1><p>{len(rows)} images: {len(ok)} ok, {len(failed)} failed · "
                f"model <code>{html.escape(str(job_info.get('model', '?')))}</code> · config "
                f"<code>{html.escape(str(job_info.get('config_hash', '?'))[:12])}</code></p>"
                "<p class='legend'>Each strip: image with the mask blended · pseudo mask · ground truth "
                "(when the shards carry it). Colours: the PASCAL VOC palette by class index, each caption "
                "showing its classes' colours.</p>"]
    note = random_weights_note(str(job_info.get("model")))
    if note:
        sections[0] += f"<p class='warning'>{html.escape(note[0].upper() + note[1:])}.</p>"
    shards, left = Ledger(job.out_dir).unfinished()
    if left:
        sections[0] += (f"<p class='warning'><b>The job is not complete</b>: {shards - sum(left.values())} of "
                        f"{shards} input shards done ({html.escape(count_states(left))}); everything below is of "
                        "the shards done.</p>")
    try:
        scores, _ = evaluate_job(job, processes=processes, progress=progress)
    except DamagedOutputError:
        raise  # the job's own masks: the report stops, naming the resume, as eval and export do
    except (InputError, ShardReadError) as exc:  # no input shards to read ground truth from
        scores, sections[0] = None, sections[0] + f"<p>No evaluation: {html.escape(str(exc))}</p>"
    if scores is not None and scores.images:
        names = ["background"] + class_names
        cells = "".join(f"<tr><td>{html.escape(n)}</td><td>{'-' if v is None else f'{v:.1f}'}</td></tr>"
                        for n, v in zip(names, scores.iou))
        sections.append(f"<h2>Against ground truth ({scores.images} images)</h2><div class='eval'><table>"
                        f"<tr><th>class</th><th>IoU</th></tr>{cells}</table><p><b>mIoU {scores.miou:.1f}</b> · "
                        f"pixel accuracy {scores.pixel_accuracy:.1f} · coverage {scores.coverage:.1f}</p></div>")
    sections.append("<h2>Examples</h2>" + (_examples_html(job, rows, per_group) if ok else
                                            "<p>No image got a mask: every image failed (the reasons are below).</p>"))
    if ok:
        plots = "".join(f"<img src='{uri}' alt='{html.escape(title)}'>" for title, uri in _plots(rows).items())
        sections.append(f"<h2>Statistics</h2><div class='plots'>{plots}</div>")
    if failed:
        items = "".join(f"<tr><td>{html.escape(r['id'])}</td><td>{html.escape(r['error'] or '')}</td></tr>"
                        for r in failed)
        sections.append(f"<h2>Failed images</h2><table><tr><th>id</th><th>error</th></tr>{items}</table>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>pseudolabel report</title><style>"
            "body{font-family:sans-serif;margin:24px;color:#222}figure{display:inline-block;margin:6px}"
            "figcaption{font-size:12px;color:#555}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:2px 8px}.plots img{margin:4px}.legend{color:#555;font-size:13px}"
            ".warning{color:#a00}.swatch{display:inline-block;width:10px;height:10px;margin-right:3px;"
            "border:1px solid #888;vertical-align:baseline}"
            "</style></head><body>" + "\n".join(sections) + "</body></html>")
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
