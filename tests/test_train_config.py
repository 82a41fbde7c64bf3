"""Run config, DeepSpeed config filling, lr schedules and checkpoint bookkeeping (no ranks)."""

import math
from pathlib import Path

import pytest

from hmora_ds.train import checkpoint as ckpt
from hmora_ds.train.config import RunConfig, load_run_config
from hmora_ds.train.deepspeed_config import build_ds_config, read_ds_config
from hmora_ds.train.schedule import lr_lambda

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_load_and_paper_defaults():
    default = load_run_config(REPO / "configs" / "default.yaml")
    assert default.preset == "hmora_lw" and default.data.kind == "offline"
    t = RunConfig().train  # paper §4.1
    assert (t.lr, t.warmup_steps, t.micro_batch_size * t.grad_accum) == (2e-5, 500, 12)
    assert RunConfig().hmora_config().loss.label_smoothing == 0.1


def test_overrides_reach_run_and_method():
    run = load_run_config(None, ["train.lr=5e-3", "method.routing.eps=2", "method.adapter.rank=4"])
    assert run.train.lr == 0.005
    cfg = run.hmora_config()
    assert cfg.routing.eps == 2 and cfg.adapter.rank == 4 and cfg.preset == "hmora_lw"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lr=-1"], r"^train\.lr: must be > 0"),
        (["train.lr=fast"], r"^train\.lr: must be a number"),
        (["train.grad_accum=0"], r"^train\.grad_accum: must be a positive integer"),
        (["train.schedule=step"], r"^train\.schedule"),
        (["data.kind=local"], r"^data\.path: is required with data\.kind=local"),
        (["method.routing.top_k=99"], r"^routing\.top_k"),
        (["train.nope=1"], r"unknown key 'train\.nope'"),
        (["method.loss.aux_weight=.nan"], r"^loss\.aux_weight: is NaN"),
        (["train.compile=all"], r"^train\.compile: must be none, blocks or layers, got 'all'$"),
        (
            ["train.compile=blocks", "train.gradient_checkpointing=true"],
            r"^train\.compile: blocks cannot run inside checkpointed layers .* use "
            r"train\.compile=layers with train\.gradient_checkpointing$",
        ),
        (
            ["train.compile=layers", "parallel.ep_size=2"],
            r"^train\.compile: not available with expert parallelism .* use train\.compile=none$",
        ),
        (["train.ce_chunk_tokens=-1"], r"^train\.ce_chunk_tokens: must be an integer >= 0"),
    ],
)
def test_bad_run_configs_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(None, overrides)


def test_ds_config_auto_values_are_filled():
    run = load_run_config(
        None, ["train.micro_batch_size=3", "train.grad_accum=4", "train.grad_clip=0.5"]
    )
    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):
        cfg = build_ds_config(read_ds_config(REPO / "ds_configs" / name), run, 2, on_cpu=True)
        assert cfg["train_micro_batch_size_per_gpu"] == 3
        assert cfg["gradient_accumulation_steps"] == 4
        assert cfg["train_batch_size"] == 24
        assert cfg["gradient_clipping"] == 0.5
        assert "bf16" not in cfg and "optimizer" not in cfg
    offload = build_ds_config(
        read_ds_config(REPO / "ds_configs" / "zero3_offload.json"), run, 1, on_cpu=False
    )
    assert offload["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.parametrize(
    ("ds", "message"),
    [
        (
            {"train_micro_batch_size_per_gpu": 8},
            r"train_micro_batch_size_per_gpu=8 conflicts with run config train\.micro_batch_size=4",
        ),
        (
            {"gradient_accumulation_steps": 1},
            r"gradient_accumulation_steps=1 conflicts with run config train\.grad_accum=3",
        ),
        ({"train_batch_size": 7}, r"train_batch_size=7 conflicts"),
        ({"gradient_clipping": 2.0}, r"gradient_clipping=2\.0 conflicts .* train\.grad_clip=1\.0"),
        ({"optimizer": {"type": "AdamW"}}, r"ds_config optimizer: hmora-ds builds"),
        ({"bf16": {"enabled": True}}, r"bf16\.enabled=True: precision comes from"),
    ],
)
def test_ds_config_conflicts_name_both_values(ds, message):
    with pytest.raises(ValueError, match=message):
        build_ds_config(ds, RunConfig(), 1, on_cpu=True)


def test_bf16_autocast_is_declared_to_deepspeed():
    """DeepSpeed's engine disables an outer torch.autocast unless torch_autocast is on."""
    ds = read_ds_config(REPO / "ds_configs" / "zero2.json")
    bf16 = build_ds_config(ds, load_run_config(None, ["train.precision=bf16"]), 1, on_cpu=True)
    assert bf16["torch_autocast"] == {
        "enabled": True,
        "dtype": "bfloat16",
        "lower_precision_safe_modules": [],  # gradients of fp32 adapters reduced in fp32
    }
    gpu_auto = build_ds_config(ds, RunConfig(), 1, on_cpu=False)
    assert gpu_auto["torch_autocast"]["enabled"] is True
    assert "torch_autocast" not in build_ds_config(ds, RunConfig(), 1, on_cpu=True)
    with pytest.raises(ValueError, match="ds_config torch_autocast: precision comes from"):
        build_ds_config({"torch_autocast": {"enabled": True}}, RunConfig(), 1, on_cpu=True)


def test_read_ds_config_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_ds_config(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_ds_config(bad)


def test_lr_schedules():
    assert [lr_lambda(s, 4, 10, "linear") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_lambda(4, 4, 10, "linear") == 1.0 and lr_lambda(10, 4, 10, "linear") == 0.0
    assert lr_lambda(7, 4, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_lambda(9, 4, 10, "constant") == 1.0
    assert lr_lambda(10, 0, 10, "linear", min_ratio=0.1) == pytest.approx(0.1)


def _fake_ckpt(root: Path, step: int, complete: bool = True) -> None:
    d = root / ckpt.tag_for(step)
    d.mkdir(parents=True)
    if complete:
        ckpt.write_manifest(d, step)


def test_prune_keeps_newest_and_protected(tmp_path):
    for s in (1, 2, 3, 4):
        _fake_ckpt(tmp_path, s)
    _fake_ckpt(tmp_path, 5, complete=False)  # an older layout's save in progress: left alone
    (tmp_path / f"{ckpt.TMP_PREFIX}step00000006").mkdir()  # a killed save: removed
    ckpt.prune(tmp_path, keep_last=2, protect={ckpt.tag_for(1)})
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["step00000001", "step00000003", "step00000004", "step00000005"]


def test_find_checkpoint(tmp_path):
    _fake_ckpt(tmp_path / "checkpoints", 3)
    assert ckpt.find_checkpoint(tmp_path) == (tmp_path / "checkpoints", "step00000003")
    assert ckpt.find_checkpoint(tmp_path / "checkpoints" / "step00000003")[1] == "step00000003"
    _fake_ckpt(tmp_path / "checkpoints", 4, complete=False)
    # The newest *complete* checkpoint, whatever `latest` says (or without one).
    assert ckpt.find_checkpoint(tmp_path / "checkpoints")[1] == "step00000003"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.find_checkpoint(tmp_path / "checkpoints" / "step00000004")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        ckpt.find_checkpoint(tmp_path / "elsewhere")
