"""Flan v2 builder on a local fixture of the real flan-10k-flat schema (no hub)."""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "data"))
from hmora_data_fixtures import FLAN_TASKS, flan_rows, write_flan_parquet

from hmora_ds.data import PAPER_MIXTURE, DataError, FlanConfig, build_flan, load_records
from hmora_ds.data.__main__ import main
from hmora_ds.data.flan import HELD_OUT_PRESETS

PER_TASK = 400  # rows per task: every mixture has more rows than its quota below


@pytest.fixture(scope="module")
def flan_source(tmp_path_factory) -> Path:
    return write_flan_parquet(tmp_path_factory.mktemp("flan_src"), flan_rows(PER_TASK))


def _build(src: Path, out: Path, **kw) -> dict:
    return build_flan(FlanConfig(out=out, source=str(src), **{"num_samples": 500, **kw}))


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_proportions_match_the_paper_mixture(flan_source, tmp_path):
    m = _build(flan_source, tmp_path / "o", num_samples=1000)
    recs = _lines(tmp_path / "o" / "data.jsonl")
    assert len(recs) == 1000 == m["num_samples"]
    counts = Counter(r["task_source"] for r in recs)
    for mix, p in PAPER_MIXTURE.items():
        assert abs(counts[mix] / 1000 - p) <= 0.001, (mix, counts)  # exact quotas up to rounding
    assert m["counts_by_source"] == dict(sorted(counts.items()))
    # Muffin's 315 come from 3 tasks of 400 train rows: a uniform sample touches all.
    assert {r["task_name"] for r in recs if r["task_source"] == "Muffin"} == set(
        FLAN_TASKS["Flan2021"]
    )


def test_only_train_split_and_known_sources(flan_source, tmp_path):
    m = _build(flan_source, tmp_path / "o")
    recs = _lines(tmp_path / "o" / "data.jsonl")
    assert all(
        not r["source"].endswith(tuple(f"#{i}]" for i in range(PER_TASK, PER_TASK + 5)))
        for r in recs
    )
    assert m["skipped"]["split=validation"] == 5 * sum(len(t) for t in FLAN_TASKS.values())
    assert m["excluded_task_sources"] == {"Dialog": PER_TASK}
    assert not any(r["task_name"] == "task_master_dialog" for r in recs)
    assert set(recs[0]) == {"id", "source", "target", "task_name", "task_source", "template"}


def test_deterministic_by_seed_and_independent_of_shard_order(flan_source, tmp_path):
    _build(flan_source, tmp_path / "a", seed=7)
    _build(flan_source, tmp_path / "b", seed=7)
    _build(flan_source, tmp_path / "c", seed=8)
    a = (tmp_path / "a" / "data.jsonl").read_bytes()
    assert a == (tmp_path / "b" / "data.jsonl").read_bytes()
    ids_a = {r["id"] for r in _lines(tmp_path / "a" / "data.jsonl")}
    ids_c = {r["id"] for r in _lines(tmp_path / "c" / "data.jsonl")}
    assert ids_a != ids_c
    # Same rows, different shard layout and order: the same selection.
    rows = flan_rows(PER_TASK)
    src2 = write_flan_parquet(tmp_path / "src2", rows[::-1], shards=3)
    _build(src2, tmp_path / "d", seed=7)
    assert (tmp_path / "d" / "data.jsonl").read_bytes() == a


def test_held_out_tasks_absent_from_training(flan_source, tmp_path):
    m = _build(
        flan_source,
        tmp_path / "o",
        held_out=("cot_gsm8k", "preset:benchmarks"),
        heldout_per_task=10,
    )
    recs = _lines(tmp_path / "o" / "data.jsonl")
    names = {r["task_name"] for r in recs}
    held = {"cot_gsm8k", "ai2_arc_ARC_Easy_1_0_0", "ai2_arc_ARC_Challenge_1_0_0_p3"}
    assert not names & held
    assert set(m["held_out_tasks"]) == held
    assert all(v == PER_TASK for v in m["held_out_tasks"].values())
    assert set(m["held_out_patterns"]) == {"cot_gsm8k", *HELD_OUT_PRESETS["benchmarks"]}
    heldout = _lines(tmp_path / "o" / "heldout.jsonl")
    assert Counter(r["task_name"] for r in heldout) == dict.fromkeys(held, 10)
    assert len(recs) == 500  # the quotas are still met from the remaining tasks


