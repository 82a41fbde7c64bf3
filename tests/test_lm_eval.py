"""The lm-evaluation-harness model class ``hmora`` with the pinned lm-eval, offline: a local task
definition (real questions written to a JSON file) and the real SmolLM2-135M-Instruct.

An adapter at initialisation (B = 0) changes nothing, so its per-request log-likelihoods must be
the harness's own ``hf`` model's on the same checkpoint: that checks our scoring (context /
continuation split, padding, greedy flag) against the reference implementation.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid"], 0),
    ("Which animal barks?", ["cat", "dog", "fish"], 1),
    ("How many legs does a spider have?", ["six", "four", "eight"], 2),
    ("What colour is the sky on a clear day?", ["blue", "green", "red"], 0),
    ("Which of these is a fruit?", ["carrot", "apple", "potato"], 1),
]


def _task(tmp_path):
    data = tmp_path / "qa.jsonl"
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_qa.yaml").write_text(
        "task: tiny_qa\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return tmp_path


@pytest.fixture(scope="module")
def adapter_at_init(tmp_path_factory):
    import torch

    from hmora_ds import assets
    from hmora_ds.adapter_io import save_adapter
    from hmora_ds.config import load_config
    from hmora_ds.model import HMoRAModel
    from hmora_ds.runtime.loading import load_base_model, load_tokenizer, resolve_checkpoint
    from tests._assets import require_asset

    path = require_asset(assets.SMOLLM2, lambda: resolve_checkpoint("smollm2-135m-instruct"))
    base = load_base_model(path, torch.float32, "sdpa")
    model = HMoRAModel(base, load_config("hmora_lw"), tokenizer=load_tokenizer(path))
    out = tmp_path_factory.mktemp("adapter")
    save_adapter(model, out)
    return path, out


def _loglikelihoods(results) -> list[list[float]]:
    return [[r[0] for r in s["filtered_resps"]] for s in results["samples"]["tiny_qa"]]


def test_hmora_model_scores_like_the_harness_hf_model_and_the_cli_runs(
    adapter_at_init, tmp_path, monkeypatch
):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import hmora_ds.lm_eval_model  # noqa: F401  (registers "hmora")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    checkpoint, adapter = adapter_at_init
    tasks = TaskManager(include_path=str(_task(tmp_path)))
    common = dict(
        tasks=["tiny_qa"], task_manager=tasks, log_samples=True, batch_size=2, device="cpu"
    )
    ours = lm_eval.simple_evaluate(
        model="hmora", model_args=f"pretrained={checkpoint},adapter={adapter}", **common
    )
    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={checkpoint}", **common)
    got, want = _loglikelihoods(ours), _loglikelihoods(ref)
    assert len(got) == len(QUESTIONS) and all(len(x) == 3 for x in got)
    for a, b in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=2e-3)
    acc = ours["results"]["tiny_qa"]["acc,none"]
    assert acc == ref["results"]["tiny_qa"]["acc,none"]
    assert acc >= 0.6  # the real model knows most of these

    # The command line: hmora-ds lm-eval is lm-eval's own, with --model hmora available.
    from hmora_ds.cli import main

    out = tmp_path / "cli"
    argv = ["lm-eval", "--model", "hmora", "--model_args", f"pretrained={checkpoint}",
            "--tasks", "tiny_qa", "--include_path", str(tmp_path), "--output_path", str(out),
            "--batch_size", "4"]  # fmt: skip
    assert main(argv) == 0
    written = list(out.rglob("results_*.json"))
    assert written and "tiny_qa" in json.loads(written[0].read_text())["results"]
