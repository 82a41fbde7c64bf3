"""Parallelism beyond data parallelism: expert parallelism of the LoRA experts."""