def test_manifest_contents(flan_source, tmp_path):
    m = _build(flan_source, tmp_path / "o", seed=3, held_out=("cot_esnli",))
    on_disk = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert on_disk == m
    assert m["kind"] == "flan" and m["seed"] == 3
    assert m["source"] == str(flan_source.resolve())
    assert m["revision"] is None and len(m["files"]) == 2  # local: per-file sha256 instead
    assert sum(m["counts_by_task"].values()) == m["num_samples"] == 500
    assert m["quotas"] == {"T0-SF": 262, "Muffin": 158, "SNI": 52, "CoT": 28}
    assert m["counts_by_source"] == {k: m["quotas"][k] for k in sorted(m["quotas"])}
    assert m["held_out_tasks"] == {"cot_esnli": PER_TASK}
    assert m["rows_scanned"] == sum(len(t) for t in FLAN_TASKS.values()) * (PER_TASK + 5)
    assert len(m["data_sha256"]) == 64
    assert load_records(tmp_path / "o")  # the output reads back through the local loader


def test_shortfall_is_reported(flan_source, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        m = _build(flan_source, tmp_path / "o", num_samples=20_000)
    # CoT wants 1120 rows but only 800 exist (two tasks, one of them maybe held out: none here).
    assert m["shortfall"]["CoT"] == 1120 - 2 * PER_TASK
    assert "fewer rows than their quota" in caplog.text


def test_bad_rows_are_skipped_with_one_warning(tmp_path, caplog):
    rows = flan_rows(50)
    rows[3]["target"] = ""
    rows[4]["source"] = None
    src = write_flan_parquet(tmp_path / "src", rows, shards=1)
    with caplog.at_level(logging.WARNING):
        m = _build(src, tmp_path / "o", num_samples=100)
    warnings = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "train-00000-of-00001.parquet" in msg and "row 4" in msg and "empty target" in msg
    assert sum(v for k, v in m["skipped"].items() if k.startswith("bad:")) == 2


def test_config_validation_and_empty_source(tmp_path):
    with pytest.raises(ValueError, match="unknown mixture"):
        FlanConfig(out=tmp_path, num_samples=10, mixture={"Dialog": 1.0})
    with pytest.raises(ValueError, match="positive"):
        FlanConfig(out=tmp_path, num_samples=0)
    with pytest.raises(ValueError, match="preset"):
        FlanConfig(out=tmp_path, num_samples=1, held_out=("preset:nope",))
    only_dialog = [r for r in flan_rows(5) if r["task_source"] == "Dialog"]
    src = write_flan_parquet(tmp_path / "src", only_dialog, shards=1)
    with pytest.raises(DataError, match="no usable Flan row"):
        _build(src, tmp_path / "o")


def test_hub_path_streams_with_revision(monkeypatch, tmp_path):
    """The hub branch streams (never downloads the whole set) and records the revision."""
    import datasets

    rows = flan_rows(30)
    calls = {}

    def fake_load_dataset(name, split=None, streaming=False, revision=None, **kw):
        calls.update(name=name, split=split, streaming=streaming, revision=revision)
        return iter(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr("hmora_ds.data.flan._hub_sha", lambda cfg: "abc123")
    m = build_flan(FlanConfig(out=tmp_path / "o", num_samples=50, revision="main"))
    assert calls == {
        "name": "sordonia/flan-10k-flat",
        "split": "train",
        "streaming": True,
        "revision": "main",
    }
    assert m["source"] == "sordonia/flan-10k-flat"
    assert (m["revision"], m["resolved_revision"]) == ("main", "abc123")
    assert m["num_samples"] == 50


def test_cli_build_flan(flan_source, tmp_path):
    out = tmp_path / "cli"
    rc = main(
        [
            "build-flan",
            "--out",
            str(out),
            "--num-samples",
            "200",
            "--source",
            str(flan_source),
            "--held-out",
            "cot_*",
            "--seed",
            "5",
        ]
    )
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["seed"] == 5 and set(m["held_out_tasks"]) == {"cot_gsm8k", "cot_esnli"}
    assert m["counts_by_source"].get("CoT", 0) == 0 and m["shortfall"] == {"CoT": 11}
    missing = str(tmp_path / "nope")
    assert main(["build-flan", "--out", str(out), "--num-samples", "5", "--source", missing]) == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _build(tmp_path / "missing.parquet", tmp_path / "o2")
