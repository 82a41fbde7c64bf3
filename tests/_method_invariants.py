"""Invariants every registered method must satisfy (PEFT-style), as reusable checks.

``tests/test_methods.py`` runs them over every method registered when it is collected; a method
defined elsewhere (``tests/test_toy_method.py``) calls the same functions. Tiny random-init
Qwen2 / LLaMA models (mechanics only).

- at init the model equals the base model (logits bit for bit: B = 0 and the base's own
  kernels, so this is the same computation, not two paths);
- only adapter parameters train, each in a named component (the base only for full_ft);
- save → load round trip gives the same logits (the same code path: exactly);
- gradient checkpointing gives the same loss and gradients (to 1e-5);
- a ZeRO-2 SGD step on 2 gloo ranks, each with half the batch, applies the update of one process
  with the whole batch (to 1e-4 relative), and the adapter exported from that DeepSpeed
  checkpoint loads and gives the live model's logits (to 1e-6) — one spawn checks every method;
- the TP report works on the meta device (no weights) on the Qwen2-1.5B shape;
- on a bf16 base (the default dtype on a GPU) with the adapters, routers and task encoder in
  fp32, a forward and backward run and give the loss of the same weights computed in fp32 (to
  bf16 precision).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hmora_ds.adapter_io import adapter_metadata, load_adapter, save_adapter
from hmora_ds.composition import build_model
from hmora_ds.config import HMoRAConfig
from hmora_ds.losses import total_loss
from hmora_ds.methods import adapter_parameters, build_method
from hmora_ds.model import HMoRAModel
from hmora_ds.optim import lora_plus_param_groups
from hmora_ds.params import build_meta_model, load_model_config, parameter_report
from tests.conftest import QUESTION_ID, batch, tiny_base

WORLD = 2
LR = 1e-2  # small: the updates are compared as (before − after) / lr


def no_dropout(config: HMoRAConfig) -> HMoRAConfig:
    return config.with_overrides(
        {"adapter.dropout": 0.0, "routing.router_dropout": 0.0, "routing.encoder_dropout": 0.0}
    )


def build(config: HMoRAConfig, arch: str = "qwen2", seed: int = 0) -> HMoRAModel:
    base = tiny_base(arch, seed=seed)
    torch.manual_seed(seed + 1)
    return build_model(base, config, task_token_id=QUESTION_ID)  # reads a method's library


def randomize(model: HMoRAModel, seed: int = 0) -> None:
    """B (zero at init) random, so adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter_parameters(model).items():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def check_init_equals_base(config: HMoRAConfig, arch: str) -> None:
    ids, attn, _, prompt = batch(seed=1)
    positions = (attn.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = tiny_base(arch)(input_ids=ids, attention_mask=attn, position_ids=positions).logits
        out = build(config, arch).eval()(ids, attn, prompt_mask=prompt)
    assert torch.equal(out.logits, ref), f"{config.method}: init changes the base model's output"


def check_only_adapters_train(config: HMoRAConfig) -> None:
    model = build(config)
    method = build_method(config)
    trainable = adapter_parameters(model)
    assert trainable, f"{config.method}: nothing trains"
    base_ids = {id(p) for p in model.base_model.parameters()}
    for name, p in model.named_parameters():
        component = method.component_of(name)
        if name in trainable:
            assert component in method.components, (name, component)
        if method.trains_base:
            continue
        if name in trainable:
            assert component != "base model", f"{config.method}: {name} is not an adapter"
        elif id(p) in base_ids:
            assert not p.requires_grad


def check_round_trip(config: HMoRAConfig, tmp_path: Path, arch: str = "llama") -> None:
    model = build(config, arch)
    randomize(model)
    model.eval()
    ids, attn, labels, prompt = batch()
    path = save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(tiny_base(arch), path).eval()
    with torch.no_grad():
        ref, out = model(ids, attn, labels, prompt), loaded(ids, attn, labels, prompt)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    assert loaded.config.to_dict() == model.config.to_dict()


def _loss_and_grads(model: HMoRAModel, seed: int = 2, length: int = 12):
    ids, attn, labels, prompt = batch(length=length, seed=seed)
    model.zero_grad(set_to_none=True)
    out = model(ids, attn, labels, prompt)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in adapter_parameters(model).items() if p.grad is not None}
    return out.loss.detach(), grads


