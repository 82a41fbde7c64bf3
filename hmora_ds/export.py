"""Export an adapter from a DeepSpeed checkpoint of any ZeRO stage.

    python -m hmora_ds.export runs/default/checkpoints out/adapter     # the newest checkpoint
    python -m hmora_ds.export runs/default/checkpoints/step00000200 out/adapter

DeepSpeed's ``zero_to_fp32`` reconstructs the full fp32 trainable tensors from the optimizer
partitions of every rank (ZeRO-3 shards included), on CPU and without a process group; the
checkpoint's ``adapter_meta.json`` supplies the method config and the base fingerprint. The
result loads with :func:`hmora_ds.load_adapter`.

The checkpoint is verified first (its manifest's sizes and SHA-256 digests, and every pickle's
references; :func:`hmora_ds.train.checkpoint.verify_checkpoint`): a truncated, modified or
planted file is named and nothing of it is unpickled. Every load is weights-only.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from hmora_ds.adapter_io import read_adapter_meta, write_adapter
from hmora_ds.cli import Parser, prog_name
from hmora_ds.train.checkpoint import safe_load, verified, weights_only_loads

logger = logging.getLogger(__name__)


EXPERT_FILES = "layer_*_expert_*_mp_rank_*_model_states.pt"
_ADAPTER_KEY = re.compile(r"(lora_A|lora_B|hydra_A|alpha_logit)$|^routers\.|^task_encoder\.")


def _expert_parallel_tensors(tag_dir: Path) -> dict:
    """Trainable tensors of an expert-parallel checkpoint, all experts, replicated layout.

    DeepSpeed writes one file per global expert (``layer_<l>_expert_<e>_…``) next to the
    module states of the replicated part; ZeRO-1/2 keep the fp32 trainable weights in the
    module itself, so no optimizer partition needs to be read.
    """
    from hmora_ds.parallel.expert_parallel import standardize_state_dict

    module = safe_load(tag_dir / "mp_rank_00_model_states.pt")["module"]
    state = {k: v for k, v in module.items() if _ADAPTER_KEY.search(k)}
    for path in sorted(tag_dir.glob(EXPERT_FILES)):
        state.update(safe_load(path))
    return {k: v.float() for k, v in standardize_state_dict(state).items()}


def export_adapter(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` from a checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    point = verified(checkpoint)
    ckpt_dir, tag = point.ckpt_dir, point.tag
    meta_file = ckpt_dir / tag / "adapter_meta.json"
    if not meta_file.is_file():
        raise ValueError(f"export: {meta_file} missing (not an hmora-ds checkpoint?)")
    meta = read_adapter_meta(meta_file, "the checkpoint is damaged; export another one")
    if list((ckpt_dir / tag).glob(EXPERT_FILES)):
        tensors = _expert_parallel_tensors(ckpt_dir / tag)
    else:
        with weights_only_loads():
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        # With exclude_frozen_parameters the state holds the trainable tensors only.
        tensors = {k: v for k, v in state.items() if v is not None}
    if not tensors:
        raise ValueError(f"export: no trainable tensors in {ckpt_dir / tag}")
    return write_adapter(out, tensors, meta)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        prog=prog_name("hmora_ds.export"),
        description="Export the adapter of a DeepSpeed checkpoint (ZeRO-0/1/2/3) to safetensors.",
    )
    parser.add_argument(
        "checkpoint",
        help="a run's dir or its checkpoints dir (the newest complete checkpoint) or a step dir",
    )
    parser.add_argument("out", help="output adapter directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        path = export_adapter(args.checkpoint, args.out)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"adapter written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
