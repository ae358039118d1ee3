"""The one `pgolf` command. Each package contributes its subcommands through `register`."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
from typing import Iterator

# Modules that define `register(subparsers)`; order is the order of `pgolf --help`.
_SUBCOMMAND_MODULES = (
    "pgolf_codec.cli",   # pack, unpack, inspect, verify
    "pgolf_train.cli",   # data
    "pgolf.training",    # train, quantize
    "pgolf_eval.cli",    # eval
    "pgolf.run",         # run
    "pgolf.submit",      # submit
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgolf", description="Parameter golf: the best language model in 16,000,000 bytes — data, "
        "training, artifacts and exact bits per byte. `pgolf run` does it all.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a package still being built must not break the others
            if e.name != name:
                raise
            continue
        module.register(sub)
    if "inspect" in sub.choices:  # the codec's command, plus the challenge's count (it needs the bundler above it)
        from pgolf.challenge import with_challenge_count

        cmd = sub.choices["inspect"]
        cmd.set_defaults(func=with_challenge_count(cmd.get_default("func")))
    return parser


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, so a command removes its half-written outputs."""


_handler_owner: list[int] = []  # the pid whose SIGTERM handler raises Terminated, while one does


def _default_sigterm_in_child() -> None:
    # A forked worker (a tokenizer pool's) must die on SIGTERM at once, even blocked in C, as before.
    if _handler_owner:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        except ValueError:  # forked from a thread other than the main one
            pass


os.register_at_fork(after_in_child=_default_sigterm_in_child)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into ``Terminated`` in this process for the block (main thread only).

    Forked children get the default action back, so pools that terminate their workers with
    SIGTERM still work; the handler checks the pid too, should a child keep it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    _handler_owner.append(owner)
    try:
        yield
    finally:
        _handler_owner.pop()
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _sigterm_unwinds():
            rc = args.func(args)
    except KeyboardInterrupt:
        print("pgolf: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("pgolf: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:  # `pgolf inspect ... | head`: the reader left; that is not an error
        sys.stderr.close()
        return 0
    except (ValueError, OSError) as e:  # FormatError, ShardError, ConfigError are ValueErrors
        print(f"pgolf {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
