"""Progress bars in a log: lines now and then, not one line rewritten at every step."""

import io

from tqdm import tqdm

from pipeline.progress import LogLines, progress_stream


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_bar_in_a_log_writes_a_line_every_interval_and_its_last_state():
    """Piped to a file (nohup, `ray job logs`), tqdm rewrote one line with a carriage return at
    every batch: thousands of times over a long job, one unreadable line."""
    log, clock = io.StringIO(), _Clock()
    stream = LogLines(log, interval_s=30.0, clock=clock)
    with tqdm(total=100, unit="img", file=stream, mininterval=0, miniters=1) as bar:
        for _ in range(100):
            clock.now += 1.0
            bar.update(1)
            bar.set_postfix_str(f"{bar.n / clock.now:.2f} images/s", refresh=True)
        tqdm.write("shard 3 failed: a message", file=stream)
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # the first state, one each 30 s (at 30, 60, 90 s), the message, then the last state
    assert [line.split("|")[0].strip() for line in lines if "%" in line] == ["0%", "30%", "60%", "90%", "100%"]
    assert lines[-2] == "shard 3 failed: a message" and lines[-1].startswith("100%") and "100/100" in lines[-1]


def test_a_bar_done_in_one_step_writes_one_line():
    """Sharding one shard under `ray job logs` wrote `sharding: 100%|...| 48/48 [00:01<00:00,
    33.29img/s]` and again with 33.26img/s: the first state and the closing one, the same count."""
    log, clock = io.StringIO(), _Clock()
    # a delay, as the commands' bars have: the first state drawn is the first update's
    with tqdm(total=48, unit="img", desc="sharding", file=LogLines(log, clock=clock), mininterval=0,
              delay=1e-6) as bar:
        clock.now += 1.0
        bar.update(48)
    assert [line.split(" [")[0] for line in log.getvalue().splitlines()] == ["sharding: 100%|██████████| 48/48"]


def test_a_bar_on_a_terminal_draws_as_tqdm_does():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal, log = Terminal(), io.StringIO()
    assert progress_stream(terminal) is terminal
    assert isinstance(progress_stream(log), LogLines)


def test_a_log_stream_flushes_the_stream_under_it():
    """tqdm flushes its file after each status; LogLines passes that on (a helper once written
    inside the class body had left LogLines without its flush)."""
    class Counted(io.StringIO):
        flushes = 0

        def flush(self):
            self.flushes += 1

    log = Counted()
    LogLines(log).flush()
    assert log.flushes == 1
