"""Run the peer methods' official code beside this project's, on the same model, images, labels,
latents and prompt embeddings, and print how far their masks agree.

    python jobs/check_peers.py --input 'shards/voc-train-*.tar' --model tiny --num-images 8 \
        --goca ~/src/goca --diffsegmenter ~/src/DiffSegmenter \
        [--diffseg ~/src/diffseg --diffseg-python ~/tfenv/bin/python]

Each checkout is one you fetched yourself (checked at Darkbblue/goca 475892f,
VCG-team/DiffSegmenter b3a8686, google/diffseg 77ea596); nothing of it is part of this project.
Its code is imported from that path at run time and runs as written; the harness only feeds it
what its own data loaders, captioners and model loaders would, from this project's run:

- GoCA: its attention processor and feature store (`install/components`, the files it asks you
  to copy into generic-diffusion-feature) record this project's UNet on this project's latent
  and prompt embedding; its `goca_cross_run`, `self_attn_run` and `affinity_propagate` run with
  `config_model_15.py`'s settings; its `quantitative_evaluation` 'offset' rule labels the pixels.
  Its prompt facts (objects, background objects, rescaling tokens) come from this project's
  GoCA prompt. `--goca-float32` stores features in float32 instead of the reference's float16.
- DiffSegmenter: `ptp_stable_best.py`'s own statements from the prompt loop to the min-max
  (its attention store, Compel prompt, `aggregate_all_attention`, weights, completion,
  upsampling), with BLIP answering the prompt unchanged (no caption: "a photograph of cat++"),
  this project's clean latent and noise; then `evaluation_voc12.py`'s argmax against a
  constant background. The reference prompts one class at a time, this project all of an
  image's classes at once: single-label images compare the maths, the others show that design
  difference.
- DiffSeg (a Keras/TensorFlow reference, run by --diffseg-python in its own environment): this
  project's per-resolution self- and cross-attention go through its `DiffSeg.segment` (KMeans
  refinement off, as its benchmark notebook) and `get_semantics(voting="mean")`; segment
  labels are compared at 512 x 512, before this project's resize to the image.

Needs torchvision, einops, compel and scipy (the references' imports) beside this project.
Last lines: `<method> agreement: X% of pixels`.
"""

from __future__ import annotations

import argparse
import ast
import gc
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(_REPO))

from check_official import read_samples  # noqa: E402  (jobs/ is on sys.path when run as a script)


def _module_from_file(name: str, path: Path, replace: tuple[str, str] | None = None) -> types.ModuleType:
    """Import a file as module `name`; `replace` rewrites one string of its source first."""
    source = path.read_text()
    if replace is not None:
        if replace[0] not in source:
            raise RuntimeError(f"{path} no longer contains {replace[0]!r}: check the commit")
        source = source.replace(*replace)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


def _restore_processors(unet):
    saved = dict(unet.attn_processors)
    return lambda: unet.set_attn_processor(saved)


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


# --- GoCA ---------------------------------------------------------------------------------------