def _twins(config: HMoRAConfig) -> tuple[HMoRAModel, HMoRAModel]:
    """Two models of ``config`` without dropout, with the same random adapters, in train mode."""
    config = no_dropout(config)
    plain = build(config)
    randomize(plain)
    twin = build(config)
    twin.load_state_dict(plain.state_dict())
    return plain.train(), twin.train()


def check_gradient_checkpointing(config: HMoRAConfig) -> None:
    plain, ckpt = _twins(config)
    ckpt.gradient_checkpointing_enable()
    want = _loss_and_grads(plain)
    _assert_same_loss_and_grads(_loss_and_grads(ckpt), want, config.method)


def _assert_same_loss_and_grads(got, want, what: str, atol: float = 1e-6) -> None:
    (loss_c, grads_c), (loss, grads) = got, want
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads.keys() and grads, what
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=atol, msg=name)


def check_compiled_layers(
    config: HMoRAConfig,
    backend: str = "aot_eager",
    mode: str = "layers",
    ckpt: bool = False,
    lengths: tuple[int, ...] = (12, 16, 20),
) -> None:
    """Every decoder layer compiled with ``fullgraph=True`` (no graph break anywhere in the
    routing code) gives the eager loss and gradients (to 1e-5), and a batch of a new length
    costs at most one more compilation per layer variant, none after that (no per-layer or
    per-step guard on Python state). ``backend``: ``eager`` checks dynamo's capture and
    guards; ``aot_eager`` also traces forward and backward as inductor receives them, without
    generating C++ (compilation time); one test uses inductor itself. ``lengths``: the batches'
    sequence lengths; from the third one on no new graph may be compiled."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    from hmora_ds.compile import compile_model

    eager, compiled = _twins(config)
    if ckpt:
        compiled.gradient_checkpointing_enable()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    assert compile_model(compiled, mode, fullgraph=True, backend=counter) > 0
    try:
        frames = None
        for seed, length in enumerate(lengths, start=2):
            want = _loss_and_grads(eager, seed, length)
            got = _loss_and_grads(compiled, seed, length)
            _assert_same_loss_and_grads(got, want, config.method, atol=1e-5)
            if seed == 3:  # after the second length: every layer variant is dynamic
                frames = counter.frame_count
        assert frames is None or counter.frame_count == frames, (
            f"{config.method}: a third batch length compiled again "
            f"({frames} → {counter.frame_count} graphs)"
        )
    finally:
        torch._dynamo.reset()


def check_bf16_base(config: HMoRAConfig) -> None:
    """Guards against a module that feeds the base's bf16 hidden states to its fp32 weights
    (``expected m1 and m2 to have the same dtype``): evaluation without DeepSpeed on a GPU
    loads the base in bf16 and leaves the adapter in fp32."""
    config = no_dropout(config)
    base = tiny_base("qwen2", seed=0).to(torch.bfloat16)
    torch.manual_seed(1)
    low = build_model(base, config, task_token_id=QUESTION_ID)
    randomize(low)
    assert all(p.dtype == torch.float32 for n, p in low.named_parameters() if "lora_" in n)
    ref = build_model(tiny_base("qwen2", seed=0).to(torch.bfloat16).float(), config,
                      task_token_id=QUESTION_ID)  # fmt: skip
    ref.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    loss, grads = _loss_and_grads(low)
    loss_ref, grads_ref = _loss_and_grads(ref)
    assert torch.isfinite(loss) and grads.keys() == grads_ref.keys() and grads
    torch.testing.assert_close(loss.float(), loss_ref, rtol=2e-2, atol=2e-2)


def check_meta_tp(config: HMoRAConfig) -> None:
    model = build_meta_model(load_model_config("qwen2-1.5b"), config)
    assert all(p.device.type == "meta" for p in model.parameters())
    rep = parameter_report(model)
    method = build_method(config)
    assert rep.trainable > 0 and set(rep.components) <= set(method.components)
    assert rep.format().splitlines()[-1] == f"TP {rep.tp_percent:.2f}%"


# ------------------------------------------------------------------ ZeRO-2 vs one process
def _step_model(config: HMoRAConfig) -> HMoRAModel:
    model = build(no_dropout(config))
    randomize(model)
    return model.train()


def _global_counts(labels: torch.Tensor) -> float:
    return float((labels[:, 1:] != -100).sum())


def _updates(model: HMoRAModel, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(before − after) / lr of every trainable tensor: the applied gradient (SGD, LoRA+ lr)."""
    return {n: (before[n] - p.detach()) / LR for n, p in adapter_parameters(model).items()}


