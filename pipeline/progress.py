"""Progress bars (`progress_bar`), drawn where they are read: tqdm's bar on a terminal; in a
log (nohup, `ray job logs`, a batch scheduler's output file) a line at most every
LOG_INTERVAL_S seconds, where tqdm would rewrite one line with carriage returns at every batch
(thousands of times over a COCO job, read back as one line of hundreds of kilobytes)."""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

LOG_INTERVAL_S = 30.0


class LogLines:
    """A text stream for tqdm's `file` in a log. Each status tqdm draws (`\\r` + text) is held
    and written as a line once interval_s has passed since the last one written, and the last
    one when the bar closes, unless the last line written showed the same count (a bar done in
    one step wrote two lines at 100% that differed only in their rate); other text passes
    through."""

    def __init__(self, stream: TextIO, interval_s: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.stream, self.interval_s, self.clock = stream, interval_s, clock
        self.held: str | None = None  # the newest status not yet written
        self.written: str | None = None  # the last status line written
        self.written_at: float | None = None  # when it was written
        self.in_text = False  # passed-through text without its line end yet

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", None) or "utf-8"

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if text.startswith("\r"):  # a status (or tqdm clearing its line: blank)
            status = text.strip()
            if status:
                self.held = status
                now = self.clock()
                if self.written_at is None or now - self.written_at >= self.interval_s:
                    self._write_held(now)
        elif text == "\n" and not self.in_text:  # tqdm closing its bar: the final status
            if self.held is not None and _count(self.held) != _count(self.written):
                self._write_held(self.clock())
        elif text:
            self.stream.write(text)
            self.in_text = not text.endswith("\n")
        return len(text)

    def _write_held(self, now: float) -> None:
        self.stream.write(self.held + "\n")
        self.stream.flush()
        self.held, self.written, self.written_at = None, self.held, now

    def flush(self) -> None:
        self.stream.flush()


def _count(status: str | None) -> str | None:
    """A bar's status up to its times and rate (`sharding: 100%|##| 48/48`, before ` [00:01<...`)."""
    return status.split(" [", 1)[0] if status is not None else None


def progress_stream(stream: TextIO | None = None) -> TextIO | LogLines:
    """The stream progress bars draw on: stream (default sys.stderr) where it is a terminal,
    else a LogLines over it."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return stream if isatty is not None and isatty() else LogLines(stream)


def progress_bar(iterable=None, **options):
    """A tqdm bar (tqdm's options) drawn on `progress_stream()`: every progress bar of the
    commands is made here."""
    from tqdm import tqdm

    return tqdm(iterable, file=progress_stream(), **options)
