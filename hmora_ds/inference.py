"""Generation with a trained adapter: what ``hmora-ds chat`` and ``hmora-ds generate`` share.

A prompt is rendered with the tokenizer's chat template exactly as in training (system prompt,
user turns, assistant header), and the model's :meth:`~hmora_ds.model.HMoRAModel.generate`
takes the task routing from it: the task encoder reads the prompt once and every decoding step
routes with that representation, as in training where the prompt decides the task.

In a conversation of several turns the prompt is the whole conversation so far, and the
``instruction_mask`` (``routing.task_input=instruction``) is the newest user message: the
instruction the answer responds to. A conversation longer than the prompt limit loses its
oldest turns first (the system prompt is kept).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the first GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_for_inference(
    model: str,
    adapter: str | None = None,
    *,
    tokenizer: str | None = None,
    gguf_file: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str = "sdpa",
    chat_template: str | None = None,
) -> tuple[Any, torch.nn.Module]:
    """The tokenizer and the model (the base, or the base with ``adapter``), in eval mode.

    ``model`` is what ``eval --model`` takes: an HF name or directory (a full fine-tune's saved
    model too), a ``.gguf`` file, or the ``smollm2-135m-instruct`` alias.

    Raises:
        ValueError: one line naming the option (model, adapter, tokenizer) and the fix.
    """
    from hmora_ds.adapter_io import check_adapter, load_adapter
    from hmora_ds.data.chat_templates import apply_chat_template_setting
    from hmora_ds.runtime.loading import (
        load_base_model,
        load_tokenizer,
        resolve_checkpoint,
        torch_dtype,
    )

    if adapter:
        check_adapter(adapter)
    where = pick_device(device)
    ckpt = resolve_checkpoint(model, gguf_file, option="--model", gguf_option="--gguf-file")
    tok = load_tokenizer(ckpt, tokenizer, option="--model", tokenizer_option="--tokenizer")
    apply_chat_template_setting(tok, chat_template, model, "--chat-template")
    base = load_base_model(
        ckpt, torch_dtype(dtype, where.type == "cuda"), attn_implementation, option="--model"
    )
    net = load_adapter(base, adapter) if adapter else base
    net.to(where).eval()
    return tok, net


def check_messages(messages: Any, where: str = "conversation") -> list[dict[str, str]]:
    """A conversation to answer, checked by the rules of training data (the same roles and
    keys, system message first, user and assistant alternating) and ending with the user turn
    to answer; returned as ``{"role", "content"}`` messages (ShareGPT's ``from``/``value``
    and ``human``/``gpt`` become OpenAI's).

    Raises:
        ValueError: one line naming ``where`` and what is wrong.
    """
    from hmora_ds.data.formats import parse_conversation

    parsed, why = parse_conversation(messages, "messages", to_answer=True)
    if parsed is None:
        raise ValueError(f"{where}: {why}")
    system, turns = parsed
    return [{"role": "system", "content": system}, *turns] if system is not None else turns


@dataclass
class GenerationConfig:
    """Decoding settings.

    Attributes:
        max_new_tokens: longest answer.
        temperature: 0 = greedy (deterministic); otherwise sampling at this temperature.
        top_p: nucleus sampling (with temperature > 0).
        max_input_tokens: prompt limit (older turns are dropped first).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    max_input_tokens: int = 2048

    def kwargs(self, tokenizer: Any) -> dict[str, Any]:
        """Keyword arguments of Hugging Face ``generate``."""
        out: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "pad_token_id": tokenizer.pad_token_id,
        }
        if self.temperature > 0:
            out.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            out.update(do_sample=False)
        return out


