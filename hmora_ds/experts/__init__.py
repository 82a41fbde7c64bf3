"""Expert banks (stacked LoRA experts behind a router) and the dispatchers that compute them."""

from hmora_ds.experts.bank import MoRALinear, prefer_sparse
from hmora_ds.experts.dispatch import (
    DenseDispatcher,
    Dispatcher,
    DispatchPlan,
    LoopDispatcher,
    SparseDispatcher,
    use_dispatcher,
)

__all__ = [
    "DenseDispatcher",
    "DispatchPlan",
    "Dispatcher",
    "LoopDispatcher",
    "MoRALinear",
    "SparseDispatcher",
    "prefer_sparse",
    "use_dispatcher",
]
