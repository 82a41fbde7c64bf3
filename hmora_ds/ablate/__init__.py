"""Ablation studies of the paper (tables 2, 3, 9, 10, 11) and the ablation plan (task encoder,
number of experts): grids of run-config overrides, run through the repository's own training,
evaluation and routing-analysis entry points. See ``docs/ablations.md``."""

from hmora_ds.ablate.studies import STUDIES, Row, Study, get_study

__all__ = ["STUDIES", "Row", "Study", "get_study"]
