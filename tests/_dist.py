"""Spawning several CPU (gloo) ranks from a test, always with a timeout."""

from __future__ import annotations

import os
import time

import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, fn, args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, tmp_path, *args, timeout: float = 120.0) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; fail (never hang) after timeout."""
    init_file = str(tmp_path / "dist_init")
    if os.path.exists(init_file):
        os.remove(init_file)
    ctx = mp.start_processes(
        _entry, args=(world, init_file, fn, args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{world}-rank run of {fn.__name__} exceeded {timeout:.0f}s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_command(cmd: list[str], timeout: float, env: dict | None = None, cwd=None):
    """Run a launcher command; on timeout kill its whole process group and fail loudly."""
    import signal
    import subprocess

    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise TimeoutError(
            f"{' '.join(cmd[:4])}… exceeded {timeout:.0f}s:\n{out[-3000:]}"
        ) from None
    return proc.returncode, out


def ep_gradients(per_rank: list[dict], experts_per_rank) -> dict:
    """The gradients of an expert-parallel run under one process's names: replicated tensors
    summed over ranks (each rank's is its share of the batch), each rank's local experts
    renumbered to their global index (rank r holds experts E_r·r … E_r·r + E_r − 1).
    ``experts_per_rank``: E_r, or a function of the bank's parameter prefix giving its E_r
    (methods with different expert counts per site)."""
    from hmora_ds.parallel.expert_parallel import standardize_state_dict

    replicated, experts = {}, {}
    for r, grads in enumerate(per_rank):
        for n, t in grads.items():
            if ".deepspeed_experts." in n:
                prefix, local, kind = n.rsplit(".", 2)
                e_r = experts_per_rank(prefix) if callable(experts_per_rank) else experts_per_rank
                experts[f"{prefix}.{e_r * r + int(local)}.{kind}"] = t
            else:
                replicated[n] = replicated.get(n, 0) + t
    return standardize_state_dict({**replicated, **experts})


class _Rank:
    """A stand-in process group of a simulated two-rank run (see ``two_ranks``)."""


def two_ranks(monkeypatch, fn, mine, other):
    """``fn(*mine, group=…)`` as rank 0 of a two-rank run whose rank 1 holds ``other``, in one
    process: every all-reduce of rank 0 adds the tensor rank 1 passed to the same all-reduce.

    The real collective is exercised by the multirank tests; this runs in the fast suite and
    fails when a loss does not hand its ``group`` down to each all-reduce (the statistic
    then covers one rank's half of the batch).
    """
    import hmora_ds.losses as losses

    rank0, rank1, sent = _Rank(), _Rank(), []

    def record(t, group):
        if group is None:
            return t
        assert group is rank1, "an all-reduce received another group than the caller's"
        sent.append(t.detach().clone())
        return t

    monkeypatch.setattr(losses, "_all_reduce", record)
    fn(*other, group=rank1)
    received = iter(sent)

    def add(t, group):
        if group is None:
            return t
        assert group is rank0, "an all-reduce received another group than the caller's"
        return t + next(received)

    monkeypatch.setattr(losses, "_all_reduce", add)
    out = fn(*mine, group=rank0)
    assert next(received, None) is None, "rank 0 made fewer all-reduces than rank 1"
    assert sent, "no all-reduce received the caller's group"
    return out


def ep_rank_forward(model, world: int, rank: int):
    """Rank ``rank`` of an expert-parallel run (EP = ``world``, gloo) in a spawned worker: the
    model's experts split off (returns how many blocks were converted), the expert-parallel
    group bound to every block, and a forward on this rank's half of the 4-sequence test batch
    (``conftest.batch(bsz=4, seed=7)``). Returns ``(blocks, output)``."""
    from hmora_ds.parallel.expert_parallel import expert_parallel_blocks, to_expert_parallel
    from tests.conftest import batch
    from tests.test_expert_parallel import _ep_setup

    blocks = to_expert_parallel(model, world, rank)
    group = _ep_setup(world)
    for block in expert_parallel_blocks(model).values():
        block.bind_group(group)
    ids, attn, labels, prompt = batch(bsz=4, seed=7)
    mine = slice(2 * rank, 2 * rank + 2)
    return blocks, model(ids[mine], attn[mine], labels[mine], prompt[mine])


#: Test modules whose ``_ep_worker(rank, world, out_dir)`` runs in the one shared
#: expert-parallel spawn (:func:`ep_cases_worker`, fixture ``ep_runs`` in conftest.py).
EP_CASES = ("tests.test_himole", "tests.test_adamole", "tests.test_moelora", "tests.test_mola")


def ep_cases_worker(rank: int, world: int, out_dir, modules) -> None:
    """One spawned rank running the expert-parallel worker of every module in ``modules``,
    each writing into ``out_dir/<module's last name>/``: the methods' EP = replicated checks
    share one 2-rank start (process start-up and imports dominate their cost)."""
    import importlib

    for name in modules:
        target = out_dir / name.rsplit(".", 1)[-1]
        target.mkdir(exist_ok=True)
        importlib.import_module(name)._ep_worker(rank, world, target)


def _ep_value(out, key: str):
    if key == "loss":
        return out.loss
    if key == "logits":
        return out.logits
    return out.aux_by_kind[key]


def loss_objective(out, rank: int):
    """The objective of an EP check: the model's own loss (LM + weighted auxiliary losses)."""
    return out.loss


def logits_objective(out, rank: int):
    """The objective of an EP check that must reach every logit: a fixed random weighting of
    the logits (seeded by rank) plus the auxiliary losses."""
    import torch

    w = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(rank))
    return (out.logits * w.to(out.logits.dtype)).sum() + out.aux_loss


def save_ep_rank(model, out, rank: int, out_dir, keys=("loss",), objective=loss_objective):
    """In an EP worker: backpropagate ``objective`` and save the ``keys`` of the output
    (``loss``, ``logits`` or an auxiliary kind) and the gradients to ``out_dir/r{rank}.pt``."""
    import torch

    objective(out, rank).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    saved = {k: _ep_value(out, k).detach() for k in keys}
    torch.save({**saved, "grads": grads}, out_dir / f"r{rank}.pt")


def check_ep_equals_replicated(ref, runs, experts_per_rank, *, keys=("loss",),
                               objective=loss_objective, out_tol=1e-9,
                               grad_tol=(1e-7, 1e-9)) -> dict:  # fmt: skip
    """Compare the two ranks' files of an EP run (:func:`save_ep_rank`) with the replicated
    reference model ``ref`` on each rank's half of ``conftest.batch(bsz=4, seed=7)``: each
    saved output equals the reference's on those rows, and the gradients (replicated tensors
    summed over ranks, experts renumbered: :func:`ep_gradients`) equal the reference's of the
    summed objective. Returns the standardised EP gradients."""
    import torch

    from tests.conftest import batch

    ids, attn, labels, prompt = batch(bsz=4, seed=7)
    got = [torch.load(runs / f"r{r}.pt") for r in range(2)]
    total = 0
    for rank in range(2):
        mine = slice(2 * rank, 2 * rank + 2)
        out = ref(ids[mine], attn[mine], labels[mine], prompt[mine])
        for key in keys:
            want = _ep_value(out, key).detach()
            torch.testing.assert_close(got[rank][key], want, rtol=out_tol, atol=out_tol, msg=key)
        total = total + objective(out, rank)
    total.backward()
    std = ep_gradients([g["grads"] for g in got], experts_per_rank)
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert std.keys() == want.keys()
    rtol, atol = grad_tol
    for n, g in want.items():
        torch.testing.assert_close(std[n], g, rtol=rtol, atol=atol, msg=n)
    return std
