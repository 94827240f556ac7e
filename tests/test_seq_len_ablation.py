"""bench/seq_len_ablation.py: the quick run covers every round's configurations, its counts are
the policies' own and add up, the losses are measured on what was trained, the equal-token
comparison really is at equal tokens, and the report's statements follow from its table."""

from __future__ import annotations

import csv
import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import seq_len_ablation as abl  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    threads = torch.get_num_threads()  # main() applies --threads (1 by default on CPU) to this process
    try:
        assert abl.main(["--quick", "--out", str(out), "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads((out / "results.json").read_text())
    return out, data["metadata"], data["results"]


def test_every_round_and_configuration_is_there(run):
    out, meta, rows = run
    assert [r["config"] for r in rows] == [
        "naive-discard", "naive-impute", "pad+discard@40", "pad+impute@40", "pad+discard@90", "pad+impute@90",
        "informed@100 tol 30", "informed@100 tol 50", "best-fit@40", "packed-docmask@40", "best-fit@90",
        "packed-docmask@90"]
    for name in ("report.md", "results.csv", "equal_tokens.png", "data.png", *(f"round_{r}.png" for r in abl.ROUNDS)):
        assert (out / name).stat().st_size > 0, name
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(line for line in f if not line.startswith("#")))
    assert [r["config"] for r in table] == [r["config"] for r in rows]


def test_counts_add_up_and_naive_uses_the_shortest_document(run):
    _, meta, rows = run
    docs = meta["config"]["documents"]
    for r in rows:
        assert r["documents"] == docs
        assert r["tokens_kept"] + r["tokens_dropped"] == r["tokens_in"]
        assert r["kept_frac"] == pytest.approx(r["tokens_kept"] / r["tokens_in"])
        assert r["targets_available"] == r["tokens_kept"]  # every kept token's target counts
        assert r["sequences"] <= r["batches"] * meta["config"]["batch_size"]
    naive = {r["policy"]: r for r in rows if r["round"] == "naive"}
    L = naive["naive-discard"]["max_len"]
    assert naive["naive-impute"]["max_len"] == L
    assert naive["naive-discard"]["tokens_kept"] == docs * L  # every document cut to the shortest
    assert 0 < naive["naive-discard"]["documents_truncated"] < docs  # the shortest document is whole
    by = {r["config"]: r for r in rows}
    assert by["pad+discard@40"]["tokens_kept"] <= docs * 40
    assert by["pad+impute@40"]["tokens_dropped"] == 0 and by["best-fit@40"]["tokens_dropped"] == 0
    t30, t50 = by["informed@100 tol 30"], by["informed@100 tol 50"]
    assert t30["tokens_kept"] > t50["tokens_kept"]  # a higher tolerance keeps fewer overflows
    for r in rows:
        assert r["pad_frac"] == pytest.approx(r["pad_tokens"] / (r["pad_tokens"] + r["tokens_kept"]))


def test_training_records_match_the_rows(run):
    _, meta, rows = run
    budget, first = meta["config"]["token_budget"], meta["config"]["first_batches"]
    for r in rows:
        curve = meta["curves"][r["config"]]
        steps = curve["steps"]
        assert r["steps"] == len(steps) and r["tokens_seen"] == sum(s["tokens"] for s in steps)
        assert r["tokens_first"] == sum(s["tokens"] for s in steps[:first])
        want = sum(s["loss"] * s["tokens"] for s in steps[:first]) / r["tokens_first"]
        assert r["loss_first"] == pytest.approx(want, rel=1e-12)
        if r["stopped"] == "budget":
            assert r["tokens_seen"] >= budget > r["tokens_seen"] - steps[-1]["tokens"]
        else:
            assert r["stopped"] == "data" and r["tokens_seen"] == r["targets_available"] < budget
        assert all(math.isfinite(s["loss"]) for s in steps)
        assert r["val_final"] == curve["evals"][-1]["val_loss"]


def test_equal_tokens_comparison_is_at_equal_tokens(run):
    _, meta, rows = run
    common = meta["common_tokens"]
    assert common == min([meta["config"]["token_budget"]] + [r["targets_available"] for r in rows])
    for r in rows:
        evals = meta["curves"][r["config"]]["evals"]
        steps = meta["curves"][r["config"]]["steps"]
        crossing = next(s for s in steps if s["tokens_seen"] >= common)
        assert r["common_at_step"] == crossing["step"]
        hi = next(e for e in evals if e["step"] == crossing["step"])
        lo = next(e for e in evals if e["step"] == crossing["step"] - 1)  # evaluated on both sides
        w = (common - lo["tokens_seen"]) / (hi["tokens_seen"] - lo["tokens_seen"])
        assert r["val_at_common"] == pytest.approx(lo["val_loss"] + w * (hi["val_loss"] - lo["val_loss"]), rel=1e-12)


def test_same_seed_and_same_batches_for_every_configuration(run):
    _, meta, rows = run
    first = {meta["curves"][r["config"]]["evals"][0]["val_loss"] for r in rows}
    assert len(first) == 1  # every model starts from the same weights
    by = {r["config"]: meta["curves"][r["config"]]["steps"] for r in rows}
    assert [s["tokens"] for s in by["best-fit@40"]] == [s["tokens"] for s in by["packed-docmask@40"]]
    # same sequences, but document masking changes what the model computes on the packed ones
    assert [s["loss"] for s in by["best-fit@40"]] != [s["loss"] for s in by["packed-docmask@40"]]
    assert {r["config"]: r["multi_doc_frac"] > 0 for r in rows if r["policy"] == "packed-docmask"}["packed-docmask@40"]


def test_report_findings_follow_from_the_table(run):
    out, meta, rows = run
    md = (out / "report.md").read_text()
    said = md.split("## What the numbers say", 1)[1]
    ranked = sorted(rows, key=lambda r: r["val_at_common"])
    assert f"lowest for {ranked[0]['config']} ({ranked[0]['val_at_common']:.3f})" in said
    assert f"highest for {ranked[-1]['config']} ({ranked[-1]['val_at_common']:.3f})" in said
    assert f"{ranked[0]['config']} had made {ranked[0]['common_at_step']} optimizer steps" in said
    least = min(rows, key=lambda r: r["kept_frac"])
    assert f"Least data kept: {least['config']}" in said
    most_pad = max(rows, key=lambda r: r["pad_frac"])
    assert f"Most padding: {most_pad['config']}" in said
    first = sorted(rows, key=lambda r: r["loss_first"])
    assert f"{first[0]['config']} ({first[0]['loss_first']:.3f})" in said.split("first 4 batches the order is")[1]
    assert f"{first[-1]['config']} ({first[-1]['loss_first']:.3f}) last" in said
    reached = [r for r in rows if r["stopped"] != "data"]
    best, worst = min(reached, key=lambda r: r["val_final"]), max(reached, key=lambda r: r["val_final"])
    assert f"best validation loss is {best['config']} ({best['val_final']:.3f}" in said
    assert f"the worst {worst['config']} ({worst['val_final']:.3f}" in said
    assert "smaller than the homework's" in md  # the CPU model size is stated


def test_compare_reports_noise_as_noise():
    assert abl._compare("masking", 5.0, 4.9) == "masking helps by 0.100"
    assert abl._compare("masking", 4.9, 5.0) == "masking hurts by 0.100"
    assert abl._compare("masking", 5.0, 4.995) == "masking changes it by 0.005, less than 0.01 nats"


def test_bad_arguments_name_the_option(capsys):
    for argv, needle in ((["--rounds", "naive,bogus"], "--rounds"), (["--lengths", "100,x"], "--lengths"),
                         (["--documents", "0"], "--documents"), (["--quick", "--full"], "--full"),
                         (["--data", "x.jsonl.zst"], "--val-data")):
        with pytest.raises(SystemExit):
            abl.parse_args(argv)
        assert needle in capsys.readouterr().err
