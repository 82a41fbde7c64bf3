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
empty after tokenisation is skipped and counted. A record's ``system`` prompt is rendered as the
chat's system message before the user turn (part of the prompt and of ``prompt_mask``).

Multi-turn records (``messages``: user / assistant turns alternating) are rendered whole with
the chat template (:meth:`ChatEncoder.encode_conversation`)::

    [ system + user 1 + header | answer 1 + eot | user 2 + header | answer 2 + eot ]
      prompt_mask = 1            labels           -100              labels

* ``labels`` cover every assistant turn's tokens and its end-of-turn, -100 elsewhere;
  ``prompt_mask`` the tokens before the first assistant turn (what task routing reads);
  ``instruction_mask`` the first user message's text.
* Each message's characters are found on the rendered text (the template rendered once more
  with a sentinel per message gives the text around them; a template that rewrites a message
  is searched for its stripped text), and the text is tokenised piecewise: the prompt, then
  every assistant turn, its end-of-turn and the text up to the next assistant turn separately,
  as the single-turn layout tokenises prompt and target.
* Truncation: ``max_output_tokens`` bounds everything after the prompt (the assistant turns and
  the user turns between them; the last end-of-turn not counted): whole turns are dropped from
  the end until the rest fits (counted as ``dropped_turns``), a first answer longer than the
  limit alone is cut as a target is; then the first user message is cut from the left until
  the prompt fits ``max_input_tokens``, as a source is. The system prompt is always kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from jinja2.exceptions import TemplateError
from tqdm.auto import tqdm

