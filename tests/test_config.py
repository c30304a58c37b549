"""YAML configs and their validation."""

from pathlib import Path

import pytest

from pipeline.config import ConfigError, SegmenterConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_voc_yaml_is_the_reference_default():
    config = load_config(ROOT / "configs" / "voc.yaml")
    assert config == SegmenterConfig()
    assert (config.ent, config.iterations, config.enhancement, config.timestep) == (0.015, 10, 1.6, 100)
    assert config.cross_attention.resolution_weights == {16: 0.7, 32: 0.3}
    assert config.self_attention.layers[0].heads == [1, 2]
    assert config.attention_kernel == "official" and config.scale_before_resize
    # the official index: the same heads as the layers keep, in its summation order
    assert config.cross_attention.head_order[32] == [22, 5, 21, 13, 8, 27, 28, 6, 25]


def test_coco_yaml_differs_where_the_reference_does():
    config = load_config(ROOT / "configs" / "coco.yaml")
    assert len(config.classes) == 80
    assert config.ent == 0.1
    assert config.background.rule == "threshold" and config.background.threshold == 0.45
    assert all(layer.heads is None for layer in config.cross_attention.layers)
    # The official mean-of-heads switch (att_mean) acts on cross-attention only.
    assert [layer.heads for layer in config.self_attention.layers] == [[1, 2]]
    assert config.background_context.endswith("lake, water, river, sea, railway, ")
    assert config.cluster.distance_dtype == "float16"
    assert config.cross_attention.head_order is None  # every head, layer by layer
    assert not config.scale_before_resize  # its COCO loader divides by 255 after the resize


def test_the_built_in_head_order_belongs_to_the_built_in_layers(tmp_path):
    path = tmp_path / "layers.yaml"
    path.write_text("cross_attention:\n  layers:\n    - {name: down_blocks.2.attentions.0, heads: [0, 1]}\n")
    assert load_config(path).cross_attention.head_order is None
    path.write_text("cross_attention:\n  layers:\n    - {name: down_blocks.2.attentions.0, heads: [0, 1]}\n"
                    "  head_order: {16: [1, 0]}\n")
    assert load_config(path).cross_attention.head_order == {16: [1, 0]}


@pytest.mark.parametrize("heads", ["[]", "[-1]", "[0, 0]"])
def test_a_layer_with_no_or_bad_head_indices_is_refused(tmp_path, heads):
    path = tmp_path / "c.yaml"
    path.write_text(f"cross_attention: {{layers: [{{name: up_blocks.3.attentions.1, heads: {heads}}}]}}\n")
    with pytest.raises(ConfigError, match=r"key cross_attention.layers.0.heads: heads .* must be distinct head indices"):
        load_config(path)


def test_class_lookup_by_name_or_prompt_words():
    config = SegmenterConfig()
    assert config.class_index("aeroplane") == config.class_index("plane") == 0
    assert config.class_index("dining table") == 10
    with pytest.raises(ConfigError, match="^unknown class name 'lamp': use one of aeroplane, "):
        config.class_index("lamp")


def test_a_built_in_name_is_the_built_in_config_beside_a_dataset_folder_of_that_name(tmp_path, monkeypatch):
    """Run from the folder that holds the COCO dataset as coco/ (the README's --coco-root coco/),
    `--config coco` and the label hints read the shipped config, not that folder."""
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert len(load_config("coco").class_names) == 80
    with pytest.raises(ConfigError, match=r"^unknown class name 'giraffe' \(a class of --config coco\): "):
        SegmenterConfig().class_index("giraffe")


