"""Tokenisation and collation (used by training *and* evaluation).

Shapes: ``B`` batch, ``T`` padded sequence length.

One example is laid out as::

    [ prompt tokens                         | target tokens | end-of-turn ]
      apply_chat_template([user: source],     tokenize(target)  e.g. <|im_end|>
                          add_generation_prompt=True)

* ``prompt_mask`` is 1 exactly on the prompt tokens: what the model sees as input at
  generation time, so task routing computed from the prompt is the same in training and
  in generation.
* ``instruction_mask`` is 1 on the tokens of the source text (the raw instruction) inside the
  prompt, without the chat template's system / role wrapper: the task encoder's input with
  ``routing.task_input=instruction`` (the official HMoRA code encodes the raw instruction).
  The span is found on the rendered prompt text: the template is rendered once around a
  sentinel, which gives the wrapper's text before and after the source; a token belongs to the
  instruction when its characters (tokenizer offsets) overlap the source's characters, so a
  token that BPE merged across the boundary counts as instruction.
* ``labels`` equal ``input_ids`` on the target and end-of-turn tokens and are -100
  elsewhere (prompt and padding). Causal-LM shifting is left to the model.

Truncation (defaults from the paper: 1024 input / 512 output tokens): the target is cut to
``max_output_tokens`` first (counted), then the *source text* is cut from the left until the
rendered prompt fits ``max_input_tokens`` (the chat-template wrapper is kept intact, so the
truncated prompt is still exactly the template applied to a shorter source). The target is
never dropped; a record whose prompt cannot fit (wrapper alone too long) or whose target is
empty after tokenisation is skipped and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_SENTINEL = "\u2063HMORA_TARGET_SENTINEL\u2063"
_CHUNK = 512
# Llama-3.x's own fallback date when its template cannot read the clock.
DEFAULT_TEMPLATE_KWARGS: dict[str, Any] = {"date_string": "26 Jul 2024"}


@dataclass
class EncodeConfig:
    """Token limits.

    Attributes:
        max_input_tokens: Longest prompt (chat template included), paper: 1024.
        max_output_tokens: Longest target (end-of-turn not counted), paper: 512.
    """

    max_input_tokens: int = 1024
    max_output_tokens: int = 512

    def __post_init__(self) -> None:
        if self.max_input_tokens <= 0 or self.max_output_tokens <= 0:
            raise ValueError(f"token limits must be positive: {self}")


@dataclass
class EncodeStats:
    """What happened while encoding a dataset (logged once, kept on the dataset)."""

    records: int = 0
    encoded: int = 0
    truncated_targets: int = 0
    truncated_prompts: int = 0
    skipped_empty_target: int = 0
    skipped_prompt_too_long: int = 0

    def log(self) -> None:
        """Log the counts; warn when records were skipped."""
        skipped = self.skipped_empty_target + self.skipped_prompt_too_long
        level = logging.WARNING if skipped else logging.INFO
        logger.log(level, "Encoded %d/%d records: %s", self.encoded, self.records, asdict(self))


class ChatEncoder:
    """Encodes (source, target) pairs with a tokenizer's own chat template.

    Args:
        tokenizer: A Hugging Face tokenizer with a ``chat_template``.
        config: Token limits.
        template_kwargs: Extra variables for the chat template. The default pins
            ``date_string`` (Llama-3.x templates otherwise insert *today's* date, so the
            same data would tokenise differently on another day and an exact resume,
            whose length-grouped order depends on the lengths, would break).

    Raises:
        ValueError: If the tokenizer has no chat template or no end-of-turn marker.
    """

    def __init__(
        self,
        tokenizer: Any,
        config: EncodeConfig | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ValueError(
                f"the tokenizer {name!r} has no chat_template, and every prompt is built with "
                "one; use a tokenizer that has one (model.tokenizer=<hub name or dir> in a run "
                "config, --tokenizer for launchers/eval.py), e.g. the instruct model's, or add "
                "a chat_template.jinja to its directory"
            )
        self.tokenizer = tokenizer
        self.config = config or EncodeConfig()
        self.template_kwargs = dict(
            DEFAULT_TEMPLATE_KWARGS if template_kwargs is None else template_kwargs
        )
        self.eot_ids = self._end_of_turn_ids()

    def _end_of_turn_ids(self) -> list[int]:
        """Tokens the template puts after an assistant message (trailing whitespace dropped)."""
        msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, **self.template_kwargs)
        suffix = text.split(_SENTINEL, 1)[1].rstrip() if _SENTINEL in text else ""
        if not suffix:
            suffix = self.tokenizer.eos_token or ""
        ids = self._ids(suffix) if suffix else []
        if not ids:
            raise ValueError(
                "cannot find the chat template's end-of-turn token(s) nor an eos token"
            )
        return ids

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def wrapper_tokens(self) -> int:
        """Tokens of the generation prompt of an empty source: the chat template's own share of
        every prompt (a ``max_input_tokens`` at or below it leaves no room for any source)."""
        return len(self.prompt_tokens("")[0])

    def check_room(self, setting: str) -> None:
        """Refuse a ``max_input_tokens`` that the chat template alone fills (every record
        would be skipped); ``setting`` is how the user gave the limit.

        Raises:
            ValueError: one line naming ``setting`` and the smallest value that leaves room.
        """
        wrapper, limit = self.wrapper_tokens(), self.config.max_input_tokens
        if wrapper >= limit:
            raise ValueError(
                f"{setting}: {limit} leaves no room for a prompt: the chat template alone is "
                f"{wrapper} tokens; set it above {wrapper} (the paper: 1024)"
            )

    def _wrapper(self) -> tuple[str, str]:
        """The template's text before and after the source of a generation prompt."""
        if not hasattr(self, "_wrapper_text"):
            text = self.prompt_text(_SENTINEL)
            if text.count(_SENTINEL) != 1:
                raise ValueError(
                    "chat_template: the user message must appear exactly once in the generation "
                    f"prompt to find the instruction's tokens (found {text.count(_SENTINEL)})"
                )
            before, after = text.split(_SENTINEL)
            self._wrapper_text = (before, after)
        return self._wrapper_text

    def source_chars(self, prompt: str, source: str) -> tuple[int, int]:
        """Character span ``[start, end)`` of the source text inside a rendered prompt.

        The prompt is the wrapper's prefix, the source as the template rendered it (a template
        may trim it), and the wrapper's suffix.

        Raises:
            ValueError: the prompt is not the template applied to a user message.
        """
        before, after = self._wrapper()
        if (
            len(prompt) >= len(before) + len(after)
            and prompt.startswith(before)
            and prompt.endswith(after)
        ):
            return len(before), len(prompt) - len(after)
        core = source.strip()
        at = prompt.rfind(core) if core else -1
        if at < 0:
            raise ValueError(
                "chat_template: cannot locate the source text in the rendered prompt "
                f"{prompt[:80]!r}…; the instruction_mask needs the template to copy it verbatim"
            )
        return at, at + len(core)

    def _tokens(self, prompts: list[str], spans: list[tuple[int, int]]) -> list[tuple]:
        """``(ids, (first, end))`` per prompt: its tokens and the token span overlapping the
        character span (empty span ``(n, n)`` after the last token when nothing overlaps)."""
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(prompts, add_special_tokens=False, return_offsets_mapping=True)
            out = []
            for ids, offsets, (cs, ce) in zip(
                enc["input_ids"], enc["offset_mapping"], spans, strict=True
            ):
                inside = [i for i, (a, b) in enumerate(offsets) if a < ce and b > cs and b > a]
                span = (inside[0], inside[-1] + 1) if inside else (len(ids), len(ids))
                out.append((list(ids), span))
            return out
        out = []  # slow tokenizer: common prefix / suffix with the wrapper's tokens
        for text, (cs, ce) in zip(prompts, spans, strict=True):
            ids, head, tail = self._ids(text), self._ids(text[:cs]), self._ids(text[ce:])
            first = 0
            while first < min(len(ids), len(head)) and ids[first] == head[first]:
                first += 1
            k = 0
            while k < min(len(ids) - first, len(tail)) and ids[-1 - k] == tail[-1 - k]:
                k += 1
            out.append((ids, (first, len(ids) - k) if ce > cs else (len(ids), len(ids))))
        return out

    def prompt_tokens(self, source: str) -> tuple[list[int], tuple[int, int]]:
        """Tokens of ``prompt_text(source)`` and the token span ``[first, end)`` of the source
        text within them (the instruction, see the module docstring)."""
        text = self.prompt_text(source)
        return self._tokens([text], [self.source_chars(text, source)])[0]

    def prompt_text(self, source: str) -> str:
        """The generation prompt for ``source`` (one user turn + assistant header)."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": source}],
            add_generation_prompt=True,
            tokenize=False,
            **self.template_kwargs,
        )

    def encode_prompt(
        self, source: str, prompt: tuple[list[int], tuple[int, int]] | None = None
    ) -> tuple[list[int], bool, tuple[int, int]] | None:
        """Prompt tokens for ``source``, left-truncating the source to fit ``max_input_tokens``.

        Args:
            source: The user message.
            prompt: Already-computed :meth:`prompt_tokens` of ``source`` (optional).

        Returns:
            ``(ids, truncated, instruction span)``, or ``None`` if even an empty source does
            not fit.
        """
        limit = self.config.max_input_tokens
        ids, span = prompt if prompt is not None else self.prompt_tokens(source)
        if len(ids) <= limit:
            return ids, False, span
        src_ids = self._ids(source)
        keep = len(src_ids) - (len(ids) - limit)
        for _ in range(8):  # re-rendering can shift a token or two at the cut
            if keep <= 0:
                return None
            text = self.tokenizer.decode(src_ids[-keep:]).lstrip("\ufffd")
            ids, span = self.prompt_tokens(text)
            if len(ids) <= limit:
                return ids, True, span
            keep -= len(ids) - limit
        return None

    def encode(self, source: str, target: str, stats: EncodeStats | None = None) -> dict | None:
        """Encode one example (see the module docstring for the layout and truncation).

        Returns:
            ``{"input_ids": list[int], "prompt_len": int, "instruction_span": (first, end)}``,
            or ``None`` if skipped.
        """
        enc = self._encode_batch([source], [target], stats or EncodeStats())
        return enc[0]

    def encode_generation_prompt(self, source: str) -> dict | None:
        """Encode a prompt alone for generation / scoring (labels all -100 after collation).

        Returns:
            ``{"input_ids": list[int], "prompt_len": int, "instruction_span": (first, end)}``,
            or ``None`` if it cannot fit.
        """
        prompt = self.encode_prompt(source)
        if prompt is None:
            return None
        ids, _, span = prompt
        return {"input_ids": ids, "prompt_len": len(ids), "instruction_span": span}

    def _encode_batch(
        self, sources: Sequence[str], targets: Sequence[str], stats: EncodeStats
    ) -> list[dict | None]:
        prompts = [self.prompt_text(s) for s in sources]
        spans = [self.source_chars(p, s) for p, s in zip(prompts, sources, strict=True)]
        p_tok = self._tokens(prompts, spans)
        t_ids = self.tokenizer(list(targets), add_special_tokens=False)["input_ids"]
        out: list[dict | None] = []
        for source, ptok, tid in zip(sources, p_tok, t_ids, strict=True):
            stats.records += 1
            if not tid:
                stats.skipped_empty_target += 1
                out.append(None)
                continue
            if len(tid) > self.config.max_output_tokens:
                tid = tid[: self.config.max_output_tokens]
                stats.truncated_targets += 1
            prompt = self.encode_prompt(source, ptok)
            if prompt is None:
                stats.skipped_prompt_too_long += 1
                out.append(None)
                continue
            pid, truncated, span = prompt
            stats.truncated_prompts += int(truncated)
            stats.encoded += 1
            out.append(
                {
                    "input_ids": list(pid) + list(tid) + self.eot_ids,
                    "prompt_len": len(pid),
                    "instruction_span": span,
                }
            )
        return out


class EncodedDataset(torch.utils.data.Dataset):
    """Tokenised examples stored compactly (one flat int32 array + offsets).

    Items are ``{"input_ids": np.ndarray[int32] (L,), "prompt_len": int,
    "instruction_span": (first, end), "index": int}``.

    Attributes:
        lengths: Token count of every example, ``(N,)``.
        task_names: ``task_name`` of every example.
        ids: Record ``id`` of every example.
        stats: Encoding counts (truncations, skips).
        record_index: Position of every example's record in the encoded records (skipped
            records leave gaps), ``(N,)`` int64.
    """

    def __init__(
        self,
        flat: np.ndarray,
        offsets: np.ndarray,
        prompt_lens: np.ndarray,
        task_names: list[str],
        ids: list[str],
        stats: EncodeStats,
        instruction_spans: np.ndarray | None = None,
        record_index: np.ndarray | None = None,
    ) -> None:
        assert len(offsets) == len(prompt_lens) + 1 == len(task_names) + 1 == len(ids) + 1
        if instruction_spans is None:  # unknown: the whole prompt
            instruction_spans = np.stack([np.zeros_like(prompt_lens), prompt_lens], axis=1)
        assert instruction_spans.shape == (len(prompt_lens), 2)
        self.instruction_spans = instruction_spans
        self.flat, self.offsets, self.prompt_lens = flat, offsets, prompt_lens
        self.task_names, self.ids, self.stats = task_names, ids, stats
        self.lengths = np.diff(offsets)
        if record_index is None:
            record_index = np.arange(len(prompt_lens), dtype=np.int64)
        assert record_index.shape == (len(prompt_lens),)
        self.record_index = record_index

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "input_ids": self.flat[self.offsets[i] : self.offsets[i + 1]],
            "prompt_len": int(self.prompt_lens[i]),
            "instruction_span": (
                int(self.instruction_spans[i, 0]),
                int(self.instruction_spans[i, 1]),
            ),
            "index": int(i),
        }


def encode_records(
    records: Iterable[Mapping[str, Any]],
    encoder: ChatEncoder,
    *,
    progress: bool | None = None,
) -> EncodedDataset:
    """Tokenise records (``source``, ``target``, optional ``task_name``/``id``).

    Args:
        records: Records as produced by the loaders and builders.
        encoder: The chat encoder (tokenizer + limits).
        progress: Show a progress bar (``None``: only on a terminal).

    Returns:
        The encoded dataset; skipped records are counted in ``dataset.stats``.
    """
    stats = EncodeStats()
    chunks: list[np.ndarray] = []
    lengths: list[int] = []
    prompt_lens: list[int] = []
    spans: list[tuple[int, int]] = []
    task_names: list[str] = []
    ids: list[str] = []
    kept: list[int] = []
    records = list(records)
    disable = None if progress is None else not progress  # None: tqdm asks the terminal
    bar = tqdm(total=len(records), desc="tokenise", unit=" rec", disable=disable)
    for start in range(0, len(records), _CHUNK):
        batch = records[start : start + _CHUNK]
        encoded = encoder._encode_batch(
            [r["source"] for r in batch], [r["target"] for r in batch], stats
        )
        for k, (rec, enc) in enumerate(zip(batch, encoded, strict=True)):
            if enc is None:
                continue
            kept.append(start + k)
            chunks.append(np.asarray(enc["input_ids"], dtype=np.int32))
            lengths.append(len(enc["input_ids"]))
            prompt_lens.append(enc["prompt_len"])
            spans.append(enc["instruction_span"])
            task_names.append(str(rec.get("task_name", "")))
            ids.append(str(rec.get("id", start)))
        bar.update(len(batch))
    bar.close()
    stats.log()
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    return EncodedDataset(
        flat,
        offsets,
        np.asarray(prompt_lens, dtype=np.int64),
        task_names,
        ids,
        stats,
        np.asarray(spans, dtype=np.int64).reshape(len(spans), 2),
        np.asarray(kept, dtype=np.int64),
    )


class DataCollator:
    """Pads encoded examples into the batch the model consumes.

    Returns a dict of LongTensors, all ``(B, T)``: ``input_ids``, ``attention_mask``,
    ``labels`` (-100 on prompt and padding), ``prompt_mask`` (1 on prompt tokens only) and,
    when the features carry an ``instruction_span`` (every :class:`ChatEncoder` feature does),
    ``instruction_mask`` (1 on the source text's tokens inside the prompt).

    Args:
        pad_token_id: Id used for padding ``input_ids``.
        padding_side: ``"right"`` (training) or ``"left"`` (generation / evaluation).
        pad_to_multiple_of: Round ``T`` up to a multiple of this (``None``: no rounding).
    """

    def __init__(
        self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None
    ) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of <= 0:
            raise ValueError("pad_to_multiple_of must be positive")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, padding_side: str = "right", pad_to_multiple_of: int | None = None
    ) -> DataCollator:
        """Collator padding with the tokenizer's pad token (its eos token if it has none)."""
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        return cls(pad, padding_side, pad_to_multiple_of)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        lens = [len(f["input_ids"]) for f in features]
        t = max(lens)
        if self.pad_to_multiple_of:
            t = -(-t // self.pad_to_multiple_of) * self.pad_to_multiple_of
        b = len(features)
        input_ids_BT = torch.full((b, t), self.pad_token_id, dtype=torch.long)
        labels_BT = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
        attention_BT = torch.zeros((b, t), dtype=torch.long)
        prompt_BT = torch.zeros((b, t), dtype=torch.long)
        has_span = ["instruction_span" in f for f in features]
        if any(has_span) and not all(has_span):
            raise ValueError(
                "instruction_span: some features carry one and some do not; encode every "
                "feature with the same ChatEncoder"
            )
        instr_BT = torch.zeros((b, t), dtype=torch.long) if all(has_span) else None
        for i, (f, n) in enumerate(zip(features, lens, strict=True)):
            ids = torch.as_tensor(np.asarray(f["input_ids"], dtype=np.int64))
            p = int(f["prompt_len"])
            if not 0 < p <= n:
                raise ValueError(f"prompt_len {p} out of range for a sequence of {n} tokens")
            s = 0 if self.padding_side == "right" else t - n
            input_ids_BT[i, s : s + n] = ids
            attention_BT[i, s : s + n] = 1
            prompt_BT[i, s : s + p] = 1
            labels_BT[i, s + p : s + n] = ids[p:]
            if instr_BT is not None:
                first, end = (int(x) for x in f["instruction_span"])
                if not 0 <= first <= end <= p:
                    raise ValueError(
                        f"instruction_span ({first}, {end}) out of range for a prompt of {p} tokens"
                    )
                instr_BT[i, s + first : s + end] = 1
        out = {
            "input_ids": input_ids_BT,
            "attention_mask": attention_BT,
            "labels": labels_BT,
            "prompt_mask": prompt_BT,
        }
        if instr_BT is not None:
            out["instruction_mask"] = instr_BT
        return out
