"""The ``train`` command: ``llama-mini train`` and ``python train.py`` run this.

Train a LLaMA-style model: one process, or model x data parallel under torchrun.

    llama-mini train                                  # debug model on the built-in data, a few CPU minutes
    llama-mini train --preset homework --data.policy best-fit
    llama-mini train --config my.toml --model.dim 256 --schedule.steps 2000
    torchrun --nproc_per_node=4 train.py --parallel.model 2     # 2-way model x 2-way data parallel
    llama-mini train evaluate --checkpoint runs/debug/checkpoints --context 256 1024 --rope-scaling none linear:4
    llama-mini train --help                           # every option, its default and its meaning

Outputs go to ``runs/<run.name>/``: metrics.jsonl, loss.png, train.log, config.json, sample.txt and
checkpoints/ (Meta-format weights + exact-resume state). Running the same command again resumes
from the latest checkpoint. See docs/training.md. (``python train.py`` in a checkout and
``llama-mini train`` are the same job; under torchrun, give it ``train.py`` or
``-m llama_mini train``.)
"""

from __future__ import annotations

import sys
import textwrap

from .config import ConfigError

__all__ = ["main"]


def _help(prog: str) -> str:
    from .config import SECTIONS, TRAIN_PRESETS, option_table

    head = textwrap.dedent(__doc__.split("\n\n", 1)[1]).strip()
    out = [
        f"usage: {prog} [--preset NAME] [--config FILE.toml|.json ...] [--section.option VALUE ...]",
        f"       {prog} evaluate --help",
        "", head, "",
        "options:",
        "  --help                 show this message and exit",
        f"  --preset NAME          named preset applied first: {', '.join(TRAIN_PRESETS)} (default: debug)",
        "  --config FILE          a .toml or .json file of options (tables = sections); repeatable, later wins",
        "  --print-config         print the resolved configuration as JSON and exit",
        "",
        "Every option below is --section.option VALUE (or --section.option=VALUE; a bare boolean flag means",
        "true; lists are comma-separated). Precedence: defaults < preset < config files < command line.",
    ]
    rows = option_table()
    width = max(len(name) for name, _, _ in rows) + 2
    section = None
    for name, default, doc in rows:
        head = name.split(".")[0]
        if head != section:
            section = head
            title = (SECTIONS[head].__doc__ or "").strip().splitlines()[0]
            out += ["", f"{head}: {title}"]
        text = f"{doc} [default: {default}]"
        lines = textwrap.wrap(text, width=max(40, 110 - width)) or [""]
        out.append(f"  --{name:<{width}}{lines[0]}")
        out += [" " * (width + 4) + line for line in lines[1:]]
    return "\n".join(out)


def _split_args(argv: list[str]) -> tuple[str, list[str], bool, list[str]]:
    preset, files, show, rest = "debug", [], False, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--preset", "--config"):
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value")
            if arg == "--preset":
                preset = argv[i + 1]
            else:
                files.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith(("--preset=", "--config=")):
            key, value = arg[2:].split("=", 1)
            if key == "preset":
                preset = value
            else:
                files.append(value)
        elif arg == "--print-config":
            show = True
        else:
            rest.append(arg)
        i += 1
    return preset, files, show, rest


def main(argv: list[str] | None = None, prog: str = "llama-mini train") -> int:
    """Parse ``argv`` (the options after the command name) and run the job; the exit status.
    A bad option or value prints one line and returns 2; a failure of the run itself raises and
    is reported by ``llama_mini.cli.run_guarded`` (one line per failing rank, exit 1)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "evaluate":  # python train.py evaluate ...: the evaluate command
        from ..cli import run_command

        return run_command("evaluate", argv[1:], prog=f"{prog} evaluate")
    if "--help" in argv or "-h" in argv:
        print(_help(prog))
        return 0
    from .config import load_config

    try:
        preset, files, show, rest = _split_args(argv)
        cfg = load_config(preset, files, rest)
    except ConfigError as e:
        print(f"{prog}: error: {e} (see {prog} --help)", file=sys.stderr)
        return 2
    if show:
        import json

        print(json.dumps(cfg.to_dict(), indent=2))
        return 0

    from .distributed import teardown
    from .trainer import Trainer

    Trainer(cfg).run()
    teardown()
    return 0