def goca_reference_labels(root: Path, model, latents, embeddings, prompt, classes: list[int], out_hw,
                          offset: float, float32: bool, power: int | None) -> np.ndarray:
    src = root / "src-main"
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    from components.cross_attn_dispatch import cross_attn_prepare, goca_cross_run
    from components.postprocess_dispatch import affinity_propagate
    from components.space_attn_dispatch import self_attn_run

    attention = _module_from_file("goca_attention", root / "install/components/attention.py")
    extractor = _module_from_file("goca_feature_extractor", root / "install/components/feature_extractor.py",
                                  ("feat.to(torch.float16)", "feat.to(torch.float32)") if float32 else None)
    config = _module_from_file("goca_config_model_15", src / "configs/config-model/config_model_15.py").ModelConfig()
    cross_setting, space_setting = dict(config.cross_attn_setting), dict(config.space_attn_setting)
    layers: set = set()
    cross_attn_prepare("goca", set(), layers, cross_setting)
    layers |= set(space_setting["layer"])
    pipe = types.SimpleNamespace(unet=model.unet)
    store = extractor.prepare_feature_extractor("1-5", pipe, {name: True for name in layers}, 1, False)
    restore = _restore_processors(model.unet)
    attention.register_attention_store("1-5", pipe, 512, False, processor_only=True)
    timestep = torch.tensor([config.t])

    class Extractor:  # stands in for generic-diffusion-feature's FeatureExtractor
        version = "1-5"

        def encode_prompt(self, prompt_embeds):
            return prompt_embeds

        def extract(self, prompt_embeds, batch_size, images, t):
            store.reset()
            with torch.inference_mode():
                model.unet(latents, timestep, encoder_hidden_states=prompt_embeds)
            return store.stored_feats

    try:
        objects = {c + 1: list(cols) for c, cols in zip(classes, prompt.columns)}  # VOC ids, as its dataset
        cross_feat, features = goca_cross_run(
            Extractor(), None, embeddings, list(prompt.content_columns), [list(g) for g in prompt.background_groups],
            objects, config.feat_size, config.t, cross_setting["head_method"], cross_setting["layer_method"],
            cross_setting["rescale_method"], cross_setting["ref_layer"], None)
    finally:
        restore()
        for module in model.unet.modules():  # the gatherers it attached
            if hasattr(module, "feature_gatherer"):
                del module.feature_gatherer
    space_feat = self_attn_run(features, config.feat_size, space_setting["layer"])
    pred = affinity_propagate(cross_feat, space_feat, config.postprocess_setting[0]["order"] if power is None else power)
    # quantitative_evaluation's 'offset' rule: 21 channels, absent classes 0, background offset
    pred = F.interpolate(pred.float().unsqueeze(0), out_hw, mode="bilinear").squeeze(0)
    full = torch.zeros(21, *out_hw)
    for index, class_id in enumerate(objects):
        full[class_id] = pred[index]
    full[0] = offset + pred[-1]
    return full.argmax(dim=0).numpy().astype(np.uint8)


# --- DiffSegmenter -------------------------------------------------------------------------------

def _diffsegmenter_namespace(root: Path, model) -> dict:
    """ptp_stable_best.py's module-level definitions, with ptp_utils importable and the imports
    it needs only for its dataset and notebook display stubbed."""
    if str(root) not in sys.path:  # its `ptp_utils` and `visual_code`, as the script's own path insert
        sys.path.insert(0, str(root))
    sys.modules.setdefault("IPython", types.ModuleType("IPython"))
    display = types.ModuleType("IPython.display")
    display.display = lambda *args, **kwargs: None
    sys.modules.setdefault("IPython.display", display)
    script = root / "open_vocabulary/voc12/ptp_stable_best.py"
    tree = ast.parse(script.read_text())
    namespace: dict = {"__name__": "ptp_stable_best", "__file__": str(script)}
    for node in tree.body:
        if isinstance(node, ast.If):  # the __main__ block: its statements run in diffsegmenter_reference
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "dataset.mydatasets":
            continue  # its dataset (timm transforms); the harness feeds the samples
        exec(compile(ast.Module([node], []), str(script), "exec"), namespace)
    namespace.update(ldm_stable=types.SimpleNamespace(unet=model.unet, tokenizer=model.tokenizer,
                                                      text_encoder=model.text_encoder, device=torch.device("cpu"),
                                                      scheduler=model.scheduler),
                     tokenizer=model.tokenizer, device=torch.device("cpu"), device1=torch.device("cpu"),
                     dtype=torch.float32)
    return namespace


def _main_statements(root: Path, first: str, last: str) -> ast.Module:
    """The statements of ptp_stable_best.py's per-image loop from the one starting with `first`
    up to the one before `last`."""
    script = root / "open_vocabulary/voc12/ptp_stable_best.py"
    tree = ast.parse(script.read_text())
    main = next(node for node in tree.body if isinstance(node, ast.If))
    loop = next(n for n in ast.walk(main) if isinstance(n, ast.For) and ast.unparse(n.target) == "(k, data)")
    texts = [ast.unparse(n) for n in loop.body]
    start = next(i for i, text in enumerate(texts) if text.startswith(first))
    stop = next(i for i, text in enumerate(texts) if text.startswith(last))
    return ast.Module(loop.body[start:stop], [])


class _EchoCaptioner:
    """BLIP's processor and model, answering a conditional caption request with the prompt."""

    def __call__(self, image, prompt, return_tensors=None):
        return types.SimpleNamespace(to=lambda device: {"prompt": prompt})

    def generate(self, prompt):
        return [prompt]

    def decode(self, text, skip_special_tokens=True):
        return text


