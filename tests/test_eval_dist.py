"""Sharded evaluation over 2 gloo ranks gives the same per-question predictions as 1 rank
(odd question count: the short shard runs dummy batches so both ranks step together)."""

from __future__ import annotations

import json

import pytest
import torch

from tests._dist import run_ranks
from tests._eval_helpers import toy_questions

pytestmark = pytest.mark.multirank


def _model_and_tok(model_dir):
    from transformers import AutoModelForCausalLM

    from hmora_ds.config import load_config
    from hmora_ds.model import HMoRAModel
    from hmora_ds.runtime.loading import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    torch.manual_seed(0)
    model = HMoRAModel(base, load_config("hmora"), tokenizer=tok).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model, tok


def _predict(model_dir):
    from hmora_ds.eval.distributed import score_questions
    from hmora_ds.eval.scoring import ScoreConfig, Scorer

    model, tok = _model_and_tok(model_dir)
    qs = toy_questions(9)
    out = {}
    for mode in ("letter", "loglik"):
        scorer = Scorer(tok, ScoreConfig(mode=mode, batch_size=2))
        out[mode] = score_questions(model, scorer, qs, torch.device("cpu"))
    return out


def _rank_fn(rank, world, model_dir, out_dir):
    from pathlib import Path

    preds = _predict(model_dir)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(preds))


def test_two_ranks_equal_one_rank(tiny_run_inputs, tmp_path):
    model_dir = str(tiny_run_inputs / "model")
    run_ranks(_rank_fn, 2, tmp_path, model_dir, str(tmp_path), timeout=180)
    single = _predict(model_dir)
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got == single  # every rank holds all 9 predictions, each counted once
    assert len(single["letter"]) == 9
