"""Train a LLaMA-style model: one process, or model x data parallel under torchrun.

    python train.py                                   # debug model on the built-in data, a few CPU minutes
    python train.py --preset homework --data.policy best-fit
    python train.py --config my.toml --model.dim 256 --schedule.steps 2000
    torchrun --nproc_per_node=4 train.py --parallel.model 2          # 2-way model x 2-way data parallel
    python train.py evaluate --checkpoint runs/debug/checkpoints --context 256 1024 --rope-scaling none linear:4
    python train.py --help                            # every option, its default and its meaning

Outputs go to ``runs/<run.name>/``: metrics.jsonl, loss.png, train.log, config.json, sample.txt and
checkpoints/ (Meta-format weights + exact-resume state). Running the same command again resumes
from the latest checkpoint. See docs/training.md.
"""

from __future__ import annotations

import os
import sys
import textwrap


def _help() -> str:
    from llama_mini.training.config import SECTIONS, TRAIN_PRESETS, option_table

    head = textwrap.dedent(__doc__).strip()
    out = [
        "usage: python train.py [--preset NAME] [--config FILE.toml|.json ...] [--section.option VALUE ...]",
        "       python train.py evaluate --help",
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
                raise SystemExit(f"error: {arg} needs a value")
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "evaluate":
        from llama_mini.training.evaluate import main as evaluate_main

        return evaluate_main(argv[1:])
    if "--help" in argv or "-h" in argv:
        print(_help())
        return 0
    from llama_mini.training.config import ConfigError, load_config

    try:
        preset, files, show, rest = _split_args(argv)
        cfg = load_config(preset, files, rest)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if show:
        import json

        print(json.dumps(cfg.to_dict(), indent=2))
        return 0

    from llama_mini.training.distributed import teardown
    from llama_mini.training.trainer import Trainer

    rank = os.environ.get("RANK", "0")
    try:
        Trainer(cfg).run()
    except KeyboardInterrupt:
        print(f"rank {rank}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every rank reports its own failure; torchrun then stops the others
        print(f"rank {rank}: error: {type(e).__name__}: {e}", file=sys.stderr)
        if os.environ.get("LLAMA_MINI_TRACEBACK"):
            raise
        return 1
    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
