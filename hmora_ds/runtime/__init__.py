"""Runtime helpers shared by every entry point that runs a model (training, evaluation,
routing analysis, benchmarks):

* :mod:`~hmora_ds.runtime.dist` — process start-up: devices, process groups, DeepSpeed on CPU,
  rank-aware logging, :func:`~hmora_ds.runtime.dist.rank0_first`;
* :mod:`~hmora_ds.runtime.loading` — the base model and tokenizer: HF names, local directories,
  GGUF files (converted and cached once), dtypes.

A bottom-layer package: it imports nothing above it (``docs/architecture.md``).
"""
