"""Cat-Cross prompts and the token columns that carry each class.

Positions are computed from the tokenizer itself, word by word, never from a hand table.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ClassSpec


class PromptError(ValueError):
    """A prompt cannot carry the requested classes (e.g. it is longer than the text encoder)."""


@dataclass(frozen=True)
class ClassPrompt:
    """A prompt for one image.

    text: the prompt; columns[i]: positions (in the padded token sequence, start token at 0)
    of the tokens whose cross-attention is averaged into the map of the i-th class given.
    """

    text: str
    columns: list[list[int]]

    @property
    def all_columns(self) -> list[int]:
        return sorted({c for cols in self.columns for c in cols})


def prompt_words(classes: list[ClassSpec], background_context: str) -> list[tuple[str, int | None, bool]]:
    """The prompt as words: (word, index into `classes` or None, whether the word is a focus word).

    "a photograph of " + " and ".join(class prompts) + " and other object and background, "
    + background_context.
    """
    words: list[tuple[str, int | None, bool]] = [(w, None, False) for w in "a photograph of".split()]
    for i, spec in enumerate(classes):
        if i:
            words.append(("and", None, False))
        focus = set(spec.focus_words)
        words.extend((w, i, w in focus) for w in spec.prompt.split())
    tail = "and other object and background, " + background_context
    words.extend((w, None, False) for w in tail.split())
    return words


def build_class_prompt(tokenizer, classes: list[ClassSpec], background_context: str) -> ClassPrompt:
    """Prompt text and token columns for `classes` (in the order given: ascending class index).

    Raises PromptError when a class token would fall beyond the text encoder's length; the
    background context is what gets truncated first.
    """
    words = prompt_words(classes, background_context)
    text = " ".join(w for w, _, _ in words)
    position = 1  # after the start token
    columns: list[list[int]] = [[] for _ in classes]
    all_ids: list[int] = []
    for word, cls, focus in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if cls is not None and focus:
            columns[cls].extend(range(position, position + len(ids)))
        all_ids.extend(ids)
        position += len(ids)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    if whole != all_ids:
        raise PromptError(
            "the tokenizer does not split the prompt word by word, so token positions cannot be located"
        )
    limit = tokenizer.model_max_length - 1  # the last slot holds the end token
    last = max(c for cols in columns for c in cols)
    if last >= limit:
        names = ", ".join(c.name for c in classes)
        raise PromptError(
            f"the prompt for classes [{names}] needs {last + 2} tokens but the text encoder takes "
            f"{tokenizer.model_max_length}: give fewer labels per image or shorter class prompts"
        )
    return ClassPrompt(text=text, columns=columns)