class Generator:
    """Renders conversations with the chat template and generates their answers.

    Args:
        tokenizer: the model's tokenizer (with a chat template).
        model: a base model or an :class:`~hmora_ds.model.HMoRAModel`.
        config: decoding settings.
    """

    def __init__(self, tokenizer: Any, model: torch.nn.Module, config: GenerationConfig) -> None:
        from hmora_ds.data import ChatEncoder, EncodeConfig

        self.tokenizer = tokenizer
        self.model = model
        self.config = config
        self.encoder = ChatEncoder(
            tokenizer, EncodeConfig(max_input_tokens=config.max_input_tokens)
        )
        self.encoder.check_room("--max-input-tokens")
        self.device = next(model.parameters()).device
        from hmora_ds.data.collate import DataCollator

        self.collator = DataCollator.from_tokenizer(tokenizer, padding_side="left")

    def _render(self, messages: Sequence[dict[str, Any]]) -> tuple[list[int], tuple[int, int]]:
        text = self.tokenizer.apply_chat_template(
            list(messages),
            add_generation_prompt=True,
            tokenize=False,
            **self.encoder.template_kwargs,
        )
        last = messages[-1]["content"].strip()
        at = text.rfind(last) if last else -1
        span = (at, at + len(last)) if at >= 0 else (len(text), len(text))
        return self.encoder._tokens([text], [span])[0]

    def encode(self, messages: Sequence[dict[str, Any]]) -> tuple[dict[str, list[int]], int]:
        """Prompt tokens and instruction span of ``messages``; oldest turns dropped to fit.

        Returns:
            ``({"input_ids", "prompt_len", "instruction_span"}, dropped turns)``.

        Raises:
            ValueError: even the newest user message alone does not fit.
        """
        msgs = check_messages(messages)
        system = [m for m in msgs[:1] if m["role"] == "system"]
        turns = msgs[len(system) :]
        dropped = 0
        while True:
            ids, span = self._render([*system, *turns])
            if len(ids) <= self.config.max_input_tokens:
                return {"input_ids": ids, "prompt_len": len(ids), "instruction_span": span}, dropped
            if len(turns) <= 1:
                raise ValueError(
                    f"prompt: {len(ids)} tokens exceed --max-input-tokens "
                    f"{self.config.max_input_tokens}; raise it or shorten the message"
                )
            # Drop the oldest exchange (a user turn and the assistant's answer).
            cut = 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1
            turns, dropped = turns[cut:], dropped + cut

    def _batch(self, encoded: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(encoded)
        keys = ("input_ids", "attention_mask", "prompt_mask", "instruction_mask")
        return {k: batch[k].to(self.device) for k in keys}

    def _generate(self, batch: dict[str, torch.Tensor], streamer: Any = None) -> torch.Tensor:
        from hmora_ds.model import HMoRAModel

        kwargs = self.config.kwargs(self.tokenizer)
        if streamer is not None:
            kwargs["streamer"] = streamer
        if isinstance(self.model, HMoRAModel):
            return self.model.generate(**batch, **kwargs)
        return self.model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs
        )

    @torch.no_grad()
    def answer(self, messages: Sequence[dict[str, Any]], streamer: Any = None) -> str:
        """The assistant's answer to the conversation ``messages``."""
        enc, dropped = self.encode(messages)
        if dropped:
            logger.warning("conversation too long: the oldest %d message(s) left out", dropped)
        batch = self._batch([enc])
        out = self._generate(batch, streamer)
        return self.decode(out[0, batch["input_ids"].shape[1] :])

    @torch.no_grad()
    def answer_batch(self, conversations: Sequence[Sequence[dict[str, Any]]]) -> list[str]:
        """Answers of several conversations, generated together (left padding)."""
        return self.answer_encoded([self.encode(c)[0] for c in conversations])

    @torch.no_grad()
    def answer_encoded(self, encoded: list[dict[str, Any]]) -> list[str]:
        """Answers of prompts already :meth:`encode`-d, generated together (left padding)."""
        batch = self._batch(encoded)
        out = self._generate(batch)
        width = batch["input_ids"].shape[1]
        return [self.decode(row[width:]) for row in out]

    def decode(self, ids: torch.Tensor) -> str:
        """Generated tokens to text, without special tokens, cut at the end of the turn."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text.split(self.encoder.eot_text)[0].strip() if self.encoder.eot_text else text

    @torch.no_grad()
    def routing(self, messages: Sequence[dict[str, Any]]) -> list[str]:
        """Which experts each router picks for this prompt, one line per layer.

        Task routers: the top-k experts of the prompt's task representation. Token routers:
        the experts with the largest mean probability over the prompt's tokens. Empty for a
        model without routers (a base model, plain LoRA).
        """
        from hmora_ds.model import HMoRAModel

        if not isinstance(self.model, HMoRAModel):
            return []
        batch = self._batch([self.encode(messages)[0]])
        out = self.model(**batch, return_router_stats=False, logits_to_keep=1)
        k = max(1, self.model.config.routing.top_k or 1)
        by_layer: dict[int, list[str]] = {}
        for rec in out.routing_records:
            probs = rec.probs.float()
            if probs.dim() == 3:  # (B, T, E): mean over the real tokens
                mask = batch["attention_mask"].unsqueeze(-1).float()
                probs = (probs * mask).sum(1) / mask.sum(1).clamp_min(1)
            top = probs[0].topk(min(k, probs.shape[-1]))
            picks = ",".join(
                f"{i}:{p:.2f}"
                for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            )
            label = f"{'_'.join(rec.id.targets)}.{rec.kind}"
            by_layer.setdefault(rec.id.layer, []).append(f"{label} [{picks}]")
        return [
            f"layer {layer:02d}: " + "  ".join(parts) for layer, parts in sorted(by_layer.items())
        ]
