"""The ``llama-mini`` command: the training job and the tools, for installed users and checkouts.

    llama-mini train [--preset NAME] [--config FILE] [--section.option VALUE ...]   # = python train.py
    llama-mini evaluate --checkpoint DIR --context 512 2048 --rope-scaling none linear:4
    llama-mini generate --checkpoint DIR --prompt "The meaning of life is"
    llama-mini reshard SRC DST --mp N
    llama-mini data [--source FILES] [--policy NAME] [--max-len N]   # what a policy makes of some data
    llama-mini build-data                                            # build the built-in default data
    llama-mini scaling --flops 1e21 --unique-tokens 1e10
    llama-mini aot flash_attention                                   # compile kernels for sm_80 / sm_90
    llama-mini --help | --version        (python -m llama_mini ... is the same command)

A wheel carries no ``train.py``; ``llama-mini train`` is the same job (``train.py`` calls this).
Every command follows the same rules:

- ``--help`` prints the options and exits 0, also into a pipe that closes early (``| head``);
- a bad argument prints one line, ``llama-mini CMD: error: ... (see llama-mini CMD --help)``, exit 2;
- an expected failure (a missing or corrupt file, a checkpoint that does not fit, bad data, out of
  memory) prints one line, ``llama-mini CMD: error: Type: message``, exit 1; set
  ``LLAMA_MINI_TRACEBACK=1`` to see the traceback as well;
- a bug (``AssertionError``, ``AttributeError``, ``NameError``, ``TypeError``, ...) keeps its
  traceback, because that is what a bug report needs;
- Ctrl-C exits 130; a closed output pipe exits 141 (128 + SIGPIPE) without a traceback.

A command module provides ``build_parser(prog) -> argparse.ArgumentParser`` and
``run(args, parser) -> int``; ``train`` parses its dotted options itself and provides
``main(argv, prog=...) -> int``. The modules of ``llama_mini.kernels`` and ``llama_mini.data`` do not
import this file (dependencies point one way); it imports them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = ["COMMANDS", "Command", "main", "one_line_errors", "run_guarded"]

PROG = "llama-mini"

# Exceptions that mean the code is wrong rather than the input: they keep their traceback.
BUG_TYPES = (AssertionError, AttributeError, NameError, TypeError, IndexError, ZeroDivisionError, RecursionError)
SIGPIPE_EXIT = 141


@dataclass(frozen=True)
class Command:
    """One subcommand: the module that implements it and a one-line summary for ``--help``."""

    name: str
    module: str
    summary: str


COMMANDS = {c.name: c for c in (
    Command("train", "llama_mini.training.command",
            "train a model (one process or under torchrun); the same job as python train.py"),
    Command("evaluate", "llama_mini.training.evaluate",
            "loss and perplexity of a checkpoint at several context lengths and RoPE scalings"),
    Command("generate", "llama_mini.generate", "generate text from a checkpoint on the KV-cache path"),
    Command("reshard", "llama_mini.reshard", "merge or split a checkpoint's model-parallel shards"),
    Command("data", "llama_mini.data.preview",
            "what a sequence-length policy makes of some data: samples, sequences and counts"),
    Command("build-data", "llama_mini.data.builtin", "build the built-in default data and print where it is"),
    Command("scaling", "llama_mini.scaling", "Chinchilla compute-optimal model and data sizes for a budget"),
    Command("aot", "llama_mini.kernels.aot",
            "compile a kernel's configurations for sm_80 / sm_90 without a GPU: spills, shared memory"),
)}


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` report a bad argument as one line on stderr and exit 2 (argparse prints the
    whole usage block first, which for a command with many options buries the message)."""

    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = error  # type: ignore[method-assign]
    return parser


def _describe(exc: BaseException) -> str:
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {' | '.join(lines)}" if lines else type(exc).__name__


def _where() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f" (rank {os.environ.get('RANK', '0')})" if world > 1 else ""


def run_guarded(prog: str, body: Callable[[], int]) -> int:
    """Run a command body under the rules in this module's docstring; returns the exit status."""
    try:
        code = body()
        sys.stdout.flush()  # a closed pipe shows here, inside the guard, not at interpreter exit
        return int(code or 0)
    except SystemExit as e:  # --help (0) and usage errors (2) are already printed
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(f"{prog}{_where()}: error: {e.code}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}{_where()}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``). Point stdout at devnull so the interpreter's final
        # flush does not raise again, as Python's documentation on SIGPIPE recommends.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return SIGPIPE_EXIT
    except BUG_TYPES:
        raise
    except Exception as e:  # expected failures: the message names the file, field or argument
        if os.environ.get("LLAMA_MINI_TRACEBACK"):
            raise
        print(f"{prog}{_where()}: error: {_describe(e)}", file=sys.stderr)
        return 1


def run_command(name: str, argv: Sequence[str], prog: str | None = None) -> int:
    """Run subcommand ``name`` with ``argv`` (its own arguments) and return the exit status."""
    prog = prog or f"{PROG} {name}"

    def body() -> int:
        module = importlib.import_module(COMMANDS[name].module)
        if not hasattr(module, "build_parser"):  # train: dotted options, its own parsing
            return module.main(list(argv), prog=prog)
        parser = one_line_errors(module.build_parser(prog))
        return module.run(parser.parse_args(list(argv)), parser)

    return run_guarded(prog, body)


def _help() -> str:
    width = max(map(len, COMMANDS)) + 2
    rows = [f"  {c.name:<{width}}{c.summary}" for c in COMMANDS.values()]
    return "\n".join([
        f"usage: {PROG} COMMAND [options]      ({PROG} COMMAND --help for a command's options)",
        "", "Train, evaluate and inspect small LLaMA-style models, their data and their kernels.", "",
        "commands:", *rows, "",
        "options:",
        "  -h, --help      show this message and exit",
        "  --version       print the version and exit",
        "",
        "A bad argument exits 2, a failed command 1, each with one line on stderr;",
        "LLAMA_MINI_TRACEBACK=1 also prints the traceback of a failure.",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llama-mini`` console script and of ``python -m llama_mini``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(f"{PROG}: error: name a command: {', '.join(COMMANDS)} (see {PROG} --help)", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        return run_guarded(PROG, lambda: print(_help()) or 0)
    if argv[0] == "--version":
        from . import __version__

        return run_guarded(PROG, lambda: print(f"{PROG} {__version__}") or 0)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{PROG}: error: unknown command {name!r}; commands: {', '.join(COMMANDS)} (see {PROG} --help)",
              file=sys.stderr)
        return 2
    return run_command(name, rest)


if __name__ == "__main__":
    sys.exit(main())
