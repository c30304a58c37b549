"""Cat-Cross prompts and token positions with the real CLIP tokenizer."""

from pathlib import Path

import pytest

from pipeline.config import SegmenterConfig, VOC_CLASS_NAMES, load_config
from pipeline.segment.prompts import PromptError, build_class_prompt

VOC = SegmenterConfig()


def test_tokenizer_gives_the_released_clip_ids(tokenizer):
    assert tokenizer("a photograph of cat")["input_ids"] == [49406, 320, 8853, 539, 2368, 49407]
    assert len(tokenizer) == 49408
    assert tokenizer.pad_token == "!"


def test_prompt_text_follows_the_reference_rule(tokenizer):
    prompt = build_class_prompt(tokenizer, [VOC.classes[7], VOC.classes[17]], VOC.background_context)
    assert prompt.text == ("a photograph of cat and sofa and other object and background, "
                           "ground, land, grass, tree, building, wall, sky, lake, water")
    assert prompt.columns == [[4], [6]]


@pytest.mark.parametrize("index", range(20))
def test_token_columns_of_every_voc_class_hold_its_focus_words(tokenizer, index):
    spec = VOC.classes[index]
    prompt = build_class_prompt(tokenizer, [spec], VOC.background_context)
    ids = tokenizer(prompt.text, padding="max_length", max_length=77)["input_ids"]
    (columns,) = prompt.columns
    picked = tokenizer.decode([ids[c] for c in columns]).replace(" ", "")
    assert picked == "".join(spec.focus_words)
    assert columns == list(range(columns[0], columns[-1] + 1)), "a word's tokens are adjacent"
    assert columns[0] == 4 + (spec.prompt.split().index(spec.focus_words[0]) if spec.focus else 0)


def test_multi_word_names_use_the_reference_tokens(tokenizer):
    by_name = {c.name: c for c in VOC.classes}
    classes = [by_name["diningtable"], by_name["pottedplant"], by_name["tvmonitor"]]
    prompt = build_class_prompt(tokenizer, classes, VOC.background_context)
    ids = tokenizer(prompt.text)["input_ids"]
    words = [[tokenizer.decode([ids[c]]) for c in cols] for cols in prompt.columns]
    assert words == [["dining", "table"], ["plant"], ["monitor"]]


def test_positions_stay_right_after_multi_token_words(tokenizer):
    # "motorbike" is more than one BPE token here? Either way the class after it must be found.
    by_name = {c.name: c for c in VOC.classes}
    prompt = build_class_prompt(tokenizer, [by_name["motorbike"], by_name["person"]], VOC.background_context)
    ids = tokenizer(prompt.text)["input_ids"]
    assert tokenizer.decode([ids[c] for c in prompt.columns[1]]) == "person"
    assert tokenizer.decode([ids[c] for c in prompt.columns[0]]).replace(" ", "") == "motorbike"


def test_all_twenty_voc_classes_fit_in_one_prompt(tokenizer):
    prompt = build_class_prompt(tokenizer, VOC.classes, VOC.background_context)
    assert max(prompt.all_columns) < 76


def test_too_many_classes_for_the_text_encoder_is_a_clear_error(tokenizer):
    coco = load_config(Path(__file__).resolve().parents[1] / "configs" / "coco.yaml")
    with pytest.raises(PromptError, match="needs .* tokens but the text encoder takes 77"):
        build_class_prompt(tokenizer, coco.classes[:40], coco.background_context)


def test_all_voc_names_are_configured():
    assert VOC.class_names == list(VOC_CLASS_NAMES)


def test_coco_prompt_is_the_official_text_and_reads_the_official_words(tokenizer):
    coco = load_config(Path(__file__).resolve().parents[1] / "configs" / "coco.yaml")
    by_name = {c.name: c for c in coco.classes}
    names = ["person", "motorcycle", "traffic_light", "couch", "tv"]
    prompt = build_class_prompt(tokenizer, [by_name[n] for n in names], coco.background_context)
    # The official text, but for the trailing space after "railway," (the tokenizer drops it).
    assert prompt.text == ("a photograph of people and motorbike and traffic light and sofa and tv monitor "
                           "and other object and background, ground, land, grass, tree, building, wall, "
                           "sky, lake, water, river, sea, railway,")
    assert tokenizer(prompt.text)["input_ids"] == tokenizer(prompt.text + " ")["input_ids"]
    ids = tokenizer(prompt.text)["input_ids"]
    words = [tokenizer.decode([ids[c] for c in cols]).replace(" ", "") for cols in prompt.columns]
    assert words == ["people", "motorbike", "light", "sofa", "monitor"]
