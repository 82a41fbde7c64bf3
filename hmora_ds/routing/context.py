"""The routing context: how the task representation reaches every router (spec §3).

One :class:`RoutingContext` is owned by the wrapper model and handed to every router group at
injection. The wrapper binds the task representation at the start of each forward and it stays
bound until the next forward, so activation-checkpoint recomputation (which runs during
backward, after the forward returned) sees the same tensor. Routing *records* (the router
probabilities the auxiliary losses need) are collected only inside the wrapper's forward scope,
so a recompute never records twice.

Each router module records into a *slot* of its own (:meth:`RoutingContext.slot`, a list the
context empties at the start of every forward and reads back, in the routers' construction
order, at its end). One list shared by every router would make a compiled decoder layer depend
on how many records earlier layers appended: ``torch.compile`` guards on that length and would
compile every layer again. With a slot per router, every layer of the model sees the same
state (its slots empty) and reuses one compiled graph.

Nothing here is set from the training loop: the wrapper's own ``forward`` and ``generate`` are
the only writers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True, order=True)
class RouterId:
    """Which router: decoder layer, the adapted linears it serves, and its kind.

    ``str(RouterId(3, ("q", "k", "v"), "token")) == "layer03.q_k_v.token"``: the name used in
    statistics, TensorBoard tags and analysis files; :meth:`parse` reads it back.
    """

    layer: int
    targets: tuple[str, ...]
    kind: str

    @property
    def group(self) -> str:
        """``layer03.q_k_v``: the router group (the same for its token and task routers)."""
        return f"layer{self.layer:02d}.{'_'.join(self.targets)}"

    def __str__(self) -> str:
        return f"{self.group}.{self.kind}"

    @classmethod
    def parse(cls, name: str) -> RouterId:
        """The id of a name written by :meth:`__str__` (ValueError naming it otherwise)."""
        parts = name.split(".")
        if len(parts) != 3 or not parts[0].startswith("layer") or not parts[0][5:].isdigit():
            raise ValueError(f"router name {name!r}: expected layerNN.<targets>.<kind>")
        return cls(int(parts[0][5:]), tuple(parts[1].split("_")), parts[2])


@dataclass(frozen=True)
class RoutingRecord:
    """Probabilities of one router in one forward.

    Attributes:
        id: which router (layer, targets, kind).
        probs: (B, T, E) for a token router, (B, E) for a task router; the router's own softmax.
        mask: (B, T) validity of token decisions (1 = real token), or None (all valid).
    """

    id: RouterId
    probs: torch.Tensor
    mask: torch.Tensor | None

    @property
    def name(self) -> str:
        """The router's name, e.g. ``layer03.q_k_v.token``."""
        return str(self.id)

    @property
    def kind(self) -> str:
        return self.id.kind


class RecordSlot:
    """One router module's records and observations of the current forward."""

    def __init__(self) -> None:
        self.records: list[RoutingRecord] = []
        self.observations: list[RoutingRecord] = []