from hmora_ds.data.records import MESSAGES_FIELD, SYSTEM_FIELD

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
    """What happened while encoding a dataset (logged once, kept on the dataset).

    ``conversations`` counts the multi-turn records, ``dropped_turns`` the assistant turns left
    out of them to fit ``max_output_tokens``, ``skipped_unrendered`` the conversations the chat
    template refused or did not copy verbatim enough to find their turns.
    """

    records: int = 0
    encoded: int = 0
    truncated_targets: int = 0
    truncated_prompts: int = 0
    skipped_empty_target: int = 0
    skipped_prompt_too_long: int = 0
    conversations: int = 0
    dropped_turns: int = 0
    skipped_unrendered: int = 0

    def log(self) -> None:
        """Log the counts; warn when records were skipped."""
        skipped = self.skipped_empty_target + self.skipped_prompt_too_long
        skipped += self.skipped_unrendered
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
        self._wrappers: dict[str | None, tuple[str, str]] = {}
        self._warned_conversation = False
        self.eot_text, self.eot_ids = self._end_of_turn()

    def _end_of_turn(self) -> tuple[str, list[int]]:
        """The text and tokens the template puts after an assistant message (trailing
        whitespace dropped), or the eos token when it puts nothing."""
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
        return suffix, ids

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

    def _wrapper(self, system: str | None = None) -> tuple[str, str]:
        """The template's text before and after the source of a generation prompt (with the
        system prompt ``system``; kept per system prompt, a dataset has few)."""
        if system not in self._wrappers:
            text = self.prompt_text(_SENTINEL, system)
            if text.count(_SENTINEL) != 1:
                raise ValueError(
                    "chat_template: the user message must appear exactly once in the generation "
                    f"prompt to find the instruction's tokens (found {text.count(_SENTINEL)})"
                )
            before, after = text.split(_SENTINEL)
            if len(self._wrappers) >= 64:
                self._wrappers.pop(next(iter(self._wrappers)))
            self._wrappers[system] = (before, after)
        return self._wrappers[system]

    def source_chars(self, prompt: str, source: str, system: str | None = None) -> tuple[int, int]:
        """Character span ``[start, end)`` of the source text inside a rendered prompt.

        The prompt is the wrapper's prefix, the source as the template rendered it (a template
        may trim it), and the wrapper's suffix.

        Raises:
            ValueError: the prompt is not the template applied to a user message.
        """
        before, after = self._wrapper(system)
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

    def prompt_tokens(
        self, source: str, system: str | None = None
    ) -> tuple[list[int], tuple[int, int]]:
        """Tokens of ``prompt_text(source, system)`` and the token span ``[first, end)`` of the
        source text within them (the instruction, see the module docstring)."""
        text = self.prompt_text(source, system)
        return self._tokens([text], [self.source_chars(text, source, system)])[0]

    def prompt_text(self, source: str, system: str | None = None) -> str:
        """The generation prompt for ``source`` (an optional system message, one user turn,
        the assistant header)."""
        msgs = [{"role": "system", "content": system}] if system is not None else []
        return self.tokenizer.apply_chat_template(
            [*msgs, {"role": "user", "content": source}],
            add_generation_prompt=True,
            tokenize=False,
            **self.template_kwargs,
        )

    def encode_prompt(
        self,
        source: str,
        prompt: tuple[list[int], tuple[int, int]] | None = None,
        system: str | None = None,
    ) -> tuple[list[int], bool, tuple[int, int]] | None:
        """Prompt tokens for ``source``, left-truncating the source to fit ``max_input_tokens``.

        Args:
            source: The user message.
            prompt: Already-computed :meth:`prompt_tokens` of ``source`` (optional).
            system: The system prompt (kept whole), or None.

        Returns:
            ``(ids, truncated, instruction span)``, or ``None`` if even an empty source does
            not fit.
        """
        fitted = self._cut_to_fit(
            source,
            lambda text: self.prompt_tokens(text, system),
            lambda built: len(built[0]),
            first=prompt,
        )
        if fitted is None:
            return None
        (ids, span), truncated = fitted
        return ids, truncated, span

    def _cut_to_fit(
        self,
        text: str,
        build: Callable[[str], Any],
        size: Callable[[Any], int],
        first: Any = None,
    ) -> tuple[Any, bool] | None:
        """``build(text)``, with ``text`` cut from the left until ``size`` of the result is at
        most ``max_input_tokens``: ``(result, truncated)``, or None if no cut fits. ``first``:
        ``build(text)`` already computed."""
        limit = self.config.max_input_tokens
        built = first if first is not None else build(text)
        if size(built) <= limit:
            return built, False
        src_ids = self._ids(text)
        keep = len(src_ids) - (size(built) - limit)
        for _ in range(8):  # re-rendering can shift a token or two at the cut
            if keep <= 0:
                return None
            built = build(self.tokenizer.decode(src_ids[-keep:]).lstrip("\ufffd"))
            if size(built) <= limit:
                return built, True
            keep -= size(built) - limit
        return None

    def encode(
        self,
        source: str,
        target: str,
        stats: EncodeStats | None = None,
        system: str | None = None,
    ) -> dict | None:
        """Encode one example (see the module docstring for the layout and truncation).

        Returns:
            ``{"input_ids": list[int], "prompt_len": int, "instruction_span": (first, end)}``,
            or ``None`` if skipped.
        """
        enc = self._encode_batch([source], [target], stats or EncodeStats(), [system])
        return enc[0]

    def encode_generation_prompt(self, source: str, system: str | None = None) -> dict | None:
        """Encode a prompt alone for generation / scoring (labels all -100 after collation).

        Returns:
            ``{"input_ids": list[int], "prompt_len": int, "instruction_span": (first, end)}``,
            or ``None`` if it cannot fit.
        """
        prompt = self.encode_prompt(source, system=system)
        if prompt is None:
            return None
        ids, _, span = prompt
        return {"input_ids": ids, "prompt_len": len(ids), "instruction_span": span}

    def _encode_batch(
        self,
        sources: Sequence[str],
        targets: Sequence[str],
        stats: EncodeStats,
        systems: Sequence[str | None] | None = None,
    ) -> list[dict | None]:
        if not sources:
            return []
        systems = [None] * len(sources) if systems is None else list(systems)
        prompts = [self.prompt_text(s, sy) for s, sy in zip(sources, systems, strict=True)]
        spans = [
            self.source_chars(p, s, sy) for p, s, sy in zip(prompts, sources, systems, strict=True)
        ]
        p_tok = self._tokens(prompts, spans)
        t_ids = self.tokenizer(list(targets), add_special_tokens=False)["input_ids"]
        out: list[dict | None] = []
        for source, system, ptok, tid in zip(sources, systems, p_tok, t_ids, strict=True):
            stats.records += 1
            if not tid:
                stats.skipped_empty_target += 1
                out.append(None)
                continue
            if len(tid) > self.config.max_output_tokens:
                tid = tid[: self.config.max_output_tokens]
                stats.truncated_targets += 1
            prompt = self.encode_prompt(source, ptok, system)
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

    # ------------------------------------------------------------------ multi-turn
    def _render(self, msgs: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, **self.template_kwargs)

    def message_spans(self, msgs: list[dict], text: str) -> list[tuple[int, int]]:
        """Character span ``[start, end)`` of every message's content in ``text``, the template
        applied to ``msgs`` (see the module docstring).

        Raises:
            ValueError: a message is not in the rendered text.
        """
        marks = [f"\u2063HMORA_MSG_{i}\u2063" for i in range(len(msgs))]
        skeleton = self._render(
            [{"role": m["role"], "content": mark} for m, mark in zip(msgs, marks, strict=True)]
        )
        at = [skeleton.find(mark) for mark in marks]
        pieces: list[str] | None = None
        if all(a >= 0 and skeleton.count(m) == 1 for a, m in zip(at, marks, strict=True)) and (
            at == sorted(at)
        ):
            ends = [0] + [a + len(m) for a, m in zip(at, marks, strict=True)]
            pieces = [skeleton[ends[i] : at[i]] for i in range(len(msgs))]
            pieces.append(skeleton[ends[-1] :])
            spans, cursor = [], 0  # the template copies every message verbatim: exact spans
            for piece, msg in zip(pieces, msgs, strict=False):
                if not text.startswith(piece, cursor):
                    break
                cursor += len(piece)
                if not text.startswith(msg["content"], cursor):
                    break
                spans.append((cursor, cursor + len(msg["content"])))
                cursor += len(msg["content"])
            if len(spans) == len(msgs) and text[cursor:] == pieces[-1]:
                return spans
        spans, cursor = [], 0  # a template that rewrites messages: their stripped text, in order
        for i, msg in enumerate(msgs):
            if pieces is not None and text.startswith(pieces[i], cursor):
                cursor += len(pieces[i])
            core = msg["content"].strip()
            found = text.find(core, cursor)
            if found < 0:
                raise ValueError(
                    f"chat_template: message {i + 1} ({msg['role']}) is not in the rendered "
                    "conversation verbatim; its turns cannot be found"
                )
            spans.append((found, found + len(core)))
            cursor = found + len(core)
        return spans

    def _conversation_pieces(
        self, turns: Sequence[Mapping[str, str]], system: str | None
    ) -> tuple[tuple[list[int], tuple[int, int]], list[list[int]], list[list[int]]]:
        """The prompt's tokens and instruction span, every answer's tokens and the tokens of the
        text between an answer's end-of-turn and the next answer (one fewer)."""
        msgs = [{"role": "system", "content": system}] if system is not None else []
        msgs += [{"role": t["role"], "content": t["content"]} for t in turns]
        text = self._render(msgs)
        spans = self.message_spans(msgs, text)
        first_user = spans[len(msgs) - len(turns)]
        answers = [spans[k] for k, m in enumerate(msgs) if m["role"] == "assistant"]
        prompt = self._tokens([text[: answers[0][0]]], [first_user])[0]
        texts = []
        for j, (cs, ce) in enumerate(answers):
            texts.append(text[cs:ce])
            if j + 1 < len(answers):
                end = ce + len(self.eot_text) if text.startswith(self.eot_text, ce) else ce
                texts.append(text[end : answers[j + 1][0]])
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return prompt, [list(x) for x in ids[0::2]], [list(x) for x in ids[1::2]]

    def encode_conversation(
        self,
        turns: Sequence[Mapping[str, str]],
        system: str | None = None,
        stats: EncodeStats | None = None,
    ) -> dict | None:
        """Encode a multi-turn conversation (see the module docstring for layout and
        truncation).

        Args:
            turns: ``{"role": "user" | "assistant", "content": str}`` alternating, from a user
                turn to an assistant turn (:func:`hmora_ds.data.formats.parse_conversation`).
            system: The system prompt, or None.
            stats: Counts to update.

        Returns:
            ``{"input_ids", "prompt_len", "instruction_span", "label_mask"}`` (``label_mask``
            1 on every kept answer's tokens and end-of-turn), or ``None`` if skipped.
        """
        stats = stats if stats is not None else EncodeStats()
        stats.records += 1
        stats.conversations += 1
        try:
            # The first user message is cut from the left until the prompt fits, as a source.
            fitted = self._cut_to_fit(
                turns[0]["content"],
                lambda text: self._conversation_pieces(
                    [{**turns[0], "content": text}, *turns[1:]], system
                ),
                lambda pieces: len(pieces[0][0]),
            )
            if fitted is None:
                stats.skipped_prompt_too_long += 1
                return None
            ((pid, span), answers, between), truncated_prompt = fitted
        except (ValueError, TemplateError) as err:
            stats.skipped_unrendered += 1
            if not self._warned_conversation:
                self._warned_conversation = True
                logger.warning("conversation skipped (first of any such): %s", err)
            return None
        if not answers[0]:
            stats.skipped_empty_target += 1
            return None
        budget, used, kept = self.config.max_output_tokens, 0, 0
        for j, answer in enumerate(answers):
            add = len(answer) + (len(self.eot_ids) + len(between[j - 1]) if j else 0)
            if used + add > budget:
                break
            used, kept = used + add, kept + 1
        if kept == 0:  # the first answer alone is too long: cut it, as a target
            answers[0] = answers[0][:budget]
            stats.truncated_targets += 1
            kept = 1
        stats.dropped_turns += len(answers) - kept
        stats.truncated_prompts += int(truncated_prompt)
        ids, mask = list(pid), [0] * len(pid)
        for j in range(kept):
            if j:
                ids += between[j - 1]
                mask += [0] * len(between[j - 1])
            ids += answers[j] + self.eot_ids
            mask += [1] * (len(answers[j]) + len(self.eot_ids))
        stats.encoded += 1
        return {
            "input_ids": ids,
            "prompt_len": len(pid),
            "instruction_span": span,
            "label_mask": mask,
        }