def one_process_step(config: HMoRAConfig) -> dict[str, torch.Tensor]:
    """One SGD step on the whole batch: the reference of the ZeRO-2 run. (SGD, not Adam: Adam's
    first step is ±lr whatever the gradient's size, so gradients at rounding level would flip
    whole updates; SGD's update is the gradient itself.)"""
    model = _step_model(config)
    before = {n: p.detach().clone() for n, p in adapter_parameters(model).items()}
    opt = torch.optim.SGD(lora_plus_param_groups(model, LR))
    ids, attn, labels, prompt = batch(bsz=4, seed=9)
    out = model(ids, attn, labels, prompt)
    total_loss(out.lm_loss_sum / _global_counts(labels), out.aux_weighted).backward()
    opt.step()
    return _updates(model, before)


def zero2_worker(rank: int, world: int, configs: dict, out_dir: Path, plugins: list) -> None:
    """Every method: a DeepSpeed ZeRO-2 engine, one step on this rank's half of the batch,
    the updated trainable tensors (rank 0) and a checkpoint with the adapter's metadata."""
    import os

    import deepspeed
    import torch.distributed as dist

    from hmora_ds.methods import import_plugins
    from hmora_ds.runtime.dist import skip_cpu_shm_build
    from hmora_ds.train.checkpoint import save_checkpoint

    import_plugins(plugins)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    ids, attn, labels, prompt = batch(bsz=4, seed=9)
    mine = slice(2 * rank, 2 * rank + 2)
    for name, data in configs.items():
        config = HMoRAConfig.from_dict(data)
        model = _step_model(config)
        ds_config = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,
            "checkpoint": {"tag_validation": "ignore"},
        }
        before = {n: p.detach().clone() for n, p in adapter_parameters(model).items()}
        opt = torch.optim.SGD(lora_plus_param_groups(model, LR))
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
        out = engine(ids[mine], attn[mine], labels[mine], prompt[mine], aux_group=dist.group.WORLD)
        scale = world / _global_counts(labels)  # the engine averages gradients over ranks
        engine.backward(total_loss(out.lm_loss_sum * scale, out.aux_weighted))
        engine.step()
        if rank == 0:
            state = {n: p.detach().clone() for n, p in adapter_parameters(model).items()}
            torch.save({"state": state, "updates": _updates(model, before)}, out_dir / f"{name}.pt")
        if not build_method(config).trains_base:  # the trainer's own checkpoint writer
            extra = {"adapter_meta.json": adapter_metadata(model)}
            save_checkpoint(engine, out_dir / f"{name}_ckpt", 1, {}, extra, 1, set(), rank)


def check_zero2_results(configs: dict, out_dir: Path) -> None:
    """The 2-rank results of :func:`zero2_worker` against one process; export → load."""
    from hmora_ds.export import export_adapter

    for name, data in configs.items():
        config = HMoRAConfig.from_dict(data)
        want = one_process_step(config)
        saved = torch.load(out_dir / f"{name}.pt")
        got = saved["updates"]
        assert got.keys() == want.keys(), name
        assert any(v.abs().sum() > 0 for v in want.values()), name
        for tensor, value in want.items():
            torch.testing.assert_close(got[tensor], value, rtol=1e-4, atol=1e-5,
                                       msg=f"{name}: {tensor}")  # fmt: skip
        got = saved["state"]
        if build_method(config).trains_base:
            continue  # a full fine-tune has no adapter to export
        adapter = export_adapter(out_dir / f"{name}_ckpt", out_dir / f"{name}_adapter")
        loaded = load_adapter(tiny_base("qwen2"), adapter).eval()
        live = _step_model(config).eval()
        with torch.no_grad():
            for tensor, value in got.items():
                adapter_parameters(live)[tensor].copy_(value)
        ids, attn, labels, prompt = batch(seed=5)
        with torch.no_grad():
            ref, out = live(ids, attn, labels, prompt), loaded(ids, attn, labels, prompt)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-6, atol=1e-6, msg=name)
