"""Routing: token and task routers, hierarchical hybrid mixing, the task encoder, the context."""

from hmora_ds.routing.context import RouterId, RoutingContext, RoutingRecord
from hmora_ds.routing.gates import Router, RouterGroup, layer_alphas, layer_modes, topk_gates
from hmora_ds.routing.task_encoder import TaskEncoder

__all__ = [
    "Router",
    "RouterGroup",
    "RouterId",
    "RoutingContext",
    "RoutingRecord",
    "TaskEncoder",
    "layer_alphas",
    "layer_modes",
    "topk_gates",
]
