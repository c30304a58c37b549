"""Cat-Cross prompts and the token columns that carry each class.

Positions are computed from the tokenizer itself, word by word, never from a hand table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import ImageError
from pipeline.config import ClassSpec


class PromptError(ImageError, ValueError):
    """A prompt cannot carry the requested classes (e.g. it is longer than the text encoder)."""


# Words whose tokens carry no content (GoCA's per-pixel rescaling leaves them out).
STOP_WORDS = frozenset({"a", "an", "the", "of", "and", "other", "with", "in", "on"})


@dataclass(frozen=True)
class ClassPrompt:
    """A prompt for one image. Positions are in the padded token sequence (start token at 0).

    text: the prompt; columns[i]: the tokens averaged into the map of the i-th class given;
    background_groups: per background word ("background" and each background-context word),
    its tokens; content_columns: every token of the prompt but the start/end tokens, stop
    words and punctuation.
    """

    text: str
    columns: list[list[int]]
    background_groups: list[list[int]] = field(default_factory=list)
    content_columns: list[int] = field(default_factory=list)

    @property
    def background_columns(self) -> list[int]:
        """The tokens of every background word, in prompt order."""
        return [c for group in self.background_groups for c in group]

    @property
    def all_columns(self) -> list[int]:
        return sorted({c for cols in self.columns for c in cols})


BACKGROUND = -1  # word role: background or a background-context word


PROMPT_STYLES = ("sentence", "list")


def prompt_words(classes: list[ClassSpec], background_context: str | None,
                 style: str = "sentence") -> list[tuple[str, int | None, bool]]:
    """The prompt as words: (word, index into `classes`, BACKGROUND or None, whether the word
    is a focus word of its class).

    "sentence" (iSeg's): "a photograph of " + " and ".join(class prompts) + " and other object
    and background, " + background_context; with background_context None the prompt stops
    after the classes. "list" (GoCA's entity list): ", ".join(class prompts) + ", " +
    background_context + ", background".
    """
    if style == "list":
        words = []
        for i, spec in enumerate(classes):
            focus = set(spec.focus_words)
            *head, last = spec.prompt.split()
            words.extend((w, i, w in focus) for w in head)
            words.append((last + ",", i, last in focus))
        tail = (background_context + ", " if background_context else "") + "background"
        words.extend((w, BACKGROUND, False) for w in tail.split())
        return words
    words: list[tuple[str, int | None, bool]] = [(w, None, False) for w in "a photograph of".split()]
    for i, spec in enumerate(classes):
        if i:
            words.append(("and", None, False))
        focus = set(spec.focus_words)
        words.extend((w, i, w in focus) for w in spec.prompt.split())
    if background_context is not None:
        words.extend((w, None, False) for w in "and other object and".split())
        tail = ("background, " + background_context).split()
        words.extend((w, BACKGROUND, False) for w in tail)
    return words


def build_class_prompt(tokenizer, classes: list[ClassSpec], background_context: str | None,
                       style: str = "sentence") -> ClassPrompt:
    """Prompt text and token columns for `classes` (in the order given: ascending class index),
    in a `prompt_words` style.

    Raises PromptError when a class token would fall beyond the text encoder's length; the
    background context is what gets truncated first.
    """
    words = prompt_words(classes, background_context, style)
    text = " ".join(w for w, _, _ in words)
    # One tokenizer call for every word, its punctuation-stripped core and the whole text.
    distinct = sorted(({w for w, _, _ in words} | {w.strip(",.;:") for w, _, _ in words}) - {""})
    *word_ids, whole = tokenizer(distinct + [text], add_special_tokens=False)["input_ids"]
    ids_of = dict(zip(distinct, word_ids))
    position = 1  # after the start token
    columns: list[list[int]] = [[] for _ in classes]
    background: list[list[int]] = []
    content: list[int] = []
    all_ids: list[int] = []
    for word, role, focus in words:
        ids = ids_of[word]
        core = word.strip(",.;:")
        core_ids = ids_of[core] if core else ids
        core_span = list(range(position, position + len(core_ids))) if core else []
        if role is not None and role >= 0 and focus:
            columns[role].extend(core_span)
        if role == BACKGROUND and core_span:
            background.append(core_span)
        if core and core.lower() not in STOP_WORDS:
            content.extend(core_span)
        all_ids.extend(ids)
        position += len(ids)
    if whole != all_ids:
        raise PromptError(
            "the tokenizer does not split the prompt word by word, so token positions cannot be located"
        )
    limit = tokenizer.model_max_length - 1  # the last slot holds the end token
    background = [group for group in background if group[-1] < limit]
    content = [c for c in content if c < limit]
    last = max(c for cols in columns for c in cols)
    if last >= limit:
        names = ", ".join(c.name for c in classes)
        raise PromptError(
            f"the prompt for classes [{names}] needs {last + 2} tokens but the text encoder takes "
            f"{tokenizer.model_max_length}: give fewer labels per image or shorter class prompts"
        )
    return ClassPrompt(text=text, columns=columns, background_groups=background, content_columns=content)
