"""Scoring: letter logits, option-count edge cases, left padding, loglik against a naive
full-sequence scorer (base and HMoRA), macro vs micro accuracy, tables.

Tiny random-init LLaMA with SmolLM2's real tokenizer and chat template (mechanics only)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hmora_ds.config import load_config
from hmora_ds.eval.benchmarks import LETTERS, EvalError, Question
from hmora_ds.eval.distributed import score_questions
from hmora_ds.eval.scoring import ScoreConfig, Scorer, accuracy
from hmora_ds.eval.suite import average
from hmora_ds.eval.tables import markdown_table
from hmora_ds.model import HMoRAModel
from hmora_ds.runtime.loading import load_tokenizer
from tests._eval_helpers import toy_questions

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_run_inputs):
    tok = load_tokenizer(str(tiny_run_inputs / "model"))
    base = AutoModelForCausalLM.from_pretrained(
        tiny_run_inputs / "model", attn_implementation="eager"
    ).eval()
    return tok, base


class ForceLetter(torch.nn.Module):
    """Wraps a model: adds +100 to one token's logit at every position."""

    def __init__(self, model, token_id: int) -> None:
        super().__init__()
        self.model, self.token_id = model, token_id

    def forward(self, **kw):
        out = self.model(**kw)
        out.logits[..., self.token_id] += 100.0
        return out


def test_forced_letter_is_predicted_and_out_of_range_letters_never(tiny):
    tok, base = tiny
    scorer = Scorer(tok, ScoreConfig(batch_size=3))
    qs = toy_questions(6)  # 3, 4 and 5 options
    for letter in "ABC":
        forced = ForceLetter(base, scorer.letter_ids[LETTERS.index(letter)])
        preds = score_questions(forced, scorer, qs, CPU)
        assert set(preds.values()) == {LETTERS.index(letter)}
    # "E" forced highest: only the 5-option questions may answer E, the others ignore it.
    forced = ForceLetter(base, scorer.letter_ids[4])
    preds = score_questions(forced, scorer, qs, CPU)
    for q in qs:
        assert (preds[q.id] == 4) == (len(q.options) == 5)
        assert preds[q.id] < len(q.options)
    # The prompt is the chat template with lettered options (what training sees).
    item = scorer.items(qs[:1], None)[0]
    text = tok.decode(item.prompt["input_ids"])
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    assert "\nA. option a" in text and "\nC. option c" in text and "\nD." not in text


def test_left_padded_batches_equal_one_by_one(tiny):
    tok, base = tiny
    qs = toy_questions(7)
    qs[2] = Question("long", "arc_easy", "A much longer question " * 6, ("x", "y", "z"), 1)
    for mode in ("letter", "loglik"):
        big = Scorer(tok, ScoreConfig(mode=mode, batch_size=4))
        one = Scorer(tok, ScoreConfig(mode=mode, batch_size=1))
        items = big.items(qs, None)
        a = big.run(base, items, CPU)
        b = one.run(base, items, CPU)
        for x, y in zip(a, b, strict=True):
            assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-4), mode


def _naive_loglik(model, prompt, option_ids):
    prompt_ids = list(prompt["input_ids"])
    ids = torch.tensor([prompt_ids + option_ids])
    kw = {"return_router_stats": False} if isinstance(model, HMoRAModel) else {}
    if isinstance(model, HMoRAModel):  # task routing from the prompt's instruction only
        pm, im = torch.zeros_like(ids), torch.zeros_like(ids)
        pm[0, : len(prompt_ids)] = 1
        first, end = prompt["instruction_span"]
        im[0, first:end] = 1
        kw["prompt_mask"], kw["instruction_mask"] = pm, im
    logp = torch.log_softmax(model(input_ids=ids, **kw).logits[0].float(), -1)
    p = len(prompt_ids)
    return sum(logp[p - 1 + k, t].item() for k, t in enumerate(option_ids))


@pytest.mark.parametrize("kind", ["base", "hmora_lw", "himole_one_stage"])
def test_loglik_shared_prefix_equals_full_sequences(tiny, tiny_run_inputs, kind):
    """Scoring options on a KV cache repeated per option equals scoring each prompt + option
    from scratch, for the base model and for methods that route on the prompt (HMoRA's task
    representation, HiMoLE's sentence representation, both repeated with the cache's rows).
    HiMoLE's decoding step once refused the repeated rows."""
    tok, base = tiny
    model = base
    if kind != "base":
        torch.manual_seed(0)
        fresh = AutoModelForCausalLM.from_pretrained(
            tiny_run_inputs / "model", attn_implementation="eager"
        ).eval()  # adapters are injected in place: never into the shared base
        model = HMoRAModel(fresh, load_config(kind), tokenizer=tok).eval()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    qs = toy_questions(5)
    qs[1] = Question("empty", "arc_easy", "Pick.", ("", "a real option"), 1)
    scorer = Scorer(tok, ScoreConfig(mode="loglik", batch_size=3))
    items = scorer.items(qs, None)
    raw = scorer.run(model, items, CPU)
    for it, scores in zip(items, raw, strict=True):
        for opt, s in zip(it.options, scores, strict=True):
            if not opt:
                assert s == float("-inf")
                continue
            ref = _naive_loglik(model, it.prompt, opt)
            assert s == pytest.approx(ref, abs=2e-3)
    preds = scorer.predict(qs, items, raw)
    assert preds[1] == 1  # the empty option is never chosen


