"""Sample keys are untrusted input: the one check of a key, and the one way to name a file
after a key.

A shard can come from anyone. Its sample keys become tar member names, file names of the
export, ids in the statistics and the training lists, so a key must be a plain file name:
`check_key` says whether it is, and `file_in` builds a path from a key (or any name) that
cannot leave its folder even if a bad key slipped past the check.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import ImageError

# A key plus the longest suffix written after it (".conf.png") must fit in a 255-byte file name.
MAX_KEY_BYTES = 200


class UnsafeKeyError(ImageError, ValueError):
    """A sample key that cannot name a file safely; the message names the key and the rule."""


def key_problem(key: object) -> str | None:
    """Why `key` is not a safe sample key, or None when it is: a non-empty string of at most
    MAX_KEY_BYTES UTF-8 bytes, without path separators, control characters, a leading dot,
    whitespace at either end or a `..` component."""
    if not isinstance(key, str) or not key:
        return "it is empty"
    if "/" in key or "\\" in key:
        return "it holds a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "it holds a control character"
    if key.startswith("."):
        return "it starts with a dot"
    if key != key.strip():
        return "it starts or ends with whitespace"  # a split list's line is read stripped
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        return f"it is longer than {MAX_KEY_BYTES} bytes"
    return None


def check_key(key: object) -> str:
    """`key` when it is a safe sample key; else UnsafeKeyError naming it and the fix."""
    problem = key_problem(key)
    if problem is not None:
        shown = repr(key)
        shown = shown if len(shown) <= 80 else shown[:60] + "..." + shown[-12:]
        raise UnsafeKeyError(f"unsafe sample key {shown}: {problem}; a key must be a plain file name (no '/', "
                             f"'\\', '..', leading dot, whitespace at either end or control characters, at most "
                             f"{MAX_KEY_BYTES} bytes): rename the sample and reshard it")
    return key


def file_in(folder: str | Path, key: str, suffix: str = "") -> Path:
    """folder / (key + suffix), refused (UnsafeKeyError) unless key is a safe sample key and
    the path stays inside folder once resolved (symbolic links included)."""
    check_key(key)
    folder = Path(folder)
    path = folder / f"{key}{suffix}"
    if not path.resolve().is_relative_to(folder.resolve()):
        raise UnsafeKeyError(f"sample key {key!r} would write outside {folder}: rename the sample and reshard it")
    return path
