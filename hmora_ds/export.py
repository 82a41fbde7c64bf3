"""Export an adapter from a DeepSpeed checkpoint of any ZeRO stage.

    python -m hmora_ds.export runs/default/checkpoints out/adapter     # the newest checkpoint
    python -m hmora_ds.export runs/default/checkpoints/step00000200 out/adapter
    hmora-ds export runs/lora/adapter_best out/peft --peft     # PEFT LoRA (plain LoRA only)
    hmora-ds export runs/lora/adapter_best out/merged --merge  # a full HF model, LoRA folded in

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
        description="Export the adapter of a DeepSpeed checkpoint (ZeRO-0/1/2/3) to safetensors; "
        "with --peft as a PEFT LoRA directory, with --merge as a full model with the LoRA folded "
        "in (plain-LoRA adapters only).",
    )
    parser.add_argument(
        "source",
        help="a run's dir or its checkpoints dir (the newest complete checkpoint), a step dir, "
        "or (with --peft / --merge) an exported adapter directory",
    )
    parser.add_argument("out", help="output directory")
    form = parser.add_mutually_exclusive_group()
    form.add_argument(
        "--peft", action="store_true", help="write PEFT's format (PeftModel.from_pretrained)"
    )
    form.add_argument(
        "--merge", action="store_true", help="write the base model with the LoRA merged in"
    )
    parser.add_argument(
        "--model", default=None, help="--merge: the base model (default: the adapter's own)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.peft or args.merge:
            path = _convert(Path(args.source), Path(args.out), args.merge, args.model)
        else:
            path = export_adapter(args.source, args.out)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    what = "merged model" if args.merge else "PEFT adapter" if args.peft else "adapter"
    print(f"{what} written to {path}")
    return 0


def _convert(source: Path, out: Path, merge: bool, model: str | None) -> Path:
    """``--peft`` / ``--merge`` of an adapter directory, or of a checkpoint's adapter."""
    import tempfile

    from hmora_ds import peft_interop
    from hmora_ds.adapter_io import CONFIG_NAME

    def convert(adapter: Path) -> Path:
        if merge:
            return peft_interop.merge(adapter, out, model)
        return peft_interop.to_peft(adapter, out)

    if (source / CONFIG_NAME).is_file():
        return convert(source)
    with tempfile.TemporaryDirectory() as tmp:
        return convert(export_adapter(source, Path(tmp) / "adapter"))


if __name__ == "__main__":
    sys.exit(main())