class RoutingContext:
    """Per-forward routing state shared by the router groups of one model."""

    def __init__(self) -> None:
        self.forward_id = 0
        self._task_repr: torch.Tensor | None = None
        self._inputs: dict[str, torch.Tensor] = {}
        self._token_mask: torch.Tensor | None = None
        self._expand_batch = False
        self._recording = False
        self._records: list[RoutingRecord] = []
        self._observations: list[RoutingRecord] = []
        # Per-router slots (see the module docstring): (records, observations) lists.
        self._slots: list[RecordSlot] = []
        #: Tokens already in the KV cache of the base model's current call (0 outside a
        #: decoding step); set by the wrapper model before every base-model call, so a router
        #: can tell a decoding step (only the new tokens) from a full forward.
        self.cached_tokens = 0

    @contextlib.contextmanager
    def forward_scope(
        self,
        task_repr: torch.Tensor | None,
        token_mask: torch.Tensor | None,
        *,
        record: bool,
        expand_batch: bool = False,
        inputs: dict[str, torch.Tensor] | None = None,
    ) -> Iterator[list[RoutingRecord]]:
        """Bind the task representation for one model forward and collect routing records.

        Args:
            task_repr: (B, D) task representation, or None when no layer routes by task.
            token_mask: (B, T) 1 for real tokens, used to mask token-router statistics.
            record: collect routing records (training/eval forwards; not generation steps).
            expand_batch: allow inputs whose batch is a multiple of B (generation with beams
                or several return sequences, which repeat each prompt consecutively).
            inputs: the method's batch inputs given to this forward (B, …), by name, for
                routers to read with :meth:`batch_input` (e.g. HiMoLE's stage-1 ``cluster``).

        Yields:
            The list that receives this forward's records.
        """
        self.forward_id += 1
        self._task_repr = task_repr
        self._inputs = dict(inputs or {})
        self._token_mask = token_mask
        self._expand_batch = expand_batch
        self._records = []
        self._observations = []
        self._recording = record
        try:
            yield self._records
        finally:
            # The task representation stays bound (checkpoint recompute needs it); recording
            # stops so a recompute during backward adds nothing.
            self._recording = False
            for slot in self._slots:  # emptied here, so the next forward finds them empty
                self._records.extend(slot.records)
                self._observations.extend(slot.observations)
                slot.records.clear()
                slot.observations.clear()

    @property
    def task_repr(self) -> torch.Tensor | None:
        """The task representation bound by the last forward (None if none)."""
        return self._task_repr

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        """The batch inputs bound by the last forward (see :meth:`forward_scope`)."""
        return self._inputs

    def batch_input(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """The bound batch input ``name`` for the N sequences of ``x`` (N, …), or None when
        the forward was not given it (expanded like :meth:`task_repr_for`)."""
        value = self._inputs.get(name)
        return None if value is None else self.expand_rows(value, x, f"batch input {name!r}")

    @property
    def recording(self) -> bool:
        """Whether this forward collects records (False in generation and in the activation
        recomputation during backward)."""
        return self._recording

    def slot(self) -> RecordSlot:
        """A new record slot for one router module, created once at its construction and
        passed to :meth:`record` / :meth:`observe` (see the module docstring)."""
        slot = RecordSlot()
        self._slots.append(slot)
        return slot

    def record(
        self,
        rid: RouterId,
        probs: torch.Tensor,
        mask: torch.Tensor | None,
        slot: RecordSlot | None = None,
    ) -> None:
        """Keep a router's probabilities for this forward's losses and statistics, in the
        router's ``slot`` (or, without one, in a list shared by every router: correct, but a
        compiled layer then recompiles per layer)."""
        if self._recording:
            (self._records if slot is None else slot.records).append(
                RoutingRecord(rid, probs, mask)
            )

    def observe(
        self,
        rid: RouterId,
        values: torch.Tensor,
        mask: torch.Tensor | None,
        slot: RecordSlot | None = None,
    ) -> None:
        """Keep a per-decision quantity a method's auxiliary loss needs that is not a router's
        probabilities (e.g. a similarity of expert outputs per token): ``values`` (B, T) with
        its token ``mask``. Handed to :meth:`~hmora_ds.methods.Method.aux_losses` with the
        records, never to the routing statistics. ``slot``: as in :meth:`record`."""
        if self._recording:
            target = self._observations if slot is None else slot.observations
            target.append(RoutingRecord(rid, values, mask))

    @property
    def observations(self) -> list[RoutingRecord]:
        """The observations of the last forward (see :meth:`observe`)."""
        return self._observations

    def token_mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The (B, T) token mask matching ``x`` (B, T, D), or None when not recording."""
        if not self._recording or self._token_mask is None:
            return None
        if self._token_mask.shape != x.shape[:-1]:
            raise RuntimeError(
                f"routing context: token mask {tuple(self._token_mask.shape)} does not match "
                f"the routed input {tuple(x.shape[:-1])}"
            )
        return self._token_mask

    def task_repr_for(self, x: torch.Tensor) -> torch.Tensor:
        """The (N, D) task representation for the N sequences of ``x`` (N, T, D)."""
        rep = self._task_repr
        if rep is None:
            raise RuntimeError(
                "routing context: a task router ran but no task representation is bound; "
                "call the HMoRA wrapper model (its forward/generate), not the inner HF model"
            )
        return self.expand_rows(rep, x, "the task representation batch")

    def expand_rows(self, value: torch.Tensor, x: torch.Tensor, what: str) -> torch.Tensor:
        """``value`` (B, …) bound per sequence, for the N sequences of ``x``: itself when
        N = B, each row repeated N / B times under ``expand_batch`` (beams, several returns)."""
        n, b = x.shape[0], value.shape[0]
        if n == b:
            return value
        if self._expand_batch and n % b == 0:
            return value.repeat_interleave(n // b, dim=0)
        raise RuntimeError(f"routing context: input batch {n} does not match {what} of {b}")
