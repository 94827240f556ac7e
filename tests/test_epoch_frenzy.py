"""bench/epoch_frenzy.py: runs of D documents x E epochs on the synthetic corpus all see exactly
the same number of training tokens, their unique tokens and epochs are what the first D documents
hold, the overfitting verdicts follow from the curves, and bad runs fail naming the option."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "epoch_frenzy.py")
RUNS, DOC_TOKENS, SEQ, BATCH = "2x8,4x4,16x1", 32, 16, 2


@pytest.fixture(scope="module")
def ef():
    bench = os.path.join(ROOT, "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    spec = importlib.util.spec_from_file_location("epoch_frenzy", SCRIPT)
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
def result(ef, train_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("frenzy")
    n = torch.get_num_threads()  # main() applies --threads to this pytest worker
    assert ef.main(["--quick", "--runs", RUNS, "--doc-tokens", str(DOC_TOKENS), "--seq-len", str(SEQ),
                    "--batch-size", str(BATCH), "--out", str(out), *data_args(train_data)]) == 0
    torch.set_num_threads(n)
    data = json.loads((out / "results.json").read_text())
    return out, data["metadata"], data["results"]


def first_lengths(train_data, n):
    """Token counts of the first ``n`` training documents, capped, computed without the script."""
    from llama_mini.data import PileReader, Tokenizer, tokenize_document

    tok = Tokenizer(train_data.tokenizer)
    docs = itertools.islice(PileReader(train_data.train, keep_meta=True, shuffle=False), n)
    return [min(len(tokenize_document(tok, d)["input_ids"]), DOC_TOKENS) for d in docs]


def test_every_run_sees_the_same_tokens(result):
    _, meta, rows = result
    assert [r["run"] for r in rows] == RUNS.split(",")
    budget = meta["token_budget"]
    assert budget > 0 and budget % (SEQ * BATCH) == 0 and meta["equal_tokens"] is True
    for r in rows:
        st = r["train_steps"]
        assert r["steps"] == budget // (SEQ * BATCH) == len(st["loss"]) == rows[0]["steps"]
        assert r["tokens_seen"] == sum(st["tokens"]) == st["tokens_seen"][-1] == budget
        assert set(st["tokens"]) == {SEQ * BATCH}  # impute: every step is full windows, nothing padded


def test_unique_tokens_epochs_and_budget(result, train_data):
    _, meta, rows = result
    lengths = first_lengths(train_data, 16)
    assert any(n < DOC_TOKENS for n in lengths) and DOC_TOKENS in lengths  # the cap and short documents both occur
    for r in rows:
        unique = sum(lengths[:r["documents"]])
        assert r["unique_tokens"] == unique
        assert r["epochs"] == pytest.approx(r["tokens_seen"] / unique)
        assert r["epoch_boundaries"] == [k * unique for k in range(1, r["tokens_seen"] // unique + 1)
                                         if k * unique < r["tokens_seen"]]
    # default budget: unique tokens x epochs of the run with the most documents, in whole steps
    assert meta["token_budget"] == sum(lengths) * 1 // (SEQ * BATCH) * (SEQ * BATCH)


def test_verdicts_follow_the_curves(result):
    out, _, rows = result
    report = (out / "report.md").read_text()
    ranked = sorted(rows, key=lambda r: r["final_val_loss"])
    assert "Ranked by final val loss: " + " < ".join(f"{r['run']} ({r['final_val_loss']:.3f})" for r in ranked) \
        in report
    assert f"every run saw exactly {rows[0]['tokens_seen']:,} training tokens" in report
    for r in rows:
        ev = r["evals"]
        assert ev[0]["step"] == 0 and ev[-1]["step"] == r["steps"]
        best = min(ev, key=lambda e: e["val_loss"])
        assert r["best_val_loss"] == best["val_loss"] and r["best_val_tokens"] == best["tokens_seen"]
        assert r["final_val_loss"] == ev[-1]["val_loss"]
        assert r["gap"] == pytest.approx(r["final_val_loss"] - r["final_train_loss"])
        rose = r["final_val_loss"] - r["best_val_loss"] > 0.01
        fell = r["train_at_best"] is not None and r["train_at_end"] < r["train_at_best"]
        assert r["overfits"] == (rose and fell)
        assert (f"- {r['run']} overfits:" in report) == r["overfits"]
    lines = [line for line in (out / "results.csv").read_text().splitlines() if not line.startswith("#")]
    assert [row["run"] for row in csv.DictReader(lines)] == RUNS.split(",")
    if importlib.util.find_spec("matplotlib"):
        assert (out / "curves.png").stat().st_size > 0 and "(curves.png)" in report


def test_too_few_documents_names_the_run(ef, train_data, capsys, keep_threads):
    with pytest.raises(SystemExit) as e:
        ef.main(["--quick", "--runs", "2x1,1000x1", *data_args(train_data)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "run 1000x1 asks for the first 1000 documents" in err and "holds only 360" in err


@pytest.mark.parametrize("argv, words", [
    (["--runs", "3y4"], ["--runs", "'3y4' is not DOCUMENTSxEPOCHS"]),
    (["--runs", "0x4"], ["--runs", "'0x4'"]),
    (["--runs", "2x4,2x4"], ["--runs", "repeats"]),
    (["--set", "foo=1"], ["--set", "unknown ModelArgs field 'foo'"]),
    (["--seq-len", "0"], ["--seq-len must be >= 1"]),
])
def test_bad_arguments_are_refused(ef, capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        ef.main(["--quick", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err


def test_epoch_stream_cycles_in_order_or_shuffled(ef):
    docs = [{"i": k} for k in range(5)]
    same = [d["i"] for d in itertools.islice(ef.epoch_stream(docs, False, 0), 15)]
    assert same == list(range(5)) * 3
    mixed = [d["i"] for d in itertools.islice(ef.epoch_stream(docs, True, 3), 15)]
    epochs = [mixed[k:k + 5] for k in range(0, 15, 5)]
    assert all(sorted(e) == list(range(5)) for e in epochs) and len({tuple(e) for e in epochs}) > 1
    assert mixed == [d["i"] for d in itertools.islice(ef.epoch_stream(docs, True, 3), 15)]  # seeded


def test_window_mean(ef):
    assert ef.window_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_analyse_finds_overfitting(ef):
    """Val falls then rises while train keeps falling: overfits; val rising with train flat: not."""
    from types import SimpleNamespace

    def fake(val, train):
        steps = [{"step": k + 1, "loss": x, "tokens": 4} for k, x in enumerate(train)]
        evals = [{"step": 2 * k, "tokens_seen": 8 * k, "val_loss": v} for k, v in enumerate(val)]
        row = {"unique_tokens": 8}
        ef.analyse(row, SimpleNamespace(evals=evals, steps=steps))
        return row

    row = fake([5.0, 4.0, 4.5, 4.8], [4.6, 4.4, 3.0, 2.8, 2.0, 1.8])
    assert row["overfits"] and row["best_val_loss"] == 4.0 and row["best_val_tokens"] == 8
    assert row["best_val_epoch"] == 1.0 and row["train_at_best"] == pytest.approx(4.5)
    assert row["train_at_end"] == pytest.approx(1.9)
    assert not fake([5.0, 4.0, 4.5, 4.8], [3.0] * 6)["overfits"]  # train did not fall
    assert not fake([5.0, 4.5, 4.2, 4.0], [4.6, 4.4, 3.0, 2.8, 2.0, 1.8])["overfits"]  # val at its best
