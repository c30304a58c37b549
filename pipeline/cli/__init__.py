"""The `pseudolabel` command: one module per command group (segment, shard, job, results), the
shared options in options.py. Commands import what they run inside their function, so that
`--help` answers without loading torch or Ray."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from pipeline.cli import job, results, segment, shard
from pipeline.errors import PipelineError

USER_ERRORS = (PipelineError, FileNotFoundError)
# What a full or read-only disk, or a path of the wrong kind, answers: one line that says so and
# the fix, not a traceback.
_FULL_OR_READ_ONLY = ("free space there or make it writable, then run the command again (a job resumes where it "
                      "stopped)")
FILE_SYSTEM_FIXES = {
    **dict.fromkeys((errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM), _FULL_OR_READ_ONLY),
    errno.EEXIST: "a file stands where a folder is needed: pass another path or move that file",
    errno.ENOTDIR: "a file stands where a folder of that path is needed: pass another path or move that file",
    errno.EISDIR: "a folder stands where a file is written: pass a file's path",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pseudolabel")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pseudolabel",
        description="Training-free pixel pseudo masks from image-level labels, read from Stable Diffusion "
                    "attention (iSeg).",
        epilog="start with: pseudolabel demo --model tiny   (then see each command's --help)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    job.register_demo(sub)
    for group in (shard, job, results, segment):  # the order of the work: shard, run, hand off
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unrecognized = parser.parse_known_args(argv)
    if unrecognized:  # as parse_args says it, with the command's hint where it has one
        hint = getattr(args, "unrecognized_hint", None)
        parser.error(f"unrecognized arguments: {' '.join(unrecognized)}" + (f"; {hint}" if hint else ""))
    try:
        status = args.func(args)
        sys.stdout.flush()  # a reader that has gone is seen here, not while Python exits
        return status
    except USER_ERRORS as exc:
        print(f"pseudolabel: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a job's shard loop (which says what it marked): no traceback
        print(f"pseudolabel: {args.command} interrupted", file=sys.stderr)
        return 128 + 2
    except BrokenPipeError:  # the reader of the output has gone (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 128 + 13  # a process ended by SIGPIPE
    except OSError as exc:
        if exc.errno not in FILE_SYSTEM_FIXES:
            raise
        print(f"pseudolabel: error: {exc.strerror}: {exc.filename or 'a file being written'}: "
              f"{FILE_SYSTEM_FIXES[exc.errno]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
