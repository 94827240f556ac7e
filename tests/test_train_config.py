"""The trainer's configuration: sections, presets, files, dotted overrides, --help, and errors that
name the field and what it accepts, before any work starts."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from llama_mini.training.config import (
    SECTIONS, TRAIN_PRESETS, ConfigError, TrainConfig, field_docs, load_config, option_table,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_are_the_debug_run():
    cfg = load_config()
    assert cfg.model_preset == "debug" and cfg.model.dim == 64 and cfg.model.vocab_size == -1
    assert cfg.data.train == [] and cfg.data.policy == "pad+impute"
    assert cfg.warmup_steps() == 30  # -1 = 5% of 600
    assert cfg.run_dir() == os.path.join("runs", "debug")


def test_overrides_parse_by_field_type():
    cfg = load_config(overrides=[
        "--model.dim", "128", "--model.n_kv_heads=1", "--model.norm_eps", "1e-6", "--data.policy", "informed",
        "--data.tolerance", "50", "--data.train", "a.jsonl.zst, b/*.zst", "--data.shuffle", "false",
        "--model.activation_checkpointing", "--run.compile", "--model.rope_scaling.type", "linear",
        "--model.rope_scaling.factor", "4", "--parallel.timeout_s", "60",
    ])
    assert cfg.model.dim == 128 and cfg.model.n_kv_heads == 1 and cfg.model.norm_eps == 1e-6
    assert cfg.data.tolerance == 50 and cfg.data.train == ["a.jsonl.zst", "b/*.zst"] and cfg.data.shuffle is False
    assert cfg.model.activation_checkpointing is True and cfg.run.compile is True  # bare flags mean true
    assert cfg.model.rope_scaling.type == "linear" and cfg.model.rope_scaling.factor == 4.0
    assert cfg.parallel.timeout_s == 60.0
    assert load_config(overrides=["--model.ffn_dim_multiplier", "none"]).model.ffn_dim_multiplier is None


def test_model_preset_applies_before_model_fields_wherever_given(tmp_path):
    cfg = load_config(overrides=["--model.n_layers", "3", "--model.preset", "homework"])
    assert cfg.model.dim == 512 and cfg.model.n_layers == 3 and cfg.model.vocab_size == -1
    assert load_config(overrides=["--model.preset", "homework", "--model.vocab_size", "32000"]).model.vocab_size == 32000


def test_presets_files_and_command_line_in_order(tmp_path):
    toml = tmp_path / "a.toml"
    toml.write_text('[model]\ndim = 96\nn_heads = 4\n[optim]\nlr = 0.01\n[schedule]\nsteps = 50\n'
                    '[model.rope_scaling]\ntype = "ntk"\nfactor = 2.0\n')
    js = tmp_path / "b.json"
    js.write_text(json.dumps({"optim": {"lr": 0.02}, "data.batch_size": 3}))
    cfg = load_config("homework", [str(toml), str(js)], ["--schedule.steps", "170"])
    assert cfg.model_preset == "homework" and cfg.model.dim == 96  # preset's model, file's dim
    assert cfg.optim.lr == 0.02  # the later file wins
    assert cfg.data.batch_size == 3 and cfg.schedule.steps == 170  # command line wins
    assert cfg.run.name == "homework" and cfg.model.rope_scaling.type == "ntk"
    # a config written out loads back to the same config
    out = tmp_path / "round.json"
    out.write_text(json.dumps(cfg.to_dict()))
    assert load_config(files=[str(out)]).to_dict() == cfg.to_dict()
    for name in TRAIN_PRESETS:
        load_config(name)


def test_every_option_is_documented_and_in_help():
    rows = option_table()
    names = [r[0] for r in rows]
    assert len(names) == len(set(names))
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{section}.{f.name} has no trailing comment"
            assert any(n == f"{section}.{f.name}" or n.startswith(f"{section}.{f.name}.") for n in names)
    assert all(doc for _, _, doc in rows)
    out = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for name in names:
        assert f"--{name} " in out.stdout, name
    assert "pad+impute" in out.stdout and "packed-docmask" in out.stdout  # policy choices listed


@pytest.mark.parametrize("override, message", [
    (["--model.dimm", "3"], "unknown option 'model.dimm'; did you mean model.dim"),
    (["--data.policy", "pad+truncate"], "data.policy: 'pad+truncate' is not one of best-fit, discard, impute"),
    (["--run.precision", "fp8"], "run.precision: 'fp8' is not one of fp32, bf16, fp16"),
    (["--schedule.decay", "step"], "schedule.decay: 'step' is not one of cosine, linear, constant"),
    (["--model.attn_backend", "flash"], "model.attn_backend: 'flash' is not one of"),
    (["--model.norm_impl", "cuda"], "model.norm_impl: 'cuda' is not one of auto"),
    (["--model.dim", "x"], "model.dim must be an integer, got 'x'"),
    (["--data.shuffle", "maybe"], "data.shuffle must be true or false"),
    (["--model.n_heads", "3"], "must be divisible by n_heads"),
    (["--data.batch_size", "0"], "data.batch_size: must be >= 1"),
    (["--optim.lr", "0"], "optim.lr: must be > 0"),
    (["--optim.beta2", "1.0"], "optim.beta2: must be in [0, 1)"),
    (["--schedule.steps", "10", "--schedule.warmup_steps", "20"], "schedule.warmup_steps: 20 exceeds schedule.steps=10"),
    (["--data.policy", "informed"], "data.tolerance: policy 'informed' needs a tolerance"),
    (["--data.tolerance", "5"], "only the 'informed' policy takes a tolerance"),
    (["--data.max_len", "4096"], "data.max_len: 4096 exceeds model.max_seq_len=256"),
    (["--data.val", "x.jsonl"], "data.val: validation sources without training sources"),
    (["--parallel.model", "0"], "parallel.model: must be >= 1"),
    (["--run.name", "a/b"], "run.name: must be a plain directory name"),
    (["--model.preset", "gpt4"], "model.preset 'gpt4' is not one of debug"),
    (["model.dim", "3"], "expected --section.option VALUE"),
])
def test_bad_config_names_the_field_and_the_choices(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=override)
    assert message in str(e.value)


def test_bad_files_and_presets(tmp_path):
    with pytest.raises(ConfigError, match="--preset: unknown preset 'huge'; choose from debug"):
        load_config("huge")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(files=[str(tmp_path / "missing.toml")])
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\ndim = 3")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(files=[str(bad)])
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"optim": {"learning_rate": 1}}))
    with pytest.raises(ConfigError, match=r"typo.json: unknown option 'optim.learning_rate'"):
        load_config(files=[str(typo)])
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"schedule": {"steps": "many"}}))
    with pytest.raises(ConfigError, match=r"wrong.json: schedule.steps must be an integer"):
        load_config(files=[str(wrong)])


def test_bad_config_on_the_command_line_fails_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--run.out_dir", str(tmp_path),
                          "--data.policy", "nope"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("python train.py: error: data.policy: 'nope' is not one of")
    assert out.stderr.count("\n") == 1, out.stderr
    assert os.listdir(tmp_path) == []  # no run directory, no data built
    out = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--print-config", "--model.dim", "96"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["model"]["dim"] == 96


def test_train_config_defaults_validate():
    TrainConfig().validate()