def test_a_label_of_the_other_built_in_config_names_it():
    """COCO shards run with the VOC config (no manifest said which): each image's error says
    which config knows its label; a config of one's own classes gets no such guess."""
    with pytest.raises(ConfigError, match=r"^unknown class name 'giraffe' \(a class of --config coco\): use one of "
                                          "aeroplane, "):
        SegmenterConfig().class_index("giraffe")
    with pytest.raises(ConfigError, match=r"^unknown class name 'aeroplane' \(a class of --config voc\): did you "
                                          "mean 'airplane'\\? use one of person, bicycle, "):
        load_config("coco").class_index("aeroplane")
    with pytest.raises(ConfigError, match=r"^unknown class name 'giraffe': use one of cat, dog$"):
        SegmenterConfig(classes=[{"name": "cat", "prompt": "cat"}, {"name": "dog", "prompt": "dog"}]).class_index("giraffe")


def test_class_names_match_ignoring_case_spaces_and_separators_and_a_near_miss_is_named():
    config = SegmenterConfig()
    for spelling in ("Cat", "CAT", " cat "):
        assert config.class_index(spelling) == 7
    for spelling in ("Dining Table", "dining_table", "DiningTable", "Potted-Plant"):
        assert config.class_index(spelling) == (10 if "ining" in spelling else 15)
    with pytest.raises(ConfigError, match="^unknown class name 'motorcycle' \\(a class of --config coco\\): did you "
                                          "mean 'motorbike'\\? "):
        config.class_index("motorcycle")
    with pytest.raises(ConfigError, match="^unknown class name 'kat': did you mean 'cat'\\? "):
        config.class_index("kat")


