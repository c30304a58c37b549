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


def test_class_lookup_by_name_or_prompt_words():
    config = SegmenterConfig()
    assert config.class_index("aeroplane") == config.class_index("plane") == 0
    assert config.class_index("dining table") == 10
    with pytest.raises(ConfigError, match="unknown class name 'giraffe'"):
        config.class_index("giraffe")


@pytest.mark.parametrize("text, key", [
    ("ent: -1\n", "ent"),
    ("iterations: many\n", "iterations"),
    ("unknown_key: 3\n", "unknown_key"),
    ("background: {rule: magic}\n", "background.rule"),
    ("crf: {preset: nope}\n", "crf.preset"),
    ("classes:\n  - {name: x, prompt: y z, focus: [w]}\n", "classes.0"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"key {key}"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ent: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
