"""Runtime helpers shared by every entry point that runs a model (training, evaluation,
routing analysis, benchmarks):

* :mod:`~hmora_ds.runtime.errors` — the one line of an exception that an error message quotes;
* :mod:`~hmora_ds.runtime.dist` — process start-up: devices, process groups, DeepSpeed on CPU,
  rank-aware logging, :func:`~hmora_ds.runtime.dist.rank0_first`;
* :mod:`~hmora_ds.runtime.loading` — the base model and tokenizer: HF names, local directories,
  GGUF files (converted and cached once), dtypes;
* :mod:`~hmora_ds.runtime.watchdog` — heartbeats of every rank and rank 0's watchdog, which names
  a rank that stops answering before the collective timeout (``dist.timeout_s``) ends the run;
* :mod:`~hmora_ds.runtime.writable` — is a directory (``output_dir``) writable, asked before
  anything loads.

A bottom-layer package: it imports nothing above it (``docs/architecture.md``).
"""
