"""Shared fixtures. Tiny random-init Qwen2 / LLaMA models are used where a test is about
mechanics (injection, routing, gradients, generation); they are built from real HF classes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from hmora_ds.config import available_presets, load_config
from hmora_ds.methods import library_missing
from hmora_ds.model import HMoRAModel

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A command's ``main`` called in-process may configure logging (a handler on the stream
    pytest captured for that test, closed after it): give the next test the loggers back."""
    loggers = [logging.getLogger(), logging.getLogger("hmora_ds")]
    saved = [(list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


#: Every shipped preset: a new method's preset is covered by the model tests without edits.
PRESETS = tuple(available_presets())
#: The presets that build a model by themselves: all but those of a method composing a LoRA
#: library (MoLE, Mixture-of-LoRAs), which leave ``options.library`` to the user; their own
#: tests build them on a tiny library.
MODEL_PRESETS = tuple(p for p in PRESETS if not library_missing(load_config(p)))
VOCAB = 300
#: A token id standing in for "?" in the tiny vocabularies.
QUESTION_ID = 63


def tiny_config(arch: str, layers: int = 6, init_range: float = 0.02):
    common = dict(
        initializer_range=init_range,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def tiny_base(arch: str = "qwen2", seed: int = 0, layers: int = 6, init_range: float = 0.02):
    """A tiny random-init HF causal LM (mechanics only), eager attention for exact parity."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch, layers, init_range)
    cfg._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_hmora(
    preset: str = "hmora",
    arch: str = "qwen2",
    overrides=None,
    seed: int = 0,
    layers: int = 6,
    init_range: float = 0.02,
) -> HMoRAModel:
    base = tiny_base(arch, seed, layers, init_range)
    torch.manual_seed(seed + 1)
    return HMoRAModel(base, load_config(preset, overrides), task_token_id=QUESTION_ID)


def randomize_adapters(model: HMoRAModel, seed: int = 0, scale: float = 0.2) -> None:
    """Give B (zero at init) random values so the adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def batch(bsz: int = 3, length: int = 12, seed: int = 0, left_pad: bool = False):
    """A padded batch with prompt and target parts: ids, attention, labels, prompt mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (bsz, length), generator=gen)
    attn = torch.ones(bsz, length, dtype=torch.long)
    labels = torch.full((bsz, length), -100)
    prompt = torch.zeros(bsz, length, dtype=torch.long)
    for i in range(bsz):
        real = length - 2 * i  # row i has 2·i padding tokens
        p_len = max(2, real // 2 + i - 1)
        start = length - real if left_pad else 0
        if left_pad:
            attn[i, :start] = 0
            ids[i, :start] = 0
        else:
            attn[i, real:] = 0
            ids[i, real:] = 0
        prompt[i, start : start + p_len] = 1
        labels[i, start + p_len : start + real] = ids[i, start + p_len : start + real]
    return ids, attn, labels, prompt


@pytest.fixture
def qwen_hmora():
    return tiny_hmora("hmora", "qwen2")


@pytest.fixture(scope="session")
def tiny_run_inputs(tmp_path_factory):
    """Tiny LLaMA dir with SmolLM2's real tokenizer + a JSONL of real Q/A (see _train_helpers).

    ``HMORA_TINY_RUN_INPUTS=DIR`` uses a copy made earlier by ``make_tiny_run_inputs`` (the GPU
    machine cannot fetch SmolLM2's tokenizer; the directory is carried there instead).
    """
    from tests._train_helpers import make_tiny_run_inputs

    prepared = os.environ.get("HMORA_TINY_RUN_INPUTS")
    if prepared:
        return Path(prepared).resolve()
    return make_tiny_run_inputs(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def ep_runs(tmp_path_factory):
    """The expert-parallel (EP = 2) runs of every method in ``tests._dist.EP_CASES``, made in
    one 2-rank spawn; each method's test compares ``ep_runs / <its module name>`` with its
    replicated reference."""
    from tests._dist import EP_CASES, ep_cases_worker, run_ranks

    out = tmp_path_factory.mktemp("ep_runs")
    run_ranks(ep_cases_worker, 2, out, out, EP_CASES, timeout=300)
    return out
