"""bench/sweep.py: a tiny grid on the synthetic corpus trains every configuration for the same
steps and tokens, lists the ones ModelArgs rejects as skipped with the reason, and writes tables,
marginals and conclusions that agree with its own numbers; bad grids fail naming the option."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import math
import os
import statistics
import sys

import pytest
import torch

from llama_mini import ModelArgs, count_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "sweep.py")
STEPS, BATCH_TOKENS = 6, 32
GRID = {"dim": [16, 32], "n_heads": [2, 3], "n_layers": [1], "max_seq_len": [8, 16, 64]}


@pytest.fixture(scope="module")
def sweep():
    bench = os.path.join(ROOT, "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    spec = importlib.util.spec_from_file_location("sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()  # main() applies --threads to this pytest worker
    yield
    torch.set_num_threads(n)


def data_args(train_data):
    return ["--data", train_data.train, "--val-data", train_data.val, "--tokenizer", train_data.tokenizer,
            "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def result(sweep, train_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    n = torch.get_num_threads()
    grid = [f"{k}={','.join(map(str, v))}" for k, v in GRID.items()]
    assert sweep.main(["--quick", "--grid", *grid, "--steps", str(STEPS), "--batch-tokens", str(BATCH_TOKENS),
                       "--val-tokens", "64", "--evals", "3", "--out", str(out), *data_args(train_data)]) == 0
    torch.set_num_threads(n)
    data = json.loads((out / "results.json").read_text())
    return out, data["metadata"], data["results"]


def test_every_configuration_is_a_row(result):
    _, _, rows = result
    combos = {tuple(r[k] for k in GRID) for r in rows}
    assert len(rows) == len(combos) == math.prod(len(v) for v in GRID.values())
    assert combos == set(itertools.product(*GRID.values()))
    for r in rows:
        if r["n_heads"] == 3:  # neither 16 nor 32 divides by 3: ModelArgs refuses, never dropped silently
            assert r["status"] == "skipped" and "divisible by n_heads" in r["reason"], r
        elif r["max_seq_len"] == 64:  # 32 tokens per step cannot hold one 64-token window
            assert r["status"] == "skipped" and "batch size would be 0" in r["reason"], r
        else:
            assert r["status"] == "ok", r


def test_runs_are_equal_compute_and_consistent(result, train_data):
    _, meta, rows = result
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 4
    vocab = rows[0]["vocab"]
    for r in ok:
        st = r["train_steps"]
        assert st["step"] == list(range(1, STEPS + 1))
        assert r["tokens_seen"] == sum(st["tokens"]) == STEPS * BATCH_TOKENS == st["tokens_seen"][-1]
        assert r["batch_size"] * r["max_seq_len"] == r["tokens_per_step"] == BATCH_TOKENS
        assert all(math.isfinite(x) for x in st["loss"])
        ev = r["evals"]
        assert ev[0]["step"] == 0 and ev[-1]["step"] == STEPS and len(ev) >= 4
        assert r["final_val_loss"] == ev[-1]["val_loss"] and r["best_val_loss"] == min(e["val_loss"] for e in ev)
        assert r["val_ppl"] == pytest.approx(math.exp(r["final_val_loss"]))
        tail = max(1, STEPS // 10)
        want = sum(a * b for a, b in zip(st["loss"][-tail:], st["tokens"][-tail:])) / sum(st["tokens"][-tail:])
        assert r["final_train_loss"] == pytest.approx(want)
        assert abs(ev[0]["val_loss"] - math.log(vocab)) < 0.5  # a fresh model is near uniform
        args = ModelArgs.preset("debug", vocab_size=vocab, n_kv_heads=None,
                                **{k: r[k] for k in GRID})
        assert r["params"] == count_params(args)
        assert r["val_tokens"] == 64
    # same stream, same lr schedule: the learning rate of step k is the same in every run
    assert len({tuple(r["train_steps"]["lr"]) for r in ok}) == 1
    assert meta["train_tokens"] >= STEPS * BATCH_TOKENS


def test_tables_and_conclusions_match_the_numbers(result):
    out, meta, rows = result
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["final_val_loss"])
    for m in meta["marginals"]:
        losses = [r["final_val_loss"] for r in ok if r[m["hyperparameter"]] == m["value"]]
        assert m["runs"] == len(losses)
        if losses:
            assert m["mean_val"] == pytest.approx(statistics.fmean(losses)) and m["min_val"] == min(losses)
    report = (out / "report.md").read_text()
    assert f"Best configuration: **{ok[0]['label']}**, final val loss {ok[0]['final_val_loss']:.3f}" in report
    table = report.split("## Final validation loss, best first")[1].split("##")[0]
    body = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(body) == len(ok)
    for line, r in zip(body, ok):  # sorted best first, one line per finished run
        assert f"| {r['final_val_loss']:.3f} |" in line
    skipped = report.split("## Not trained or diverged")[1].split("##")[0]
    assert skipped.count("| skipped |") == len(rows) - len(ok)
    assert "**dim**" in report and "What the numbers say" in report
    assert "Strongest pair: **dim x max_seq_len**" in report  # n_heads and n_layers have one measured value
    lines = [line for line in (out / "results.csv").read_text().splitlines() if not line.startswith("#")]
    assert len(list(csv.DictReader(lines))) == len(rows)
    if importlib.util.find_spec("matplotlib"):
        for hp in GRID:
            assert (out / f"curves_{hp}.png").stat().st_size > 0 and f"(curves_{hp}.png)" in report


def test_effects_rank_the_spread(sweep):
    grid = {"dim": [32, 64], "n_layers": [1, 2]}
    rows = [{"status": "ok", "dim": d, "n_layers": n, "final_val_loss": loss, "label": f"{d}/{n}"}
            for d, n, loss in [(32, 1, 5.0), (32, 2, 4.5), (64, 1, 4.0), (64, 2, 4.2)]]
    marg = sweep.marginals(rows, grid)
    lines = sweep.effects(marg, grid, min(rows, key=lambda r: r["final_val_loss"]), rows)
    assert lines[0].startswith("1. **dim**") and "dim=64 gives the lowest" in lines[0] and "falls as dim" in lines[0]
    assert "a spread of 0.650" in lines[0] and "the best run also has dim=64" in lines[0]
    # within a dim the losses differ by 0.5 and 0.2: pooled std sqrt((0.125 + 0.02) / 2) = 0.269 < 0.65
    assert "larger than the spread among runs sharing a value (pooled std 0.269)" in lines[0]
    assert lines[1].startswith("2. **n_layers**") and "n_layers=2 gives the lowest" in lines[1]
    assert "smaller than the spread among runs sharing a value" in lines[1]
    assert "but the best run has n_layers=1" in lines[1] and "falls as n_layers" in lines[1]


def test_strongest_pair_finds_an_interaction(sweep):
    grid = {"dim": [32, 64], "n_layers": [1, 2], "n_heads": [2]}
    losses = {(32, 1): 4.0, (32, 2): 5.0, (64, 1): 5.1, (64, 2): 4.1}  # marginal means differ by 0.1 only
    rows = [{"status": "ok", "dim": d, "n_layers": n, "n_heads": 2, "final_val_loss": x}
            for (d, n), x in losses.items()]
    text = sweep.strongest_pair(rows, grid, sweep.marginals(rows, grid))
    assert text.startswith("- Strongest pair: **dim x n_layers**") and "(spread 1.100 nats)" in text
    assert text.index("dim=32, n_layers=1: 4.000") < text.index("dim=64, n_layers=1: 5.100")
    assert "more than twice the larger spread of their marginal means (0.100)" in text
    additive = {(32, 1): 4.0, (32, 2): 4.1, (64, 1): 5.0, (64, 2): 5.1}  # no interaction
    rows = [dict(r, final_val_loss=additive[(r["dim"], r["n_layers"])]) for r in rows]
    assert "interact" not in sweep.strongest_pair(rows, grid, sweep.marginals(rows, grid))


@pytest.mark.parametrize("grid, words", [
    (["foo=1,2"], ["--grid", "unknown ModelArgs field 'foo'"]),
    (["dim=32,abc"], ["--grid", "dim must be an integer, got 'abc'"]),
    (["dim"], ["--grid", "FIELD=V1,V2"]),
    (["dim=32", "dim=64"], ["--grid", "dim is given twice"]),
    (["rope_scaling=x"], ["--grid", "rope_scaling: cannot set a field of type"]),
])
def test_bad_grid_is_refused(sweep, capsys, grid, words):
    with pytest.raises(SystemExit) as e:
        sweep.main(["--quick", "--grid", *grid])
    assert e.value.code == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err


def test_field_values_take_the_field_type(sweep):
    assert sweep.field_value("n_kv_heads", "none") is None and sweep.field_value("n_kv_heads", "2") == 2
    assert sweep.field_value("activation_checkpointing", "true") is True
    assert sweep.field_value("norm_eps", "1e-6") == 1e-6 and sweep.field_value("attn_backend", "eager") == "eager"
    with pytest.raises(ValueError, match="dim must be an integer, got '1.5'"):
        sweep.field_value("dim", "1.5")


def test_too_little_data_names_the_options(sweep, train_data, capsys, keep_threads):
    with pytest.raises(SystemExit) as e:
        sweep.main(["--quick", "--steps", "100000", *data_args(train_data)])
    assert e.value.code == 2 and "--steps x --batch-tokens" in capsys.readouterr().err
