"""Data: the Flan v2 builder, local datasets, the offline mixture, tokenisation, sampling.

Training and evaluation use:

* :func:`load_records` - records from a local file or builder directory, or a Hugging Face
  dataset, in any format of :mod:`hmora_ds.data.formats` (records, Alpaca, OpenAI messages,
  ShareGPT);
* :func:`apply_chat_template_setting` - ``data.chat_template`` on a tokenizer;
* :func:`build_flan` / :func:`build_offline` / :func:`ensure_offline_mixture` - builders;
* :class:`ChatEncoder`, :func:`encode_records`, :class:`DataCollator` - tokenisation
  and batches (``input_ids``, ``attention_mask``, ``labels``, ``prompt_mask``);
* :class:`LengthGroupedSampler` - deterministic, resumable, rank-aware batches.
"""

from hmora_ds.data.chat_templates import NAMED_TEMPLATES, apply_chat_template_setting
from hmora_ds.data.collate import (
    IGNORE_INDEX,
    ChatEncoder,
    DataCollator,
    EncodeConfig,
    EncodedDataset,
    EncodeStats,
    encode_records,
)
from hmora_ds.data.flan import PAPER_MIXTURE, FlanConfig, build_flan
from hmora_ds.data.formats import FORMATS, parse_rows
from hmora_ds.data.local import BadDataReport, iter_records, load_records
from hmora_ds.data.offline import (
    OfflineConfig,
    build_offline,
    default_offline_dir,
    ensure_offline_mixture,
)
from hmora_ds.data.records import DataError, read_manifest
from hmora_ds.data.sampler import LengthGroupedSampler

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "NAMED_TEMPLATES",
    "PAPER_MIXTURE",
    "BadDataReport",
    "ChatEncoder",
    "DataCollator",
    "DataError",
    "EncodeConfig",
    "EncodeStats",
    "EncodedDataset",
    "FlanConfig",
    "LengthGroupedSampler",
    "OfflineConfig",
    "apply_chat_template_setting",
    "build_flan",
    "build_offline",
    "default_offline_dir",
    "encode_records",
    "ensure_offline_mixture",
    "iter_records",
    "load_records",
    "parse_rows",
    "read_manifest",
]