@pytest.mark.parametrize("text, key", [
    ("ent: -1\n", "ent"),
    ("iterations: many\n", "iterations"),
    ("unknown_key: 3\n", "unknown_key"),
    ("background: {rule: magic}\n", "background.rule"),
    ("crf: {preset: nope}\n", "crf.preset"),
    ("attention_kernel: flash\n", "attention_kernel"),
    ("classic_attention_layers: [mid_block.attentions.0]\n", "classic_attention_layers"),
    ("classes:\n  - {name: x, prompt: y z, focus: [w]}\n", "classes.0"),
    ("batch_size: 0\n", "batch_size"),
    ("batch_size: big\n", "batch_size"),
    ("batch_size: true\n", "batch_size"),
    ("classes: [{name: cat, prompt: ' '}]\n", "classes.0"),  # no words: no tokens to read a map from
    ("classes: ['']\n", "classes.0: a class has an empty name"),
    ("classes: cat, dog\n", "classes: classes is a list of class names, e.g. classes: \\[cat, dog, sofa\\], not the "
                            "text 'cat, dog'"),
    ("goca: {blur_kernel: 4}\n", "goca.blur_kernel"),  # an even blur grows the map by a pixel
    ("diffseg: {anchors: 65}\n", r"\(top level\): diffseg.anchors is 65, but at image_size 512"),  # 65 x 65 at once
    ("crf: maybe\n", "crf: crf is true, false or its keys, e.g. crf: {enabled: true, preset: label}; not 'maybe'"),
    ("crf:\n", "crf: crf is true, false or its keys"),
    ("cross_attention: {layers: [1]}\n", "cross_attention.layers.0: Input should be a valid dictionary$"),  # no class
    ("iteration: 3\n", r"iteration: not a config key \(did you mean 'iterations'\?\)$"),
    ("classes: [{name: a, prompt: a, focs: [a]}]\n", r"classes.0.focs: not a config key \(did you mean 'focus'\?\)$"),
    ("model: tiny\n", r"model: not a config key: pass it on the command line \(--model\)$"),
    ("goca: {zzz: 1}\n", "goca.zzz: not a config key; here the keys are timestep, reference_layer, "),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"key {key}"):
        load_config(path)


def test_crf_true_is_short_for_its_section_and_a_file_of_no_keys_says_so(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("crf: true\n")
    assert load_config(path).crf == SegmenterConfig().with_crf(True).crf
    path.write_text("crf: false\n")
    assert load_config(path) == SegmenterConfig()
    for text, what in (("- batch_size: 16\n", "a list"), ("batch_size 16\n", "text")):
        path.write_text(text)
        with pytest.raises(ConfigError) as error:
            load_config(path)
        assert str(error.value) == (f"config file {path} holds {what}, not keys with values (such as `batch_size: "
                                    "16`): write the keys docs/method.md lists, one a line")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ent: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML") as error:
        load_config(bad)
    assert "\n" not in str(error.value)  # the CLI's one line
    indented = tmp_path / "indented.yaml"
    indented.write_text("iterations: 1\n  ent: 2\n")
    with pytest.raises(ConfigError) as error:
        load_config(indented)
    assert str(error.value) == (f"config file {indented} is not valid YAML: mapping values are not allowed here at "
                                "line 2, column 6: fix the file")
    binary = tmp_path / "model.safetensors"  # passed as --config by mistake
    binary.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\xff}")
    with pytest.raises(ConfigError) as error:
        load_config(binary)
    assert str(error.value) == f"config file {binary} is not UTF-8 text (byte 9): pass the YAML file"
    # an mmsegmentation config (they train on the exported masks) passed as ours
    mmseg_config = tmp_path / "deeplabv3plus_pseudo-voc12aug.py"
    mmseg_config.write_text("_base_ = ['./pseudo_voc12_aug.py']\ncrop_size = (512, 512)\n")
    with pytest.raises(ConfigError) as error:
        load_config(mmseg_config)
    assert str(error.value) == (f"config file {mmseg_config} is Python, as mmsegmentation's configs are (they train "
                                "on the exported masks: docs/training.md): --config takes this tool's YAML file "
                                "(configs/voc.yaml) or a built-in name (voc, coco)")


def test_batch_size_auto_is_one_image_on_a_cpu_and_a_full_batch_on_a_gpu(tmp_path):
    config = SegmenterConfig()
    assert config.batch_size == "auto"
    assert config.batch_size_on("cpu") == 1  # the official one-image arithmetic, at no cost on a CPU
    assert config.batch_size_on("cuda") == 16
    path = tmp_path / "batch.yaml"
    path.write_text("batch_size: 8\n")
    assert load_config(path).batch_size_on("cpu") == load_config(path).batch_size_on("cuda") == 8


def test_classes_given_by_name_alone_are_their_own_prompts(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("classes: [cat, dining table, {name: tv, prompt: tv monitor, focus: [monitor]}]\n")
    classes = load_config(config).classes
    assert [(c.name, c.prompt, c.focus) for c in classes] == [("cat", "cat", None), ("dining table", "dining table", None),
                                                              ("tv", "tv monitor", ["monitor"])]
    config.write_text("classes: [cat, cat]\n")
    with pytest.raises(ConfigError, match="class names must be unique .*, repeated: \\['cat'\\]"):
        load_config(config)
    config.write_text("classes: [Cat, dog, cat]\n")  # one class under two spellings
    with pytest.raises(ConfigError, match="ignoring case, spaces, '_' and '-'\\), repeated: \\['Cat', 'cat'\\]"):
        load_config(config)


def test_the_background_is_no_class_to_list_or_label(tmp_path):
    config = tmp_path / "mmseg-style.yaml"  # mmsegmentation's VOC class list starts with it
    config.write_text("classes: [background, aeroplane, bicycle]\n")
    with pytest.raises(ConfigError, match="classes lists 'background': every mask has the background as value 0, "
                                          "and the classes are 1, 2, ... in list order; leave it out of classes"):
        load_config(config)
    with pytest.raises(ConfigError, match="^label 'Background' is no class: every mask has the background \\(value 0\\); "
                                          "leave it out of the labels$"):
        SegmenterConfig().class_index("Background")


def test_more_classes_than_an_8_bit_mask_holds_are_refused(tmp_path):
    config = tmp_path / "vocabulary.yaml"
    config.write_text("classes: [" + ", ".join(f"c{i}" for i in range(254)) + "]\n")
    assert len(load_config(config).classes) == 254  # values 1..254; 255 stays ignore
    config.write_text("classes: [" + ", ".join(f"c{i}" for i in range(255)) + "]\n")
    with pytest.raises(ConfigError, match="255 classes, but a mask is an 8-bit PNG .* configs of at most 254"):
        load_config(config)
