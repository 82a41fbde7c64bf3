"""LoraHub (``hmora_ds.methods.lorahub``, ``python -m hmora_ds.library lorahub``): the
composition's equations and cross-terms against hand-computed values, the search (same seed →
same weights; never worse than the start w = 0, which it evaluates), the written adapter
(loads, and its forward is base + the composed update), the objective against an independent
computation, split over two gloo ranks, a dead rank, and every refused input.

Tiny random-init models (mechanics) with SmolLM2's real tokenizer (``tiny_run_inputs``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hmora_ds.adapter_io import load_adapter, read_adapter_config, save_adapter
from hmora_ds.config import load_config
from hmora_ds.library import Library, LibraryEntry, load_lora
from hmora_ds.library.cli import main
from hmora_ds.library.hub import LoraHubOptions, check_options, example_batches
from hmora_ds.methods.lorahub import (
    Composer,
    LoraHubError,
    compose,
    cross_entropy,
    few_shot_objective,
    l1_penalty,
    search,
)
from hmora_ds.model import HMoRAModel
from tests._lorahub_ranks import dying_rank, two_rank_search, wavy
from tests.conftest import randomize_adapters


# ---------------------------------------------------------------------------- compose
def test_compose_by_hand():
    A1, A2 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])
    B1, B2 = torch.tensor([[1.0], [0.0]]), torch.tensor([[2.0], [1.0]])
    A, B = compose([A1, A2], [B1, B2], torch.tensor([2.0, -1.0]))
    torch.testing.assert_close(A, torch.tensor([[-1.0, 5.0]]))
    torch.testing.assert_close(B, torch.tensor([[0.0], [-1.0]]))
    # B A = Σ_i Σ_j w_i w_j B_i A_j: the composed update has cross-terms i ≠ j
    torch.testing.assert_close(B @ A, torch.tensor([[0.0, 0.0], [1.0, -5.0]]))
    no_cross = 2 * (B1 @ A1) - (B2 @ A2)  # Σ_i w_i B_i A_i would be a different update
    torch.testing.assert_close(no_cross, torch.tensor([[-4.0, 6.0], [-3.0, 1.0]]))


def test_compose_cross_terms_random():
    gen = torch.Generator().manual_seed(0)
    As = [torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    Bs = [torch.randn(5, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    w = torch.tensor([0.7, -1.2, 0.4], dtype=torch.float64)
    A, B = compose(As, Bs, w)
    want = sum(w[i] * w[j] * Bs[i] @ As[j] for i in range(3) for j in range(3))
    torch.testing.assert_close(B @ A, want)
    cross = sum(w[i] * w[j] * Bs[i] @ As[j] for i in range(3) for j in range(3) if i != j)
    assert cross.abs().max() > 0.1  # the cross-terms are really there
    assert compose(As, Bs, torch.zeros(3, dtype=torch.float64))[0].abs().max() == 0


@pytest.mark.parametrize(
    "As, Bs, w, message",
    [
        ([torch.ones(2, 3)], [torch.ones(4, 2)], torch.ones(2), "1 A, 1 B and 2 weights"),
        ([], [], torch.ones(0), "(and at least one)"),
        ([torch.ones(2, 3)] * 2, [torch.ones(4, 2)], torch.ones(2), "2 A, 1 B and 2 weights"),
        ([torch.ones(2, 3), torch.ones(2, 4)], [torch.ones(4, 2)] * 2, torch.ones(2),
         r"the A matrices differ in shape: [(2, 3), (2, 4)]"),
        ([torch.ones(2, 3)] * 2, [torch.ones(4, 2), torch.ones(4, 1)], torch.ones(2),
         "the B matrices differ in shape"),
        ([torch.ones(2, 3)], [torch.ones(4, 2)], torch.ones(1, 1),
         "weights must be a 1-D tensor, got a tensor of shape (1, 1)"),
        ([torch.ones(2, 3)], [torch.ones(4, 2)], [1.0], "weights must be a 1-D tensor, got list"),
    ],
)  # fmt: skip
def test_compose_errors(As, Bs, w, message):
    with pytest.raises(ValueError) as err:
        compose(As, Bs, w)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_l1_penalty_is_the_official_regulariser():
    assert l1_penalty([1.0, -0.5, 0.0, 0.5]) == pytest.approx(0.05 * 2.0 / 4)


# ---------------------------------------------------------------------------- search
def _bowl(w: np.ndarray) -> float:
    """Smallest at w = 0: a search that never looked at the start would end above 1."""
    return 1.0 + float(np.sum(w**2)) + l1_penalty(w)


def test_search_starts_at_zero_and_never_ends_worse():
    res = search(_bowl, 3, budget=8, seed=0)
    assert res.evaluations[0][0] == [0.0, 0.0, 0.0]
    assert res.start_objective == 1.0
    assert res.objective == 1.0 and np.all(res.weights == 0)
    assert len(res.evaluations) == 8
    assert all(abs(x) <= 1.5 for w, _ in res.evaluations for x in w)
    res = search(wavy, 3, budget=12, seed=0)
    assert res.objective < res.start_objective  # it does search
    assert res.objective == min(v for _, v in res.evaluations)
    assert wavy(res.weights) == pytest.approx(res.objective)


def test_search_is_deterministic_for_a_seed():
    a = search(wavy, 4, budget=10, seed=3)
    b = search(wavy, 4, budget=10, seed=3)
    assert a.evaluations == b.evaluations
    np.testing.assert_array_equal(a.weights, b.weights)


@pytest.mark.multirank
def test_search_split_over_two_gloo_ranks(tmp_path):
    from tests._dist import run_ranks

    run_ranks(two_rank_search, 2, tmp_path, str(tmp_path), timeout=120)
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1))
    assert r0["w"] == r1["w"] and r0["evals"] == r1["evals"]  # every rank has the result
    assert len(r0["evals"]) == 7 and r0["evals"][0][0] == [0.0, 0.0, 0.0]
    for w, v in r0["evals"]:  # each candidate's objective, whichever rank computed it
        assert v == pytest.approx(wavy(np.asarray(w)))
    assert min(v for _, v in r0["evals"]) <= r0["evals"][0][1]


@pytest.mark.multirank
def test_a_dead_rank_does_not_hang_the_others(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(dying_rank, args=(2, str(tmp_path / "init"), str(tmp_path)),
                             nprocs=2, join=False, start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + 90
    while not all(not p.is_alive() for p in ctx.processes):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("rank 0 hung after rank 1 died")
        time.sleep(0.2)
    outcome, seconds = (tmp_path / "r0.txt").read_text().rsplit(" ", 1)
    assert outcome.startswith("raised") and float(seconds) < 60


# ---------------------------------------------------------------------------- on a model
def _tiny_library(root: Path, run_inputs: Path, n: int = 2, layers: int | None = None) -> Library:
    """n random plain LoRAs (r = 8) on the tiny LLaMA of ``run_inputs``."""
    from transformers import AutoModelForCausalLM

    entries = []
    for i in range(n):
        base = AutoModelForCausalLM.from_pretrained(
            run_inputs / "model", attn_implementation="eager"
        )
        torch.manual_seed(i)
        model = HMoRAModel(base, load_config("lora_r8"))
        with torch.no_grad():  # A random (default init), B random: a LoRA that changes outputs
            randomize_adapters(model, seed=10 + i, scale=0.5)
        entries.append(LibraryEntry(f"t{i}", save_adapter(model, root / f"t{i}" / "adapter")))
    fingerprint = read_adapter_config(entries[0].adapter)["base_model"]["fingerprint"]
    lib = Library(root, str(run_inputs / "model"), fingerprint, entries)
    lib.write()
    return lib


def _examples(run_inputs: Path, path: Path, k: int = 4) -> Path:
    lines = (run_inputs / "data.jsonl").read_text().splitlines()[:k]
    path.write_text("\n".join(lines) + "\n")
    return path


def _base(run_inputs: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run_inputs / "model", attn_implementation="eager")


def test_composer_forward_is_base_plus_composed_update(tmp_path, tiny_run_inputs):
    lib = _tiny_library(tmp_path / "lib", tiny_run_inputs)
    loras = [load_lora(e.adapter) for e in lib.entries]
    model = load_adapter(_base(tiny_run_inputs), lib.entries[0].adapter).eval()
    composer = Composer(model, loras)
    w = torch.tensor([0.8, -0.3])
    composer.set_weights(w)
    mods = model.adapted_modules()
    name = next(iter(mods))
    key = name.removeprefix("base_model.")
    A, B = compose([lo[key].A for lo in loras], [lo[key].B for lo in loras], w)
    x = torch.randn(3, A.shape[1])
    want = mods[name].base_layer(x) + loras[0][key].scaling * x @ A.T @ B.T
    torch.testing.assert_close(mods[name](x), want, rtol=1e-5, atol=1e-6)
    # ... which is not the sum of the two LoRAs' own updates weighted once (cross-terms)
    own = sum(w[i] * x @ loras[i][key].delta().T for i in range(2))
    assert (mods[name](x) - mods[name].base_layer(x) - own).abs().max() > 1e-4
    composer.set_weights([0.0, 0.0])
    torch.testing.assert_close(mods[name](x), mods[name].base_layer(x))


def test_objective_is_the_plain_cross_entropy(tmp_path, tiny_run_inputs):
    from hmora_ds.runtime.loading import load_tokenizer

    lib = _tiny_library(tmp_path / "lib", tiny_run_inputs)
    tok = load_tokenizer(str(tiny_run_inputs / "model"))
    batches = example_batches(_examples(tiny_run_inputs, tmp_path / "ex.jsonl"), tok, 128, 32, 8)
    assert len(batches) == 1
    model = load_adapter(_base(tiny_run_inputs), lib.entries[0].adapter).eval()
    composer = Composer(model, [load_lora(e.adapter) for e in lib.entries])
    objective = few_shot_objective(composer, batches)
    # w = 0: the base model's own loss, as Hugging Face computes it (mean over target tokens)
    b = batches[0]
    base = _base(tiny_run_inputs).eval()
    with torch.no_grad():
        hf = base(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    assert objective(np.zeros(2)) == pytest.approx(hf.loss.item(), rel=1e-5)
    w = np.array([1.0, -0.5])
    assert objective(w) == pytest.approx(cross_entropy(model, batches) + 0.05 * 0.75)
    assert objective(w) != pytest.approx(objective(np.zeros(2)), abs=1e-3)


def _run(tmp_path, run_inputs, lib_dir, out, *extra):
    ex = _examples(run_inputs, tmp_path / "ex.jsonl")
    return main(["lorahub", "--library", str(lib_dir), "--examples", str(ex), "--out", str(out),
                 "--attn-implementation", "eager", "--max-input-tokens", "128",
                 "--max-output-tokens", "32", *extra])  # fmt: skip


def test_lorahub_command_writes_an_adapter_of_the_composition(tmp_path, tiny_run_inputs):
    lib = _tiny_library(tmp_path / "lib", tiny_run_inputs)
    out = tmp_path / "hub"
    assert _run(tmp_path, tiny_run_inputs, lib.root, out, "--budget", "6", "--seed", "1") == 0
    doc = json.loads((out / "lorahub.json").read_text())
    w = np.array([doc["weights"]["t0"], doc["weights"]["t1"]])
    assert doc["budget"] == 6 and doc["seed"] == 1 and len(doc["evaluations"]) == 6
    assert doc["evaluations"][0]["weights"] == [0.0, 0.0]
    assert doc["objective_best"] <= doc["objective_start"]
    assert doc["objective_best"] == pytest.approx(doc["loss_best"] + 0.05 * np.abs(w).mean())
    # the adapter is an ordinary plain LoRA: base + the composed update of the weights found
    loaded = load_adapter(_base(tiny_run_inputs), out).eval()
    assert loaded.config.method == "lora"
    loras = [load_lora(e.adapter) for e in lib.entries]
    mods = loaded.adapted_modules()
    for name in list(mods)[:3]:
        key = name.removeprefix("base_model.")
        A, B = compose([lo[key].A for lo in loras], [lo[key].B for lo in loras],
                       torch.tensor(w, dtype=torch.float32))  # fmt: skip
        x = torch.randn(2, A.shape[1])
        want = mods[name].base_layer(x) + loras[0][key].scaling * x @ A.T @ B.T
        torch.testing.assert_close(mods[name](x), want, rtol=1e-5, atol=1e-6)
    # its loss on the examples is the one recorded, the start's the base model's
    from hmora_ds.runtime.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_run_inputs / "model"))
    batches = example_batches(tmp_path / "ex.jsonl", tok, 128, 32, 8)
    assert cross_entropy(loaded, batches) == pytest.approx(doc["loss_best"], rel=1e-5)
    # the same seed gives the same weights
    assert _run(tmp_path, tiny_run_inputs, lib.root, tmp_path / "hub2", "--budget", "6",
                "--seed", "1") == 0  # fmt: skip
    again = json.loads((tmp_path / "hub2" / "lorahub.json").read_text())
    assert again["weights"] == doc["weights"] and again["evaluations"] == doc["evaluations"]


def _error_line(capsys) -> str:
    """The one ``error:`` line of a command (stderr also holds the model-loading bars)."""
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_lorahub_refuses_another_base_and_bad_inputs(tmp_path, tiny_run_inputs, capsys):
    lib = _tiny_library(tmp_path / "lib", tiny_run_inputs)
    path = lib.root / "library.json"
    good = json.loads(path.read_text())
    bad = json.loads(path.read_text())
    bad["base_model"]["fingerprint"]["num_hidden_layers"] = 6
    path.write_text(json.dumps(bad))
    assert _run(tmp_path, tiny_run_inputs, lib.root, tmp_path / "o1") == 2
    err = _error_line(capsys)
    assert err.startswith("error: --model ") and "of another shape: num_hidden_layers 6 " in err
    assert "\n" not in err and not (tmp_path / "o1" / "lorahub.json").exists()
    path.write_text(json.dumps(good))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [
        (["--budget", "0"], "error: --budget: must be >= 1, got 0"),
        (["--tasks", "t0,zz"], "error: --tasks: library"),
        (["--batch-size", "0"], "error: --batch-size: must be >= 1"),
    ]
    for extra, message in cases:
        assert _run(tmp_path, tiny_run_inputs, lib.root, tmp_path / "o2", *extra) == 2
        assert _error_line(capsys).startswith(message)
    assert _run(tmp_path, tiny_run_inputs, lib.root, tmp_path / "full") == 2
    assert _error_line(capsys).startswith("error: --out: ")
    assert _run(tmp_path, tiny_run_inputs, tmp_path / "nolib", tmp_path / "o3") == 2
    assert _error_line(capsys).startswith("error: --library: library: ")
    # a library whose LoRAs differ in rank cannot be composed
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_run_inputs / "model")
    r4 = save_adapter(HMoRAModel(base, load_config("lora_r8", {"adapter": {"rank": 4}})),
                      lib.root / "t2" / "adapter")  # fmt: skip
    Library(lib.root, lib.base_name, lib.fingerprint,
            [*lib.entries, LibraryEntry("t2", r4)]).write()  # fmt: skip
    assert _run(tmp_path, tiny_run_inputs, lib.root, tmp_path / "o4") == 2
    err = _error_line(capsys)
    assert err.startswith("error: --library: library ") and "mixes LoRA shapes: rank 8 (t0)" in err
    with pytest.raises(LoraHubError, match=r"--examples: .* is not a file"):
        check_options(LoraHubOptions(lib.root, tmp_path / "none.jsonl", tmp_path / "o5"))


def test_examples_without_a_usable_record_are_refused(tmp_path, tiny_run_inputs):
    from hmora_ds.runtime.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_run_inputs / "model"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"source": "a question"}) + "\n")
    with pytest.raises(LoraHubError, match=r"^--examples: ") as err:
        example_batches(bad, tok)
    assert "\n" not in str(err.value)


def test_the_deepspeed_launchers_local_rank_comes_before_the_subcommand_and_is_accepted():
    """``deepspeed -m hmora_ds.library lorahub …`` runs ``--local_rank=N lorahub …``."""
    from hmora_ds.library.cli import parse_args

    args = parse_args(["--local_rank=1", "lorahub", "--library", "lib", "--examples", "x.jsonl",
                       "--out", "out"])  # fmt: skip
    assert args.command == "lorahub" and str(args.library) == "lib"
