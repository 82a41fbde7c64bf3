"""Routing analysis of trained adapters (the paper's figure 3, figure 4, tables 13-16; spec §9).

* :mod:`~hmora_ds.analysis.stats` — pure statistics: balance / certainty, activation shares,
  main expert pairs, recognition rates, t-SNE;
* :mod:`~hmora_ds.analysis.collect` — :func:`analyze_routing`: run a model over labelled
  prompts and build the ``routing.json`` document;
* :mod:`~hmora_ds.analysis.data` — the prompts (MMLU subjects, a file, the training mixture);
* :mod:`~hmora_ds.analysis.plots`, :mod:`~hmora_ds.analysis.report` — PNGs and ``routing.md``;
* :mod:`~hmora_ds.analysis.cli` — ``python -m hmora_ds.analyze routing`` (entry point
  :mod:`hmora_ds.analyze`).

matplotlib and scikit-learn (the ``analysis`` extra) are imported only where they are used.
"""

from hmora_ds.analysis.collect import (
    AnalysisError,
    RoutingCollection,
    RoutingExample,
    analyze_routing,
    collect_routing,
    final_task_router,
    parse_router_name,
    router_names,
    summarize_routing,
)
from hmora_ds.analysis.data import load_examples
from hmora_ds.analysis.stats import (
    RECOGNITION_THRESHOLDS,
    MainExpertPair,
    activation_shares,
    balance_certainty,
    expert_sets,
    main_expert_pairs,
    recognition_rates,
    tsne_embedding,
)

__all__ = [
    "RECOGNITION_THRESHOLDS",
    "AnalysisError",
    "MainExpertPair",
    "RoutingCollection",
    "RoutingExample",
    "activation_shares",
    "analyze_routing",
    "balance_certainty",
    "collect_routing",
    "expert_sets",
    "final_task_router",
    "load_examples",
    "main_expert_pairs",
    "parse_router_name",
    "recognition_rates",
    "router_names",
    "summarize_routing",
    "tsne_embedding",
]
