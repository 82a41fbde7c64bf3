"""``hmora-ds generate`` and ``hmora-ds chat`` on the real SmolLM2-135M-Instruct.

The adapter is HMoRA w LW at initialisation (B = 0): its answers must be exactly the base
model's, which makes the routing-from-the-prompt path checkable against plain HF generation.
"""

from __future__ import annotations

import io
import json

import pytest
import torch

from hmora_ds.generate import conversation, read_inputs


def test_each_input_shape_becomes_a_conversation_and_bad_lines_name_their_line(tmp_path):
    assert conversation({"prompt": "hi", "system": "be brief"}, "f:1") == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert conversation({"instruction": "Add", "input": "2 and 3"}, "f:1") == [
        {"role": "user", "content": "Add\n\n2 and 3"}
    ]
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    msgs.append({"role": "user", "content": "c"})
    assert conversation({"messages": msgs}, "f:1") == msgs
    with pytest.raises(ValueError, match=r"^f:2: no prompt; give one of prompt, source"):
        conversation({"question": "x"}, "f:2")
    with pytest.raises(ValueError, match=r"^f:3: the last message must be the user's"):
        conversation({"messages": msgs[:2]}, "f:3")
    # The rules of training data: ShareGPT's keys and roles, normalised; alternation; types.
    sharegpt = [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}]
    assert conversation({"messages": sharegpt}, "f:4") == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
    ]
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(
        ValueError, match=r"^f:5: roles do not alternate user/assistant \(message 2"
    ):
        conversation({"messages": two_users}, "f:5")
    with pytest.raises(ValueError, match=r"^f:6: non-list field 'messages' \(str\)$"):
        conversation({"messages": "hi"}, "f:6")
    with pytest.raises(ValueError, match=r"^f:7: unknown role 'bot' \(message 1"):
        conversation({"messages": [{"role": "bot", "content": "x"}]}, "f:7")
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"in.jsonl:2: invalid JSON"):
        read_inputs(bad)


@pytest.fixture(scope="module")
def smollm2_adapter(tmp_path_factory):
    from hmora_ds import assets
    from hmora_ds.adapter_io import save_adapter
    from hmora_ds.config import load_config
    from hmora_ds.model import HMoRAModel
    from hmora_ds.runtime.loading import load_base_model, load_tokenizer, resolve_checkpoint
    from tests._assets import require_asset

    path = require_asset(assets.SMOLLM2, lambda: resolve_checkpoint("smollm2-135m-instruct"))
    tok = load_tokenizer(path)
    model = HMoRAModel(
        load_base_model(path, torch.float32, "sdpa"), load_config("hmora_lw"), tokenizer=tok
    )
    out = tmp_path_factory.mktemp("adapter")
    save_adapter(model, out)
    return out


@pytest.mark.slow
def test_generate_writes_answers_in_order_and_an_initial_adapter_answers_as_the_base(
    smollm2_adapter, tmp_path
):
    from hmora_ds.generate import main

    rows = [
        {"prompt": "What is the capital of France?", "id": 1},
        {"instruction": "Say hello.", "id": 2},
        {"messages": [{"role": "system", "content": "Answer in one word."},
                      {"role": "user", "content": "What colour is the sky?"}], "id": 3},
    ]  # fmt: skip
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", "smollm2-135m-instruct", "--input", str(src), "--max-new-tokens", "12"]
    assert main([*common, "--output", str(tmp_path / "base.jsonl"), "--batch-size", "2"]) == 0
    assert main([*common, "--output", str(tmp_path / "ad.jsonl"), "--adapter",
                 str(smollm2_adapter), "--batch-size", "3"]) == 0  # fmt: skip
    base = [json.loads(x) for x in (tmp_path / "base.jsonl").read_text().splitlines()]
    ours = [json.loads(x) for x in (tmp_path / "ad.jsonl").read_text().splitlines()]
    assert [r["id"] for r in base] == [1, 2, 3] == [r["id"] for r in ours]
    assert "Paris" in base[0]["response"]
    assert all(r["response"] for r in base)
    assert [r["response"] for r in ours] == [r["response"] for r in base]


@pytest.mark.slow
def test_chat_streams_answers_keeps_the_conversation_and_shows_routing(
    smollm2_adapter, monkeypatch, capsys
):
    from hmora_ds.chat import main

    lines = "What is the capital of France?\n/routing\nAnd of Germany?\n/reset\n/exit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    args = ["--model", "smollm2-135m-instruct", "--adapter", str(smollm2_adapter)]
    assert main([*args, "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2
    assert "Paris" in out.split("assistant> ")[1]
    # One line per layer (30 in SmolLM2), each naming its routers' top experts.
    routed = [ln for ln in out.splitlines() if ln.strip().startswith("layer ")]
    assert len(routed) == 30 and "gate_up.task [" in routed[-1]
    assert "(conversation reset)" in out


@pytest.mark.slow
def test_long_conversations_lose_their_oldest_turns_and_the_instruction_is_the_newest_message():
    from hmora_ds.inference import GenerationConfig, Generator, load_for_inference

    tok, model = load_for_inference("smollm2-135m-instruct")
    gen = Generator(tok, model, GenerationConfig(max_input_tokens=80))
    system = {"role": "system", "content": "You are terse."}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"Question number {i} about apples?"},
                  {"role": "assistant", "content": f"Answer {i}."}]  # fmt: skip
    turns.append({"role": "user", "content": "Last question about pears?"})
    enc, dropped = gen.encode([system, *turns])
    assert dropped > 0 and dropped % 2 == 0 and len(enc["input_ids"]) <= 80
    text = tok.decode(enc["input_ids"])
    assert "You are terse." in text and "Question number 0" not in text
    first, end = enc["instruction_span"]
    assert tok.decode(enc["input_ids"][first:end]).strip() == "Last question about pears?"
    with pytest.raises(ValueError, match=r"^prompt: \d+ tokens exceed --max-input-tokens 80"):
        gen.encode([{"role": "user", "content": "pears " * 200}])
