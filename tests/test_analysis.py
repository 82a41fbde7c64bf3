"""Routing analysis: the statistics against hand-computed answers, and the CLI end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hmora_ds.adapter_io import save_adapter
from hmora_ds.analysis import (
    activation_shares,
    balance_certainty,
    expert_sets,
    final_task_router,
    main_expert_pairs,
    recognition_rates,
    tsne_embedding,
)
from hmora_ds.analysis.cli import main
from hmora_ds.analysis.data import sample_per_task
from hmora_ds.analysis.stats import MainExpertPair

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _probs_for(pairs: list[tuple[int, int]], e: int = 8) -> torch.Tensor:
    """One row per pair: the pair gets 0.4 + 0.3, the other experts share the rest."""
    rows = torch.full((len(pairs), e), 0.3 / (e - 2))
    for i, (a, b) in enumerate(pairs):
        rows[i, a], rows[i, b] = 0.4, 0.3
    return rows


# ----------------------------------------------------------------- balance and certainty
def test_uniform_routing_is_balanced_and_uncertain():
    balance, certainty = balance_certainty(torch.full((5, 8), 1 / 8))
    assert balance == pytest.approx(1.0)
    assert certainty == pytest.approx(1.0)


def test_one_hot_on_different_experts_is_certain_and_balanced():
    balance, certainty = balance_certainty(torch.eye(4))
    assert certainty == pytest.approx(0.0, abs=1e-7)
    assert balance == pytest.approx(1.0)


def test_everything_on_one_expert_has_zero_balance():
    probs = torch.zeros(6, 4)
    probs[:, 2] = 1.0
    balance, certainty = balance_certainty(probs)
    assert balance == pytest.approx(0.0, abs=1e-7)
    assert certainty == pytest.approx(0.0, abs=1e-7)


def test_balance_and_certainty_known_values_with_mask():
    # Two valid rows (0.5, 0.5, 0, 0) and (0, 0, 0.5, 0.5): M uniform, each H = log 2.
    probs = torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [1.0, 0, 0, 0]])
    balance, certainty = balance_certainty(probs, torch.tensor([1, 1, 0]))
    assert balance == pytest.approx(1.0)
    assert certainty == pytest.approx(math.log(2) / math.log(4))


def test_activation_shares_count_top_k_selections():
    probs = _probs_for([(0, 1), (0, 2), (3, 0), (1, 2)], e=4)
    shares = activation_shares(probs, k=2)
    # Expert 0 is selected 3 times, 1 and 2 twice, 3 once: of 8 selections.
    assert shares == pytest.approx([3 / 8, 2 / 8, 2 / 8, 1 / 8])
    assert sum(shares) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="top_k"):
        activation_shares(probs, k=5)


# ----------------------------------------------------------------- main expert pairs
def test_expert_sets_are_unordered_and_break_ties_towards_lower_index():
    probs = torch.tensor([[0.1, 0.5, 0.0, 0.4], [0.25, 0.25, 0.25, 0.25]])
    assert expert_sets(probs, 2) == [(1, 3), (0, 1)]
    assert expert_sets(probs, 1) == [(1,), (0,)]


def test_main_expert_pairs_known_table():
    tasks = ["algebra"] * 5 + ["biology"] * 4 + ["chemistry"] + ["law"] * 10
    pairs = (
        [(3, 6), (6, 3), (3, 6), (3, 6), (0, 4)]  # 4 of 5 on (3, 6): order inside a pair ignored
        + [(2, 7), (0, 4), (0, 4), (2, 7)]  # a tie: (0, 4) and (2, 7) twice each
        + [(1, 5)]  # a single example
        + [(3, 6)] * 7
        + [(2, 7)] * 3
    )
    meps = main_expert_pairs(tasks, _probs_for(pairs))
    assert list(meps) == ["algebra", "biology", "chemistry", "law"]
    assert meps["algebra"] == MainExpertPair(n=5, pair=(3, 6), share=0.8)
    assert meps["biology"] == MainExpertPair(n=4, pair=(0, 4), share=0.5, tied=((2, 7),))
    assert meps["chemistry"] == MainExpertPair(n=1, pair=(1, 5), share=1.0)
    assert meps["law"] == MainExpertPair(n=10, pair=(3, 6), share=0.7)
    rates = recognition_rates(meps)
    assert rates == {"0.7": 3 / 4, "0.8": 2 / 4, "0.9": 1 / 4, "1.0": 1 / 4}


def test_recognition_thresholds_are_inclusive_and_exact():
    meps = [MainExpertPair(10, (0, 1), 7 / 10), MainExpertPair(5, (0, 1), 4 / 5)]
    assert recognition_rates(meps) == {"0.7": 1.0, "0.8": 0.5, "0.9": 0.0, "1.0": 0.0}
    with pytest.raises(ValueError, match="no tasks"):
        recognition_rates({})


def test_main_expert_pairs_checks_lengths():
    with pytest.raises(ValueError, match="2 labels for 3 rows"):
        main_expert_pairs(["a", "b"], _probs_for([(0, 1)] * 3))


def test_final_task_router_is_the_last_layers_last_group():
    names = [
        "layer00.q_k_v.token",
        "layer02.gate_up.task",
        "layer03.gate_up.task",
        "layer03.q_k_v.task",
        "layer01.gate_up.token",
    ]
    assert final_task_router(names) == "layer03.gate_up.task"
    assert final_task_router(["layer05.q.task", "layer05.down.task", "layer04.up.task"]) == (
        "layer05.down.task"
    )
    assert final_task_router(["layer00.q_k_v.token"]) is None


def test_tsne_is_seeded_and_clamps_perplexity():
    gen = torch.Generator().manual_seed(0)
    gates = torch.softmax(torch.randn(12, 8, generator=gen), -1)
    emb, notes = tsne_embedding(gates, seed=3)
    again, _ = tsne_embedding(gates, seed=3)
    assert emb.shape == (12, 2)
    assert (emb == again).all()
    assert notes == ["t-SNE perplexity clamped from 30 to 3.67 (12 samples)"]
    with pytest.raises(ValueError, match="at least 3 samples"):
        tsne_embedding(gates[:2])


def test_sample_per_task_is_seeded_and_capped():
    from hmora_ds.analysis import RoutingExample

    exs = [RoutingExample(t, f"{t}{i}") for t in "abc" for i in range(6)]
    picked = sample_per_task(exs, 4, seed=1)
    assert [sum(e.task == t for e in picked) for t in "abc"] == [4, 4, 4]
    assert picked == sample_per_task(exs, 4, seed=1)
    assert sample_per_task(exs, 10, seed=1) == exs


# ----------------------------------------------------------------- CLI end to end
TASKS = ("geography", "science", "biology")


@pytest.fixture(scope="module")
def analysis_inputs(tiny_run_inputs, tmp_path_factory):
    """A tiny HMoRA w LW adapter with random routers and a JSONL of 3 tasks."""
    from hmora_ds.config import load_config
    from hmora_ds.model import HMoRAModel
    from hmora_ds.runtime.loading import load_base_model, load_tokenizer

    root = tmp_path_factory.mktemp("analysis")
    model_dir = tiny_run_inputs / "model"
    tok = load_tokenizer(str(model_dir))
    base = load_base_model(str(model_dir), torch.float32, "eager")
    torch.manual_seed(0)
    model = HMoRAModel(base, load_config("hmora_lw"), tokenizer=tok)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # peaked, input-dependent routing instead of near-uniform init
        for name, p in model.named_parameters():
            if ".token_router." in name or ".task_router." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 2.0)
    save_adapter(model, root / "adapter")
    rows = [json.loads(line) for line in (tiny_run_inputs / "data.jsonl").read_text().splitlines()]
    with (root / "data.jsonl").open("w") as f:
        for i, row in enumerate(rows[:24]):
            f.write(json.dumps({"task": TASKS[i % 3], "question": row["source"]}) + "\n")
    return model_dir, root


def _run(tmp_path, model_dir, root, *extra):
    out = tmp_path / "out"
    args = ["routing", "--model", str(model_dir), "--adapter", str(root / "adapter")]
    args += ["--data", str(root / "data.jsonl"), "--out", str(out), "--no-progress", *extra]
    return main(args), out


def test_cli_writes_routing_json_tables_and_figures(analysis_inputs, tmp_path):
    model_dir, root = analysis_inputs
    rc, out = _run(tmp_path, model_dir, root, "--max-per-task", "7", "--batch-size", "4")
    assert rc == 0
    doc = json.loads((out / "routing.json").read_text())
    assert set(doc) == {"meta", "routers", "summary", "tasks"}
    meta = doc["meta"]
    assert meta["num_examples"] == 21 and meta["num_tasks"] == 3 and meta["top_k"] == 2
    assert meta["model"] == str(model_dir) and meta["adapter"] == str(root / "adapter")
    # 4 layers, α = σ(−6 + 8l/3 − 2 + 2)...: token routing in layers 0-2, task routing in 2-3;
    # hmora_lw shares routers (q_k_v, gate_up) and has single LoRA on o and down.
    assert meta["mep_router"] == "layer03.gate_up.task"
    kinds = {(r["layer"], r["layer_type"], r["kind"]) for r in doc["routers"].values()}
    assert kinds == {(layer, t, "token") for layer in (0, 1, 2) for t in ("q_k_v", "gate_up")} | {
        (layer, t, "task") for layer in (2, 3) for t in ("q_k_v", "gate_up")
    }
    for name, r in doc["routers"].items():
        assert name == f"layer{r['layer']:02d}.{r['layer_type']}.{r['kind']}"
        assert 0.0 <= r["balance"] <= 1.0 + 1e-6 and 0.0 <= r["certainty"] <= 1.0 + 1e-6
        assert len(r["load"]) == 8 and sum(r["load"]) == pytest.approx(1.0)
        assert max(r["load"]) <= 0.5 + 1e-6  # top-2: one expert is at most half the selections
    summary = doc["summary"]
    token = [r for r in doc["routers"].values() if r["kind"] == "token"]
    assert summary["token_balance"] == pytest.approx(sum(r["balance"] for r in token) / len(token))
    assert 0.0 < summary["task_certainty"] < 1.0
    assert set(summary["recognition"]) == {"0.7", "0.8", "0.9", "1.0"}
    assert list(summary["recognition"].values()) == sorted(summary["recognition"].values())[::-1]
    assert set(doc["tasks"]) == set(TASKS)
    for t in doc["tasks"].values():
        assert t["n"] == 7 and len(t["mep"]) == 2 and t["mep"] == sorted(t["mep"])
        assert 1 / 7 <= t["share"] <= 1.0 and (t["share"] * 7) == pytest.approx(
            round(t["share"] * 7)
        )
    shares = [t["share"] for t in doc["tasks"].values()]
    assert summary["recognition"]["0.8"] == sum(s >= 0.8 for s in shares) / 3
    assert summary["distinct_meps"] == len({tuple(t["mep"]) for t in doc["tasks"].values()})
    # The random task router (weights × 2) saturates: every prompt gets the same one-hot gates
    # (their mean squared spread is ~1e-14, float32 rounding), so the split is undefined.
    assert summary["task_gate_between_share"] is None
    assert any("between-task share" in n and "undefined" in n for n in meta["notes"])
    for fig in ("fig3_routing_entropy.png", "fig4_task_tsne.png"):
        data = (out / fig).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    md = (out / "routing.md").read_text()
    assert "## Recognition (table 14)" in md and "**layer03.gate_up.task** (MEP)" in md
    for task in TASKS:
        assert f"| {task} | 7 |" in md
    assert any("perplexity clamped" in n for n in meta["notes"])


def test_cli_errors_are_one_line_and_name_the_fix(analysis_inputs, tmp_path, capsys):
    model_dir, root = analysis_inputs
    bad = tmp_path / "untasked.jsonl"
    bad.write_text(json.dumps({"question": "What is 2 + 2?"}) + "\n")
    rc, _ = _run(tmp_path, model_dir, root, "--data", str(bad))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "has no task column 'task'" in err and "--task-field" in err
    rc, _ = _run(tmp_path, model_dir, root, "--router", "layer01.q_k_v.token")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "is a token router" in err and "layer03.gate_up.task" in err
    rc, _ = _run(tmp_path, model_dir, root, "--adapter", str(tmp_path / "nope"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --adapter:") and "save_adapter" in err
    (tmp_path / "empty").mkdir()
    rc, _ = _run(tmp_path, model_dir, root, "--adapter", str(tmp_path / "empty"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --adapter:") and "adapter_config.json" in err


def test_summary_without_task_routers_skips_mep_with_a_note():
    from hmora_ds.analysis import RoutingCollection, summarize_routing

    stats = {
        "layer00.q.token": {
            "balance": torch.tensor(0.9),
            "certainty": torch.tensor(0.5),
            "load": torch.full((4,), 0.25),
            "count": torch.tensor(10.0),
        }
    }
    coll = RoutingCollection(["a", "b", "a"], stats, {}, top_k=2, routing_mode="topk")
    doc = summarize_routing(coll, {"model": "m", "adapter": "x", "data": "d"})
    assert doc["summary"]["recognition"] is None and doc["summary"]["distinct_meps"] is None
    assert doc["summary"]["task_gate_between_share"] is None
    assert doc["summary"]["task_balance"] is None and doc["summary"][
        "token_balance"
    ] == pytest.approx(0.9)
    assert doc["tasks"] == {
        "a": {"n": 2, "mep": None, "share": None},
        "b": {"n": 1, "mep": None, "share": None},
    }
    assert doc["meta"]["mep_router"] is None
    assert "no task routers" in doc["meta"]["notes"][0]


def test_analyze_routing_api_matches_the_cli_whatever_the_batch(analysis_inputs, tmp_path):
    """Padding is masked and the task encoder ignores it: batch size changes no number.

    fp32 on the device the CLI picks (in bf16 the rounding differs with the batch's padding,
    enough to flip near-ties of the tiny model's random routers).
    """
    from hmora_ds.adapter_io import load_adapter
    from hmora_ds.analysis import AnalysisError, analyze_routing
    from hmora_ds.runtime.loading import load_base_model, load_tokenizer

    model_dir, root = analysis_inputs
    rc, out = _run(tmp_path, model_dir, root, "--batch-size", "8", "--dtype", "float32")
    assert rc == 0
    cli = json.loads((out / "routing.json").read_text())
    rows = [json.loads(line) for line in (root / "data.jsonl").read_text().splitlines()]
    examples = [{"task": r["task"], "prompt": r["question"]} for r in rows]
    tok = load_tokenizer(str(model_dir))
    model = load_adapter(load_base_model(str(model_dir), torch.float32, "eager"), root / "adapter")
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(AnalysisError, match=r"no router 'layer09\.q\.task'"):
        analyze_routing(model, tok, examples, router="layer09.q.task")
    doc = analyze_routing(model, tok, examples, batch_size=3, progress=False)
    assert doc["tasks"] == cli["tasks"]
    assert doc["summary"]["recognition"] == cli["summary"]["recognition"]
    assert list(doc["routers"]) == list(cli["routers"])
    for name, r in doc["routers"].items():
        ref = cli["routers"][name]
        assert r["balance"] == pytest.approx(ref["balance"], abs=1e-5)
        assert r["certainty"] == pytest.approx(ref["certainty"], abs=1e-5)
        assert r["load"] == pytest.approx(ref["load"], abs=1e-6)


def test_task_repr_stats_match_a_hand_computation():
    """Two tasks in 2-D: μ = (1, 1.5), μ_a = (2, 0), μ_b = (0, 3); between = 2·3.25 + 2·3.25
    = 13, total = 2.25 + 6.25 + 1.25 + 7.25 = 17; unit vectors pair up: 4 of 12 ordered
    pairs have cosine 1, the rest 0."""
    import numpy as np

    from hmora_ds.analysis.task_repr import task_repr_stats

    h = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    lengths = [5, 9, 6, 11]
    got = task_repr_stats(h, ["a", "a", "b", "b"], lengths)
    assert got["n"] == 4 and got["num_tasks"] == 2
    assert got["between_share"] == pytest.approx(13 / 17, abs=1e-12)
    assert got["mean_cosine"] == pytest.approx(1 / 3, abs=1e-12)
    centred = h - h.mean(axis=0)
    pc1 = centred @ np.linalg.svd(centred)[2][0]
    want = abs(np.corrcoef(pc1, lengths)[0, 1])
    assert got["pc1_length_corr"] == pytest.approx(want, abs=1e-9)


def test_task_repr_needs_two_tasks(tmp_path, capsys):
    from hmora_ds.analysis.cli import main

    data = tmp_path / "one.jsonl"
    data.write_text('{"task": "t", "prompt": "a"}\n{"task": "t", "prompt": "b"}\n')
    code = main(["task-repr", "--model", "unused", "--data", str(data), "--out", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --data: needs at least two tasks to split the variance"
    )


def test_between_task_share_splits_the_variance():
    """Tasks a = {(0,0), (2,0)}, b = {(0,4), (2,4)}: μ = (1, 2), total = 4·(1 + 4) = 20,
    between = 2·4 + 2·4 = 16 → 0.8; identical rows give NaN; a shape mismatch is refused."""
    from hmora_ds.analysis.stats import between_task_share

    x = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [2.0, 4.0]])
    assert between_task_share(x, ["a", "a", "b", "b"]) == pytest.approx(0.8, abs=1e-12)
    assert between_task_share(x, ["a", "b", "a", "b"]) == pytest.approx(0.2, abs=1e-12)
    assert math.isnan(between_task_share(np.ones((3, 2)), ["a", "b", "b"]))
    # A collapsed router: one-hot gates that differ by rounding only have no meaningful split.
    onehot = np.array([[1.0, 0.0], [1.0 - 1e-7, 1e-7], [1.0, 0.0], [1.0 - 1e-7, 1e-7]])
    assert math.isnan(between_task_share(onehot, ["a", "a", "b", "b"]))
    with pytest.raises(ValueError, match="between_task_share"):
        between_task_share(x, ["a", "b"])


def test_per_task_routing_equals_routing_each_task_alone(analysis_inputs):
    """``--per-task``: a task's statistics, gathered from mixed batches, are those of its
    prompts routed on their own (guards slicing the wrong batch rows: padding order, sorting
    by length). The default document is unchanged (no ``routing`` key per task)."""
    from hmora_ds.adapter_io import load_adapter
    from hmora_ds.analysis import analyze_routing
    from hmora_ds.runtime.loading import load_base_model, load_tokenizer

    model_dir, root = analysis_inputs
    rows = [json.loads(line) for line in (root / "data.jsonl").read_text().splitlines()]
    examples = [{"task": r["task"], "prompt": r["question"]} for r in rows]
    tok = load_tokenizer(str(model_dir))
    model = load_adapter(load_base_model(str(model_dir), torch.float32, "eager"), root / "adapter")
    doc = analyze_routing(model, tok, examples, batch_size=5, progress=False, per_task=True)
    routers = doc["meta"]["per_task_routers"]
    assert routers == {"token": "layer02.gate_up.token", "task": "layer03.gate_up.task"}
    assert set(doc["tasks"]) == set(TASKS)
    for task in TASKS:
        alone = analyze_routing(
            model, tok, [e for e in examples if e["task"] == task], batch_size=4, progress=False
        )
        got = doc["tasks"][task]["routing"]
        token = [r for r in alone["routers"].values() if r["kind"] == "token"]
        assert got["token_certainty"] == pytest.approx(
            sum(r["certainty"] for r in token) / len(token), abs=1e-5
        )
        assert got["token_balance"] == pytest.approx(alone["summary"]["token_balance"], abs=1e-5)
        assert got["token_load"] == pytest.approx(
            alone["routers"][routers["token"]]["load"], abs=1e-5
        )
        assert got["task_load"] == pytest.approx(
            alone["routers"][routers["task"]]["load"], abs=1e-5
        )
        assert sum(got["token_load"]) == pytest.approx(1.0)
    plain = analyze_routing(model, tok, examples, batch_size=5, progress=False)
    assert all("routing" not in t for t in plain["tasks"].values())
    assert "per_task_routers" not in plain["meta"]


def test_summary_reports_the_mean_active_experts_where_routers_have_them():
    """Routers with a variable number of experts per token (AdaMoLE) carry ``active_experts``;
    the summary averages it over those routers, and is null for fixed-k methods."""
    from hmora_ds.analysis import RoutingCollection, summarize_routing

    def stats(active=None):
        s = {"balance": torch.tensor(0.9), "certainty": torch.tensor(0.5),
             "load": torch.full((4,), 0.25), "count": torch.tensor(10.0)}  # fmt: skip
        if active is not None:
            s["active_experts"] = torch.tensor(active)
        return s

    coll = RoutingCollection(["a"], {"layer00.q.token": stats(1.5), "layer01.q.token": stats(2.5)},
                             {}, top_k=4, routing_mode="topk")  # fmt: skip
    doc = summarize_routing(coll, {})
    assert doc["summary"]["active_experts"] == pytest.approx(2.0)
    assert doc["routers"]["layer01.q.token"]["active_experts"] == pytest.approx(2.5)
    coll = RoutingCollection(["a"], {"layer00.q.token": stats()}, {}, top_k=2, routing_mode="topk")
    assert summarize_routing(coll, {})["summary"]["active_experts"] is None
