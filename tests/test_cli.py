"""The ``llama-mini`` command and ``python train.py``: every command answers ``--help``, a bad
argument is one line and exit 2, an expected failure one line and exit 1, a bug keeps its
traceback, and a closed pipe or Ctrl-C ends quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import zstandard

from llama_mini.cli import COMMANDS, main, run_guarded

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line:\n{err}"
    return err.rstrip("\n")


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_answers_help(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llama-mini " + name), out[:200]


def test_the_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, command in COMMANDS.items():
        assert f"  {name} " in out and command.summary in out
    from llama_mini import __version__

    assert main(["--version"]) == 0 and capsys.readouterr().out == f"llama-mini {__version__}\n"


@pytest.mark.parametrize("argv, fragment", [
    ([], "name a command: train, evaluate"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["train", "--model.dimm", "3"], "unknown option 'model.dimm'; did you mean model.dim"),
    (["train", "--preset"], "--preset needs a value"),
    (["evaluate", "--context", "64"], "the following arguments are required: --checkpoint"),
    (["generate", "--checkpoint", "x"], "the following arguments are required: --prompt"),
    (["reshard", "src"], "the following arguments are required: DST, --mp"),
    (["data", "--policy", "nope"], "argument --policy: invalid choice: 'nope'"),
    (["build-data", "--vocab-size", "many"], "argument --vocab-size: invalid int value: 'many'"),
    (["scaling", "--params", "1e9"], "give --flops, or --params together with --tokens"),
    (["aot"], "name a kernel module, e.g. flash_attention"),
])
def test_a_bad_argument_is_one_line_and_exit_2(argv, fragment, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = _one_line(captured.err)
    prefix = "llama-mini " + argv[0] if argv and argv[0] in COMMANDS else "llama-mini"
    assert line.startswith(prefix + ": error: ") and fragment in line, line
    assert captured.out == ""


def _truncated_shard(path) -> str:
    payload = b"".join(json.dumps({"text": f"document {i} " + "word " * 40}).encode() + b"\n" for i in range(200))
    frame = zstandard.ZstdCompressor().compress(payload)
    path.write_bytes(frame[: len(frame) // 2])
    return str(path)


def test_expected_failures_are_one_line_and_exit_1(tmp_path, capsys):
    shard = _truncated_shard(tmp_path / "00.jsonl.zst")
    bad_ckpt = tmp_path / "ckpt"
    bad_ckpt.mkdir()
    (bad_ckpt / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 97}))
    (bad_ckpt / "consolidated.00.pth").write_bytes(os.urandom(3000))
    from llama_mini.data import ensure_default_data

    tokenizer = ensure_default_data().tokenizer
    cases = [
        (["data", "--source", shard, "--tokenizer", tokenizer], "CorruptShardError: " + shard + ": truncated"),
        (["generate", "--checkpoint", str(bad_ckpt), "--prompt", "hi", "--tokenizer", tokenizer],
         "cannot load checkpoint shard " + str(bad_ckpt / "consolidated.00.pth")),
        (["generate", "--checkpoint", str(bad_ckpt), "--prompt", "hi"], "tokenizer model not found"),
        (["reshard", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--mp", "1"], "nowhere"),
        (["evaluate", "--checkpoint", str(tmp_path / "nowhere"), "--data", shard], "nowhere"),
        (["aot", "no_such_kernel"], "no kernel module 'no_such_kernel'"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 1, argv
        line = _one_line(capsys.readouterr().err)
        assert line.startswith(f"llama-mini {argv[0]}: error: ") and fragment in line, (argv, line)


def test_a_bug_keeps_its_traceback_and_the_switch_shows_any(monkeypatch, capsys):
    def bug():
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    with pytest.raises(AttributeError):
        run_guarded("llama-mini x", bug)

    def failure():
        raise FileNotFoundError("/data/missing.jsonl.zst")

    assert run_guarded("llama-mini x", failure) == 1
    assert capsys.readouterr().err == "llama-mini x: error: FileNotFoundError: /data/missing.jsonl.zst\n"
    monkeypatch.setenv("LLAMA_MINI_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        run_guarded("llama-mini x", failure)


def test_messages_stay_on_one_line_and_name_the_rank(monkeypatch, capsys):
    def failure():
        raise RuntimeError("worker failed (exit 1):\n  line one\n\n  line two")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run_guarded("llama-mini train", failure) == 1
    assert capsys.readouterr().err == \
        "llama-mini train (rank 1): error: RuntimeError: worker failed (exit 1): | line one | line two\n"

    def exits():
        raise SystemExit("no GPU here")

    assert run_guarded("llama-mini train", exits) == 1
    assert capsys.readouterr().err == "llama-mini train (rank 1): error: no GPU here\n"

    def interrupted():
        raise KeyboardInterrupt

    assert run_guarded("llama-mini train", interrupted) == 130
    assert capsys.readouterr().err == "llama-mini train (rank 1): interrupted\n"


def test_a_closed_pipe_ends_quietly(tmp_path):
    """``python train.py --help | head``: the reader is gone before the help is written."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--help"], stdout=write,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_train_py_and_llama_mini_train_are_the_same_job(tmp_path):
    args = ["--print-config", "--model.dim", "96", "--data.policy", "best-fit"]
    script = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    module = subprocess.run([sys.executable, "-m", "llama_mini", "train", *args], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert script.returncode == module.returncode == 0, script.stderr + module.stderr
    assert script.stdout == module.stdout and json.loads(script.stdout)["model"]["dim"] == 96
    from llama_mini.data import ensure_default_data

    bad = subprocess.run([sys.executable, "-m", "llama_mini", "train", "--data.train", str(tmp_path / "none"),
                          "--data.tokenizer", ensure_default_data().tokenizer, "--run.out_dir", str(tmp_path / "runs")], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert bad.returncode == 1
    line = _one_line(bad.stderr.splitlines(keepends=True)[-1])
    assert line.startswith("llama-mini train: error: ") and str(tmp_path / "none") in line, bad.stderr[-2000:]