def test_loglik_normalisations_by_hand(tiny):
    """Guards against dropping (or swapping) a log-likelihood normalisation: ``chars``
    divides an option's summed log-prob by its length in characters, ``tokens`` by its number
    of tokens, ``none`` not at all. Options whose characters and tokens differ (SmolLM2's
    tokenizer: "yes" 3 chars / 1 token, "information" 11 / 1, "2718281828" 10 / 10 digits)
    with hand-picked raw scores make the three pick three different options."""
    tok, _ = tiny
    qs = [Question("n0", "arc_easy", "Pick one.", ("yes", "information", "2718281828"), 0)]
    raw = [[-1.0, -2.0, -5.0]]
    by_hand = {
        "none": [-1.0, -2.0, -5.0],
        "chars": [-1.0 / 3, -2.0 / 11, -5.0 / 10],
        "tokens": [-1.0 / 1, -2.0 / 1, -5.0 / 10],
    }
    picks = {}
    for norm, values in by_hand.items():
        scorer = Scorer(tok, ScoreConfig(mode="loglik", norm=norm))
        items = scorer.items(qs, None)
        assert [len(o) for o in items[0].options] == [1, 1, 10]  # the premise: token counts
        picks[norm] = scorer.predict(qs, items, raw)[0]
        assert picks[norm] == max(range(3), key=values.__getitem__), norm
    assert picks == {"none": 0, "chars": 1, "tokens": 2}


def test_macro_vs_micro_and_table():
    # physics: 3/3 right, law: 0/1 right -> micro 3/4, macro (1 + 0) / 2.
    qs = [Question(f"p{i}", "mmlu", "q", ("a", "b"), 0, "physics") for i in range(3)]
    qs.append(Question("l0", "mmlu", "q", ("a", "b"), 0, "law"))
    preds = {"p0": 0, "p1": 0, "p2": 0, "l0": 1}
    res = accuracy("mmlu", qs, preds)
    assert res["micro_accuracy"] == 0.75 and res["macro_accuracy"] == 0.5
    assert res["accuracy"] == 0.5 and res["per_subject"] == {"law": 0.0, "physics": 1.0}
    arc = [Question(q.id, "arc_easy", "q", ("a", "b"), 0) for q in qs]
    assert accuracy("arc_easy", arc, preds)["accuracy"] == 0.75
    results = {
        "mmlu": {"status": "ok", **res},
        "mmlu_pro": {"status": "unavailable", "reason": "no offline source"},
        "swag": {"status": "ok", "accuracy": 0.25, "stand_in": "HellaSwag (stand-in for SWAG)"},
    }
    avg = average(results)
    assert avg["value"] == pytest.approx(0.375) and not avg["complete"]
    assert avg["over"] == ["mmlu", "swag"]
    doc = {"benchmarks": results, "average": avg, "split": "test", "source": "offline"}
    md = markdown_table(doc, "base")
    head, _, row = md.splitlines()[:3]
    assert head == "|  | MMLU | MMLU-Pro | ARC-C | ARC-E | OpenBook | SWAG | Comm | Avg |"
    assert row == "| base | 50.00 | n/a | — | — | — | 25.00† | — | 37.50* |"
    assert "HellaSwag (stand-in for SWAG)" in md and "no offline source" in md
    assert "Average over 2 of 7 benchmarks" in md and "missing: MMLU-Pro, ARC-C" in md


def test_bad_scoring_inputs(tiny):
    tok, _ = tiny
    with pytest.raises(EvalError, match="mode"):
        ScoreConfig(mode="generate")
    with pytest.raises(EvalError, match="duplicate"):
        score_questions(None, Scorer(tok), toy_questions(2) * 2, CPU)


def test_results_carry_per_question_correctness_that_compare_pairs(tiny, tiny_run_inputs):
    """run_suite records each question's correctness (and MMLU's subjects); two evaluations of
    the same questions compare pairwise, Δ being exactly the difference of their accuracies."""
    from hmora_ds.eval.compare import compare_table
    from hmora_ds.eval.suite import Prepared, SuiteConfig, result_document, run_suite

    tok, _ = tiny
    # A fresh base: an HMoRA test earlier in this module wraps the shared one's linears.
    base = AutoModelForCausalLM.from_pretrained(
        tiny_run_inputs / "model", attn_implementation="eager"
    ).eval()
    scorer = Scorer(tok, ScoreConfig(batch_size=4))
    prepared = {
        "mmlu": Prepared("mmlu", toy_questions(6, "mmlu")),
        "arc_easy": Prepared("arc_easy", toy_questions(7)),
    }
    docs = []
    for letter in "AB":
        model = ForceLetter(base, scorer.letter_ids[LETTERS.index(letter)])
        results = run_suite(model, scorer, prepared, CPU)
        for bench, p in prepared.items():
            res = results[bench]
            want = {q.id: q.answer == LETTERS.index(letter) for q in p.questions}
            assert res["correct"] == want
            assert sum(res["correct"].values()) == res["num_correct"]
        assert results["mmlu"]["subjects"] == {q.id: q.subject for q in prepared["mmlu"].questions}
        assert "subjects" not in results["arc_easy"]  # micro accuracy needs none
        suite = SuiteConfig(benchmarks=["mmlu", "arc_easy"], split="validation")
        docs.append(json.loads(json.dumps(result_document(results, scorer.config, suite))))
    lines = compare_table(docs, ["A", "B"]).splitlines()
    delta = [float(x) for x in lines[4].strip("|").split("|")[1:]]
    for col, bench in enumerate(("mmlu", "arc_easy")):
        acc = [d["benchmarks"][bench]["accuracy"] for d in docs]
        assert delta[col] == pytest.approx(100 * (acc[1] - acc[0]), abs=0.05 + 1e-9)
    assert lines[6] == "| questions | 6 | 7 | 13 |"
