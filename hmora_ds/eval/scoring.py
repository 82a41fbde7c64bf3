"""Scoring multiple-choice questions with a causal LM (HMoRA, DeepSpeed engine or plain HF).

Shapes: ``B`` batch, ``T`` padded length, ``K`` kept logit positions, ``V`` vocabulary.

Modes:

* ``letter`` (default): one prompt per question (options lettered, chat template, generation
  prompt); prediction = the highest next-token logit among *that question's* letters (a
  3-option ARC question can never be answered "D").
* ``loglik``: lm-eval style. Each option text is the assistant's answer after a cloze prompt;
  score = summed token log-probability of the option (end-of-turn excluded) divided by its
  number of **tokens** by default (OLMES ``acc_per_token``); ``norm="chars"`` divides by its
  length in characters (lm-eval's ``acc_norm``, OLMES ``acc_per_char``), ``"none"`` does not
  normalise. Measured on SmolLM2-135M-Instruct, ARC-E validation[:200], chat template:
  tokens 45 %, chars 31 %, none 51 % (character normalisation suits raw-text prompts better
  than chat-formatted ones). The prompt runs once and its KV cache is shared by the options.

Prompts are left-padded, so every prompt ends at position ``T-1`` and only the last logits are
computed (``logits_to_keep``). HMoRA models take the prompt's instruction (the user message,
``instruction_mask``) or the whole prompt (``prompt_mask``) as the task encoder's input, per
``routing.task_input``; in loglik mode the options reuse the task representation the prompt bound
(HMoRA's cached-decoding path), so every option is scored under the prompt's task routing.

Every rank runs the same number of forwards in :meth:`Scorer.run` (dummy batches pad the short
shards, as ZeRO-3 requires); sharding and gathering live in :mod:`hmora_ds.eval.distributed`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from hmora_ds.data.collate import ChatEncoder, DataCollator, EncodeConfig
from hmora_ds.eval.benchmarks import LETTERS, MACRO, EvalError, Question
from hmora_ds.eval.prompts import ShotSampler, build_prompt

logger = logging.getLogger(__name__)

MODES = ("letter", "loglik")
NORMS = ("chars", "tokens", "none")
#: The prompt limit as the user sets it: in a run config and on the eval command line.
MAX_INPUT_TOKENS = "data.max_input_tokens (launchers/eval.py: --max-input-tokens)"


@dataclass
class ScoreConfig:
    """How questions are scored.

    Attributes:
        mode: ``letter`` or ``loglik`` (module docstring).
        shots: k-shot examples per prompt (0: zero-shot, the paper's setting).
        batch_size: Sequences per forward (per rank).
        max_input_tokens: Longest prompt; longer sources are cut from the left.
        norm: loglik normalisation: ``tokens`` (default), ``chars`` or ``none``.
        seed: Seed of the k-shot sampling.
    """

    mode: str = "letter"
    shots: int = 0
    batch_size: int = 8
    max_input_tokens: int = 1024
    norm: str = "tokens"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise EvalError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.norm not in NORMS:
            raise EvalError(f"norm must be one of {list(NORMS)}, got {self.norm!r}")
        if self.batch_size < 1 or self.shots < 0 or self.max_input_tokens < 1:
            raise EvalError(f"invalid scoring config {self}")


def letter_token_ids(tokenizer: Any, n: int = len(LETTERS)) -> list[int]:
    """The token of each answer letter as the assistant's first token (one token each)."""
    ids = []
    for letter in LETTERS[:n]:
        tok = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(tok) != 1:
            raise EvalError(f"letter {letter!r} is {len(tok)} tokens for this tokenizer, not 1")
        ids.append(tok[0])
    return ids


@dataclass
class _Item:
    """One question to score: its index, prompt tokens and (loglik mode) option tokens."""

    q: int
    prompt: dict[str, Any]
    options: list[list[int]] = field(default_factory=list)


class Scorer:
    """Builds the token sequences of a question list and scores them with a model.

    In loglik mode the prompt is run once per question and its KV cache is shared by the
    options (repeated per option): the option tokens see exactly the context they would in one
    full ``prompt + option`` sequence, at a quarter of the cost for four options.
    """

    def __init__(self, tokenizer: Any, config: ScoreConfig | None = None) -> None:
        self.config = config or ScoreConfig()
        self.tokenizer = tokenizer
        self.encoder = ChatEncoder(
            tokenizer, EncodeConfig(max_input_tokens=self.config.max_input_tokens)
        )
        try:  # fail now, not at the first question of the first evaluation
            self.encoder.check_room(MAX_INPUT_TOKENS)
        except ValueError as err:
            raise EvalError(str(err)) from None
        self.collator = DataCollator.from_tokenizer(tokenizer, padding_side="left")
        self.letter_ids = letter_token_ids(tokenizer) if self.config.mode == "letter" else []

    # ------------------------------------------------------------------ encoding
    def _prompt(self, source: str, qid: str) -> dict[str, Any]:
        feat = self.encoder.encode_generation_prompt(source)
        if feat is None:
            raise EvalError(
                f"question {qid!r}: its prompt does not fit {MAX_INPUT_TOKENS}="
                f"{self.config.max_input_tokens} even with its text cut; raise it"
            )
        return feat

    def _option_ids(self, option: str) -> list[int]:
        # As training tokenises a target: on its own, after the prompt, end-of-turn excluded.
        ids = self.tokenizer(option, add_special_tokens=False)["input_ids"]
        return ids[: self.encoder.config.max_output_tokens]

    def items(self, questions: Sequence[Question], shots: ShotSampler | None) -> list[_Item]:
        """The token sequences for ``questions`` (question indices are local)."""
        style = "letter" if self.config.mode == "letter" else "cloze"
        out = []
        for qi, q in enumerate(questions):
            prompt = self._prompt(build_prompt(q, style, shots(q) if shots else ()), q.id)
            opts = [] if style == "letter" else [self._option_ids(o) for o in q.options]
            out.append(_Item(qi, prompt, opts))
        return out

    # ------------------------------------------------------------------ forward
    @staticmethod
    def _forward(model: Any, batch: dict[str, torch.Tensor], keep: int, **kw: Any) -> Any:
        """Logits of the last ``keep`` positions (and the cache when ``use_cache``)."""
        from hmora_ds.model import HMoRAModel

        mask = batch["attention_mask"]
        if kw.get("position_ids") is None:
            kw["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding
        if isinstance(getattr(model, "module", model), HMoRAModel):
            for key in ("prompt_mask", "instruction_mask"):  # the task encoder's input
                if key in batch:
                    kw[key] = batch[key]
            kw["return_router_stats"] = False
        return model(input_ids=batch["input_ids"], attention_mask=mask, logits_to_keep=keep, **kw)

    def _score_batch(self, model: Any, items: list[_Item], device: torch.device) -> list[Any]:
        prompt = self.collator([it.prompt for it in items])
        prompt = {k: v.to(device) for k, v in prompt.items() if k != "labels"}
        if self.config.mode == "letter":
            last_BV = self._forward(model, prompt, 1).logits[:, -1].float()
            return [last_BV[b, self.letter_ids].tolist() for b in range(len(items))]
        out = self._forward(model, prompt, 1, use_cache=True)
        first_BV = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        # Every question gets n rows (short option lists padded with empty options).
        n = max(len(it.options) for it in items)
        length = max(1, *(len(o) for it in items for o in it.options))
        pad = self.collator.pad_token_id
        cont_NL = torch.full((len(items) * n, length), pad, dtype=torch.long)
        cmask_NL = torch.zeros_like(cont_NL)
        for b, it in enumerate(items):
            for j, opt in enumerate(it.options):
                cont_NL[b * n + j, : len(opt)] = torch.as_tensor(opt, dtype=torch.long)
                cmask_NL[b * n + j, : len(opt)] = 1
        cont_NL, cmask_NL = cont_NL.to(device), cmask_NL.to(device)
        past = out.past_key_values
        past.batch_repeat_interleave(n)
        pmask_NT = prompt["attention_mask"].repeat_interleave(n, dim=0)
        start_N1 = pmask_NT.sum(-1, keepdim=True)
        cont = {"input_ids": cont_NL, "attention_mask": torch.cat([pmask_NT, cmask_NL], dim=1)}
        logits = self._forward(
            model,
            cont,
            length,
            position_ids=start_N1 + torch.arange(length, device=device),
            past_key_values=past,
            use_cache=True,
        ).logits
        logp_NLV = torch.log_softmax(logits.float(), dim=-1)
        scores = []
        for b, it in enumerate(items):
            row = []
            for j, opt in enumerate(it.options):
                if not opt:
                    row.append(float("-inf"))  # an empty option is never preferred
                    continue
                ids = cont_NL[b * n + j, : len(opt)]
                s = (
                    first_BV[b, ids[0]]
                    + logp_NLV[b * n + j, : len(opt) - 1].gather(-1, ids[1:, None]).sum()
                )
                row.append(s.item())
            scores.append(row)
        return scores

    @torch.no_grad()
    def run(
        self,
        model: Any,
        items: list[_Item],
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
        group: Any = None,
    ) -> list[list[float]]:
        """Score ``items``; every rank of ``group`` calls this and runs the same forwards.

        Returns:
            Per item: its letters' logits (letter mode) or its options' summed log-probs.
        """
        bs = self.config.batch_size
        order = sorted(range(len(items)), key=lambda i: -len(items[i].prompt["input_ids"]))
        batches = [order[i : i + bs] for i in range(0, len(order), bs)]
        n_batches = len(batches)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            t = torch.tensor([n_batches], dtype=torch.long, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            n_batches = int(t.item())
        dummy = _Item(-1, self._prompt("?", "padding"), [[self.collator.pad_token_id]])
        results: list[Any] = [None] * len(items)
        was_training = getattr(model, "training", False)
        model.eval()
        for bi in range(n_batches):
            idx = batches[bi] if bi < len(batches) else []
            with torch.autocast(
                device.type, dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype)
            ):
                scores = self._score_batch(model, [items[i] for i in idx] or [dummy], device)
            for i, s in zip(idx, scores, strict=False):
                results[i] = s
        if was_training:
            model.train()
        return results

    def predict(
        self, questions: Sequence[Question], items: list[_Item], raw: list[list[float]]
    ) -> list[int]:
        """Predicted option index per question from :meth:`run`'s output."""
        preds = [0] * len(questions)
        for it, scores in zip(items, raw, strict=True):
            q = questions[it.q]
            n = len(q.options)
            if self.config.mode == "letter":
                vals = scores[:n]  # only this question's letters compete
            elif self.config.norm == "chars":
                vals = [s / max(1, len(o)) for s, o in zip(scores, q.options, strict=True)]
            elif self.config.norm == "tokens":
                vals = [s / max(1, len(t)) for s, t in zip(scores, it.options, strict=True)]
            else:
                vals = list(scores)
            preds[it.q] = max(range(n), key=lambda j: vals[j])
        return preds


def accuracy(bench: str, questions: Sequence[Question], preds: dict[str, int]) -> dict[str, Any]:
    """Accuracy of one benchmark: macro over subjects for MMLU / MMLU-Pro, else micro.

    Returns:
        ``accuracy`` (the paper's number), ``micro_accuracy``, ``num_questions``,
        ``num_correct`` and, for subject benchmarks, ``macro_accuracy`` and ``per_subject``.
    """
    if not questions:
        raise EvalError(f"{bench}: no questions to score")
    correct = [preds[q.id] == q.answer for q in questions]
    micro = sum(correct) / len(correct)
    out: dict[str, Any] = {
        "accuracy": micro,
        "micro_accuracy": micro,
        "num_questions": len(questions),
        "num_correct": int(sum(correct)),
    }
    if bench in MACRO:
        by: dict[str, list[bool]] = defaultdict(list)
        for q, c in zip(questions, correct, strict=True):
            by[q.subject or "all"].append(c)
        per = {s: sum(v) / len(v) for s, v in sorted(by.items())}
        out["macro_accuracy"] = sum(per.values()) / len(per)
        out["accuracy"] = out["macro_accuracy"]
        out["per_subject"] = per
    return out