def diffsegmenter_reference_labels(root: Path, namespace: dict, clean_latent, noise, words: list[str],
                                   classes: list[int], image_path: str, out_hw, background_score: float) -> np.ndarray:
    captioner = _EchoCaptioner()
    scope = dict(namespace)
    scope.update(input_latent=clean_latent, noise=noise, noise_sample_num=1, y=words, k=0, prompt_texts=[], blip_device="cpu",
                 processor=captioner, model=captioner, g_cpu=torch.Generator().manual_seed(4307), times=[100],
                 weight=[0.3, 0.5, 0.1, 0.1], h=out_hw[0], w=out_hw[1], img_path=image_path,
                 data=[None, None, torch.zeros(1, *out_hw), [image_path]])
    scope["controller"] = scope["AttentionStore"]()
    restore = _restore_processors(namespace["ldm_stable"].unet)
    try:
        with torch.no_grad():
            exec(compile(_main_statements(root, "images = []", "pred_class_key"), "ptp_stable_best", "exec"), scope)
            exec(compile(_main_statements(root, "for i in range(0, len(y))", "cam_dict"), "ptp_stable_best", "exec"),
                 scope)
    finally:
        restore()
        for module in namespace["ldm_stable"].unet.modules():  # its forward patches
            module.__dict__.pop("forward", None)
    maps = scope["images"][:, 0] / 255  # evaluation_voc12.py: the saved map / 255
    scope.clear()  # its attention store holds gigabytes of maps
    gc.collect()
    full = torch.zeros(21, *out_hw)
    for index, class_id in enumerate(classes):
        full[class_id + 1] = maps[index]
    full[0] = background_score
    return full.argmax(dim=0).numpy().astype(np.uint8)


# --- DiffSeg (the TensorFlow side runs in its own interpreter) ----------------------------------------

_DIFFSEG_CHILD = r"""
import sys, types, numpy as np
sys.path.insert(0, sys.argv[1])
source = open(sys.argv[1] + "/diffseg/segmentor.py").read()
if sys.argv[4] == "float64":  # its first merge's KL in float64 instead of float16
    assert "tf.float16" in source
    source = source.replace("tf.float16", "tf.float64")
segmentor_module = types.ModuleType("segmentor")
exec(compile(source, "diffseg/segmentor.py", "exec"), segmentor_module.__dict__)
DiffSeg = segmentor_module.DiffSeg
data = np.load(sys.argv[2], allow_pickle=True)
tau, words, nouns = float(data["tau"]), list(data["words"]), [tuple(n) for n in data["nouns"]]
segmentor = DiffSeg([tau] * 3, False, 16)
weights = [data[f"self_{side}"] for side in (64, 32, 16, 8)]
pred = segmentor.segment(*weights)
x_weight = segmentor.aggregate_x_weights([data[f"cross_{side}"][0] for side in (64, 32, 16, 8)],
                                         weight_ratio=[1.0, 1.0, 1.0, 1.0])
label_to_mask = segmentor.get_semantics(pred[0], x_weight[0], [(int(i), w) for i, w in nouns], voting="mean")
labels = np.zeros(pred[0].shape, np.uint8)
for word, segments in label_to_mask.items():
    for segment in segments:
        labels[pred[0] == segment] = int(data["label_of"].item().get(word, 0))
np.savez(sys.argv[3], labels=labels, segments=pred[0])
"""


def diffseg_inputs(plan, store, prompt, classes: list[int], config) -> dict:
    """The reference's inputs from this project's capture: per side the head-averaged
    self-attention summed over blocks / 5 (its weight_64 ...), and the same for cross-attention
    (up blocks of the largest side / 3), each [1, 1, N, M]; its nouns (token index - 1, word)."""
    inputs = {}
    for side, maps in plan._naming_cross_attention(store).items():
        inputs[f"cross_{side}"] = maps[:, None].numpy()
    for side, maps in store.pooled_by_prefix("self:").items():
        inputs[f"self_{side}"] = maps[:, None].numpy()
    nouns, label_of = [], {}
    for class_id, cols in zip(classes, prompt.columns):
        for column in cols:
            word = f"class{class_id + 1}-{column}"
            nouns.append((column - 1, word))
            label_of[word] = class_id + 1
    for group in prompt.background_groups:
        nouns.extend((column - 1, f"background-{column}") for column in group)
    inputs.update(tau=config.diffseg.tau, words=[w for _, w in nouns], nouns=np.array(nouns, dtype=object),
                  label_of=np.array(label_of, dtype=object))
    return inputs


