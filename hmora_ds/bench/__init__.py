"""Benchmarks (``make bench``): numbers go to ``bench/results/*.json`` and ``*.md``."""
