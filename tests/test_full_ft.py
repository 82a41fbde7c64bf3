"""Full fine-tuning end to end (tiny random-init LLaMA, real SmolLM2 tokenizer): the run saves
the whole model gathered from ZeRO-3 in the Hugging Face layout, and evaluation and generation
load it as a model of its own."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests._dist import run_command
from tests._eval_helpers import toy_questions, write_local
from tests._train_helpers import REPO, launch, overrides, summary

pytestmark = pytest.mark.slow


def test_full_finetune_saves_the_gathered_model_which_eval_and_generation_load(
    tiny_run_inputs, tmp_path
):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    args = overrides(tiny_run_inputs, out, "preset=full_ft", "train.lr=1e-3")
    log = launch("deepspeed", "zero3.json", args)
    s = summary(out)
    assert s["model"] == str(out / "model") and s["model_best"] == str(out / "model_best")
    assert "adapter" not in s and not (out / "adapter").exists()
    assert f"   model        {out / 'model'}" in log
    for name in ("model", "model_best"):
        files = {p.name for p in (out / name).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= files, files

    # The saved weights are the trained ones, gathered whole from both ranks' shards: equal to
    # DeepSpeed's own reconstruction from the final checkpoint's fp32 partitions.
    saved = AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype=torch.float32)
    ckpts = out / "checkpoints"
    tag = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step"))[-1]
    assert tag.endswith(str(s["steps"]))
    ref = get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag=tag)
    ours = saved.state_dict()  # tied weights under both names
    initial = AutoModelForCausalLM.from_pretrained(str(tiny_run_inputs / "model")).state_dict()
    moved = 0
    for name, tensor in ref.items():
        key = name.removeprefix("base_model.")
        torch.testing.assert_close(ours[key], tensor.float(), atol=0, rtol=0)
        moved += not torch.equal(tensor.float(), initial[key])
    assert moved == len(ref)  # every weight trained

    # Evaluation reads the best model as a model (no adapter).
    bench = write_local(tmp_path / "bench", {"arc_easy": {"test": toy_questions(5)}})
    cmd = [sys.executable, str(REPO / "launchers" / "eval.py"), "--model", str(out / "model_best")]
    cmd += ["--source", "local", "--local-dir", str(bench), "--benchmarks", "arc-e"]
    cmd += ["--output-dir", str(tmp_path / "eval")]
    rc, elog = run_command(cmd, 180, cwd=REPO)
    assert rc == 0, elog[-3000:]
    doc = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert doc["benchmarks"]["arc_easy"]["num_questions"] == 5

    # Generation (hmora-ds chat / generate) loads it too.
    from hmora_ds.inference import GenerationConfig, Generator, load_for_inference

    tok, model = load_for_inference(str(out / "model"))
    gen = Generator(tok, model, GenerationConfig(max_new_tokens=4))
    assert isinstance(gen.answer([{"role": "user", "content": "What is 2 + 2?"}]), str)