class EncodedDataset(torch.utils.data.Dataset):
    """Tokenised examples stored compactly (one flat int32 array + offsets).

    Items are ``{"input_ids": np.ndarray[int32] (L,), "prompt_len": int,
    "instruction_span": (first, end), "index": int}``, plus ``"label_mask"``
    (``np.ndarray[uint8] (L,)``, 1 on the tokens the model learns) when the dataset holds a
    multi-turn conversation (``label_flat`` given).

    Attributes:
        lengths: Token count of every example, ``(N,)``.
        task_names: ``task_name`` of every example.
        ids: Record ``id`` of every example.
        stats: Encoding counts (truncations, skips).
        record_index: Position of every example's record in the encoded records (skipped
            records leave gaps), ``(N,)`` int64.
        label_flat: 1 on the labelled tokens, aligned with ``flat`` (None: every token after
            the prompt is labelled, the single-turn layout).
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
        label_flat: np.ndarray | None = None,
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
        assert label_flat is None or label_flat.shape == flat.shape
        self.label_flat = label_flat

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {
            "input_ids": self.flat[self.offsets[i] : self.offsets[i + 1]],
            "prompt_len": int(self.prompt_lens[i]),
            "instruction_span": (
                int(self.instruction_spans[i, 0]),
                int(self.instruction_spans[i, 1]),
            ),
            "index": int(i),
        }
        if self.label_flat is not None:
            item["label_mask"] = self.label_flat[self.offsets[i] : self.offsets[i + 1]]
        return item


def encode_records(
    records: Iterable[Mapping[str, Any]],
    encoder: ChatEncoder,
    *,
    progress: bool | None = None,
) -> EncodedDataset:
    """Tokenise records (``source``, ``target``, optional ``system`` / ``task_name`` / ``id``;
    or ``messages``, a multi-turn conversation, see :meth:`ChatEncoder.encode_conversation`).

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
    masks: list[list[int] | None] = []
    records = list(records)
    disable = None if progress is None else not progress  # None: tqdm asks the terminal
    bar = tqdm(total=len(records), desc="tokenise", unit=" rec", disable=disable)
    for start in range(0, len(records), _CHUNK):
        batch = records[start : start + _CHUNK]
        single = [r for r in batch if MESSAGES_FIELD not in r]
        done = iter(
            encoder._encode_batch(
                [r["source"] for r in single],
                [r["target"] for r in single],
                stats,
                [r.get(SYSTEM_FIELD) for r in single],
            )
        )
        encoded = [
            next(done)
            if MESSAGES_FIELD not in r
            else encoder.encode_conversation(r[MESSAGES_FIELD], r.get(SYSTEM_FIELD), stats)
            for r in batch
        ]
        for k, (rec, enc) in enumerate(zip(batch, encoded, strict=True)):
            if enc is None:
                continue
            kept.append(start + k)
            masks.append(enc.get("label_mask"))
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
    label_flat = None
    if any(m is not None for m in masks):  # a conversation: every example gets its mask
        label_flat = np.concatenate(
            [
                np.asarray(m, dtype=np.uint8)
                if m is not None
                else (np.arange(n) >= p).astype(np.uint8)
                for m, n, p in zip(masks, lengths, prompt_lens, strict=True)
            ]
        )
    return EncodedDataset(
        flat,
        offsets,
        np.asarray(prompt_lens, dtype=np.int64),
        task_names,
        ids,
        stats,
        np.asarray(spans, dtype=np.int64).reshape(len(spans), 2),
        np.asarray(kept, dtype=np.int64),
        label_flat,
    )


class DataCollator:
    """Pads encoded examples into the batch the model consumes.

    Returns a dict of LongTensors, all ``(B, T)``: ``input_ids``, ``attention_mask``,
    ``labels`` (-100 on prompt and padding; with a feature's ``label_mask``, -100 wherever it
    is 0: a conversation's user turns), ``prompt_mask`` (1 on prompt tokens only) and,
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
            if f.get("label_mask") is not None:
                mask = torch.as_tensor(np.asarray(f["label_mask"], dtype=bool))
                if mask.shape != ids.shape:
                    raise ValueError(
                        f"label_mask of {mask.numel()} tokens for a sequence of {n} tokens"
                    )
                labels_BT[i, s : s + n] = torch.where(mask, ids, IGNORE_INDEX)
            else:
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