# --- driver ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="shards: a brace pattern, a glob or a shard folder")
    parser.add_argument("--model", default="tiny", help="tiny, sd21-random, a diffusers folder or a hub id")
    parser.add_argument("--num-images", type=int, default=None, help="at most this many images")
    parser.add_argument("--goca", type=Path, help="checkout of Darkbblue/goca")
    parser.add_argument("--goca-float32", action="store_true", help="GoCA's feature store in float32")
    parser.add_argument("--goca-propagation-power", type=int, default=None,
                        help="both sides' propagation power (default: the reference's 2); on random weights the "
                             "self-attention is nearly uniform, and the min-max after propagation magnifies "
                             "last-bit differences, so 0 isolates the rest of the method")
    parser.add_argument("--diffsegmenter", type=Path, help="checkout of VCG-team/DiffSegmenter")
    parser.add_argument("--diffseg", type=Path, help="checkout of google/diffseg")
    parser.add_argument("--diffseg-tau", type=float, default=None,
                        help="both sides' merge threshold (default: the config's); on random weights the "
                             "self-attention maps lie about 1e-4 apart, so 6e-5 gives several segments")
    parser.add_argument("--diffseg-float64", action="store_true",
                        help="the DiffSeg reference's first merge in float64 instead of its float16, and this "
                             "side's segments (not its labels) merged in float64")
    parser.add_argument("--diffseg-python", default=sys.executable,
                        help="a Python with tensorflow and scikit-learn for the DiffSeg reference")
    args = parser.parse_args(argv)

    from pipeline.segment.capture import UNetStopped, capturing
    from pipeline.config import SegmenterConfig
    from pipeline.mask.codec import decode_image
    from pipeline.segment.methods import diffseg
    from pipeline.segment.models import load_model
    from pipeline.mask.postprocess import finish_mask
    from pipeline.results.compare import with_value
    from pipeline.segment.plan import PlannedScores
    from pipeline.segment.segmenter import Segmenter

    model = load_model(args.model, device="cpu", dtype=torch.float32)
    base = SegmenterConfig()
    samples = read_samples(args.input, args.num_images)
    totals: dict[str, list[float]] = {}
    namespace = _diffsegmenter_namespace(args.diffsegmenter, model) if args.diffsegmenter else None
    with tempfile.TemporaryDirectory() as scratch:
        for sample in samples:
            image = decode_image(sample["jpg"], sample["key"])
            classes = sorted({base.class_index(name) for name in sample["names"]})
            pixels = torch.from_numpy(image).permute(2, 0, 1)
            out_hw = image.shape[:2]
            line = [f"{sample['key']} ({len(classes)} label{'s' * (len(classes) > 1)})"]
            if args.goca:
                config = base.model_copy(update={"method": "goca"})
                if args.goca_propagation_power is not None:
                    config = with_value(config, "goca.propagation_power", args.goca_propagation_power)
                segmenter = Segmenter(model, config)
                (scores,) = segmenter.segment([pixels], [classes])
                ours = finish_mask(scores.maps, scores.classes, image, config, scores.background).labels
                latents = segmenter.encode_images([pixels])
                embeddings, (prompt,) = segmenter.encode_prompts([classes])
                theirs = goca_reference_labels(args.goca, model, latents, embeddings, prompt, classes, out_hw,
                                               config.goca.background_offset, args.goca_float32,
                                               args.goca_propagation_power)
                totals.setdefault("goca", []).append(_agreement(ours, theirs))
                line.append(f"goca {100 * totals['goca'][-1]:.2f}%")
            if args.diffsegmenter:
                config = base.model_copy(update={"method": "diffsegmenter"})
                segmenter = Segmenter(model, config)
                (scores,) = segmenter.segment([pixels], [classes])
                ours = finish_mask(scores.maps, scores.classes, image, config).labels
                clean = Segmenter(model, base.model_copy(update={"method": "diffseg"})).encode_images([pixels])
                noise = segmenter._noise(1, tuple(clean.shape[1:]), clean.device, clean.dtype)
                path = Path(scratch) / f"{sample['key']}.jpg"
                path.write_bytes(sample["jpg"])
                words = [base.classes[c].prompt for c in classes]
                theirs = diffsegmenter_reference_labels(args.diffsegmenter, namespace, clean, noise, words, classes,
                                                        str(path), out_hw, config.diffsegmenter.background_score)
                key = "diffsegmenter" + (" (one label)" if len(classes) == 1 else " (several labels)")
                totals.setdefault(key, []).append(_agreement(ours, theirs))
                line.append(f"{key} {100 * totals[key][-1]:.2f}%")
            if args.diffseg:
                config = base.model_copy(update={"method": "diffseg"})
                if args.diffseg_tau is not None:
                    config = with_value(config, "diffseg.tau", args.diffseg_tau)
                segmenter = Segmenter(model, config)
                latents = segmenter.encode_images([pixels])
                embeddings, (prompt,) = segmenter.encode_prompts([classes])
                with torch.inference_mode(), capturing(model.unet, segmenter.plan.specs, config.attention_kernel,
                                                       stop_early=True) as store:
                    try:
                        model.unet(latents, torch.tensor([config.diffseg.timestep]), encoder_hidden_states=embeddings)
                    except UNetStopped:
                        pass
                    (row,) = segmenter.plan.scores(store, [prompt])
                    inputs = diffseg_inputs(segmenter.plan, store, prompt, classes, config)
                    self_by_side = store.pooled_by_prefix("self:")
                    side = max(self_by_side)
                    aggregated = diffseg.aggregate_self_attention(self_by_side, side)[0]
                    if args.diffseg_float64:  # this side's merge in float64 too: the algorithm alone
                        aggregated = aggregated.double()
                    proposals = diffseg.merge_proposals(aggregated, side,
                                                        config.diffseg.anchors, config.diffseg.tau,
                                                        config.diffseg.merge_iterations)
                    upsampled = diffseg.upsample_proposals(proposals, side, config.image_size)
                    segments = diffseg.segment_labels(upsampled)
                    if args.diffseg_float64:  # name these segments as the plan does
                        candidates = prompt.columns + prompt.background_groups
                        naming = diffseg.naming_attention(
                            {s: m.double() for s, m in segmenter.plan._naming_cross_attention(store).items()},
                            candidates, config.image_size)[0]
                        names = diffseg.name_segments(segments, len(upsampled), naming)
                        named = diffseg.named_maps(upsampled, names, len(candidates))
                        n = len(prompt.columns)
                        row = PlannedScores(named[:n].T, named[n:].amax(dim=0), 0.0, config.image_size)
                ours = torch.cat([row.background[None], row.maps.T]).argmax(dim=0).reshape(row.side, row.side)
                ours = torch.tensor([0] + [c + 1 for c in classes])[ours].numpy().astype(np.uint8)
                data_path, out_path = Path(scratch) / "diffseg.npz", Path(scratch) / "diffseg_out.npz"
                np.savez(data_path, **inputs)
                subprocess.run([args.diffseg_python, "-c", _DIFFSEG_CHILD, str(args.diffseg), str(data_path),
                                str(out_path), "float64" if args.diffseg_float64 else "float16"], check=True)
                reference = np.load(out_path)
                theirs = reference["labels"]
                totals.setdefault("diffseg", []).append(_agreement(ours, theirs))
                same_segments = _agreement(segments.reshape(theirs.shape).numpy(), reference["segments"])
                totals.setdefault("diffseg segments", []).append(same_segments)
                line.append(f"diffseg {100 * totals['diffseg'][-1]:.2f}% at 512 px ({len(proposals)} segments here, "
                            f"{len(np.unique(reference['segments']))} there, {100 * same_segments:.2f}% same segment; "
                            f"labels {sorted(int(v) for v in set(ours.flat))} here, "
                            f"{sorted(int(v) for v in set(theirs.flat))} there)")
            print("  ".join(line), flush=True)
    for method, values in totals.items():
        print(f"{method} agreement: {100 * np.mean(values):.2f}% of pixels (worst image {100 * min(values):.2f}%, "
              f"{len(values)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
