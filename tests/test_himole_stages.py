"""HiMoLE's two-stage training (docs/methods.md, "HiMoLE: two-stage training"): stage 1 routes
each sequence within its cluster's group only (exactly zero gradient for every other group),
the experts of a group start as copies of one expert, stage 2's learning rate is scaled, and
through the real launcher: the clustering is computed before the model is built, saved in the
run directory and the checkpoints, shown in the summary and reused on resume; a resume across
the stage boundary repeats the uninterrupted run bit for bit; ZeRO-2/3 with two ranks equal
one process. Tiny random-init models: mechanics only."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import batch, randomize_adapters, tiny_hmora

# N = 2 groups of M = 2 experts, top-2 (= M), every layer a diversity site.
SMALL = {
    "options.groups": 2, "options.experts_per_group": 2, "adapter.num_experts": 4,
    "adapter.dropout": 0.0, "options.div_every": 1, "options.cluster_candidates": [],
}  # fmt: skip


def _expert_grads(model, m: int) -> dict[str, torch.Tensor]:
    """Per adapted site and group n: the gradient of group n's A rows and B columns."""
    out = {}
    for name, mod in model.adapted_modules().items():
        e = mod.router.num_experts
        r = mod.lora_A.shape[0] // e
        ga = mod.lora_A.grad.view(e // m, m * r, -1)
        gb = mod.lora_B.grad.view(mod.lora_B.shape[0], e // m, m * r)
        for n in range(e // m):
            out[f"{name}.g{n}"] = torch.cat([ga[n].flatten(), gb[:, n].flatten()])
    return out


def test_stage1_trains_only_the_cluster_group():
    """Guards against stage 1 leaking into other groups (a sentence gate that is only
    down-weighted, a top-k over all N·M experts, a token-router softmax over every expert):
    a batch of cluster-1 sequences gives every expert of group 0, and the token router's
    group-0 rows, exactly zero gradient, while group 1 and the token router train; the
    sentence router is not in the stage-1 forward (no gradient). Without ``cluster`` the
    same model routes hierarchically and every group gets a gradient."""
    torch.manual_seed(0)
    model = tiny_hmora("himole", overrides=SMALL).double()
    randomize_adapters(model)
    ids, attn, labels, prompt = batch(bsz=3, seed=1)
    out = model(ids, attn, labels, prompt, cluster=torch.tensor([1, 1, 1]))
    gates = [r.probs for r in out.routing_records if r.kind == "token"]
    assert gates and all((g[..., :2] == 0).all() and (g[..., 2:] > 0).all() for g in gates)
    out.loss.backward()
    grads = _expert_grads(model, 2)
    for name, g in grads.items():
        if name.endswith(".g0"):
            assert torch.equal(g, torch.zeros_like(g)), name
        else:
            assert g.abs().sum() > 0, name
    for group in model.routers.values():
        w = group.token_router.linear.weight.grad
        assert torch.equal(w[:2], torch.zeros_like(w[:2])) and w[2:].abs().sum() > 0
        assert group.sentence_router.linear.weight.grad is None
    # One AdamW step (no weight decay): group 0 is left exactly as it was.
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                      weight_decay=0.0).step()  # fmt: skip
    changed = {n: not torch.equal(p, before[n]) for n, p in model.named_parameters()
               if p.requires_grad}  # fmt: skip
    for name, mod in model.adapted_modules().items():
        key = next(k for k in before if k.endswith(f"{name}.lora_A"))
        a0 = before[key].view(2, 2 * (mod.lora_A.shape[0] // 4), -1)
        assert torch.equal(mod.lora_A.detach().view_as(a0)[0], a0[0]) and changed[key]
    model.zero_grad()
    model(ids, attn, labels, prompt).loss.backward()
    assert all(g.abs().sum() > 0 for g in _expert_grads(model, 2).values())


def test_stage1_mixed_batch_routes_each_sequence_to_its_group():
    """Guards against the cluster being applied to the wrong rows (or broadcast from the
    first sequence): in a batch of clusters [0, 1, 0] the gates of sequence b are non-zero
    only on group cluster[b]'s experts, with top-k inside it."""
    torch.manual_seed(0)
    model = tiny_hmora("himole", overrides=SMALL)
    ids, attn, labels, prompt = batch(bsz=3, seed=2)
    out = model(ids, attn, labels, prompt, cluster=torch.tensor([0, 1, 0]))
    for rec in (r for r in out.routing_records if r.kind == "token"):
        p = rec.probs
        assert (p[[0, 2], :, 2:] == 0).all() and (p[1, :, :2] == 0).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:2], dtype=p.dtype))


def test_start_training_copies_one_expert_per_group_and_lr_scale():
    """Guards against groups starting from different experts' initialisations (the paper's
    stage 1 starts each group's experts from one initialisation), against copying across
    groups, against the one-stage preset being touched, and against the stage-2 scale
    starting a step early or late: floor(stage1_fraction × max_steps) steps at scale 1."""
    from hmora_ds.methods.base import build_method

    torch.manual_seed(0)
    model = tiny_hmora("himole", overrides=SMALL)
    randomize_adapters(model)
    model.method.start_training(model)
    for mod in model.adapted_modules().values():
        r = mod.lora_A.shape[0] // 4
        a = mod.lora_A.detach().view(2, 2, r, -1)
        b = mod.lora_B.detach().view(-1, 2, 2, r)
        assert torch.equal(a[:, 0], a[:, 1]) and not torch.equal(a[0, 0], a[1, 0])
        assert torch.equal(b[:, :, 0], b[:, :, 1])
    one = tiny_hmora("himole_one_stage", overrides={**SMALL, "options.stage1_fraction": 0.0})
    before = {n: p.detach().clone() for n, p in one.named_parameters()}
    one.method.start_training(one)
    assert all(torch.equal(p, before[n]) for n, p in one.named_parameters())
    method = build_method(model.config)
    assert [method.lr_scale(s, 7) for s in range(7)] == [1.0] * 3 + [0.1] * 4
    assert method.stage1_steps(7) == 3 and method.stage1_steps(6) == 3
    assert [one.method.lr_scale(s, 6) for s in range(6)] == [1.0] * 6


# ------------------------------------------------------------------ through the launcher
@pytest.mark.slow
def test_two_stage_run_clusters_once_and_resumes_across_the_boundary(tiny_run_inputs, tmp_path):
    """Guards against the clustering being lost or recomputed on resume, against stage 2's lr
    not being scaled (or scaled from the wrong step), and against a resume at the stage
    boundary that does not repeat the uninterrupted run (a stage chosen from the wrong step
    counter, a re-copied initialisation, a schedule scale not restored): the himole preset
    on the tiny model clusters its prompts once (N by silhouette, saved in the run directory
    and the checkpoint, shown in summary.json and the closing message), a run killed while
    saving step 6 resumes from step 3 (the last stage-1 step) without clustering again and
    ends bit for bit in the uninterrupted run's adapter and optimizer state; a resume whose
    config does not allow the saved N is a one-line error."""
    from hmora_ds.cluster import Clustering
    from hmora_ds.train.checkpoint import safe_load
    from tests._train_helpers import NO_DROPOUT, assert_same_final_state, launch, overrides
    from tests._train_helpers import summary as read_summary

    root = tiny_run_inputs
    common = (*NO_DROPOUT, "preset=himole", "train.micro_batch_size=2", "checkpoint.keep_last=3")
    ref, out = tmp_path / "uninterrupted", tmp_path / "crashed"
    log = launch("python", "zero2.json", overrides(root, ref, *common))
    saved = Clustering.load(ref / "clustering.json")
    assert saved.chosen_n in (2, 3, 4) and set(saved.silhouette) == {2, 3, 4}
    assert saved.silhouette[saved.chosen_n] == max(saved.silhouette.values())
    assert Clustering.load(ref / "checkpoints" / "step00000003" / "clustering.json") == saved
    s = read_summary(ref)["clustering"]
    assert s["chosen_n"] == saved.chosen_n and s["num_experts"] == 4 * saved.chosen_n
    assert s["stage1_steps"] == 3 and s["sizes"] == saved.sizes and s["stage2_lr_scale"] == 0.1
    assert f"stage 1      3 steps on N={saved.chosen_n} clusters" in log
    meta = json.loads((ref / "adapter" / "adapter_config.json").read_text())
    assert meta["config"]["options"]["groups"] == saved.chosen_n
    # The lr DeepSpeed's optimizer holds after step 3 (the lr of step 4, the first of stage 2):
    # each group's initial lr × the linear schedule (warm-up 2, 6 steps: 0.75) × 0.1; after
    # step 2 (the lr of step 3, stage 1) × 1.
    for tag, want in (("step00000003", 0.75 * 0.1),):
        state = safe_load(next((ref / "checkpoints" / tag).glob("*optim_states.pt")))
        for group in state["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]:
            assert group["lr"] == pytest.approx(group["initial_lr"] * want, rel=1e-9), tag
    launch("python", "zero2.json", overrides(root, out, *common),
           env={"HMORA_CRASH_DURING_SAVE": "step00000006"}, expect=17)  # fmt: skip
    bad = launch("python", "zero2.json",
                 [*overrides(root, out, *common, "method.options.cluster_candidates=[5]",
                             "method.options.max_experts=20"), "--resume", "auto"],
                 expect=2)  # fmt: skip
    err = [line for line in bad.splitlines() if line.startswith("error: ")]
    assert err and err[0].startswith(
        f"error: method.options.cluster_candidates: the run being resumed clustered its "
        f"prompts into N={saved.chosen_n}"
    ), bad[-2000:]
    resumed = launch("python", "zero2.json", [*overrides(root, out, *common), "--resume", "auto"])
    assert "resumed: clustering loaded" in resumed and "embed prompts" not in resumed
    assert Clustering.load(out / "clustering.json") == saved
    assert_same_final_state(out, ref)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.max_steps=1"],
         r"^method\.options\.stage1_fraction: 0\.5 × train\.max_steps=1 leaves no stage-1 step; "
         r"raise one or set it to 0$"),
        (["model.adapter=/nonexistent"], r"^model\.adapter: method himole trains in two stages"),
    ],
)  # fmt: skip
def test_bad_two_stage_settings_are_one_line_errors(overrides, message):
    """Guards against a two-stage run that would silently train in one stage (a stage 1 of
    zero steps) or re-cluster and re-copy the experts of a trained adapter: one line each,
    naming the field and the way out, before anything is loaded."""
    from hmora_ds.train.config import load_run_config
    from hmora_ds.train.stages import plan_stages

    run = load_run_config(None, ["preset=himole", *overrides])
    with pytest.raises(ValueError, match=message) as err:
        plan_stages(run, run.hmora_config(), None, None, None, [], None)
    assert "\n" not in str(err.value)
