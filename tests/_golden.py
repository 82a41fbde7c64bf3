"""Golden outputs of every preset on tiny Qwen2 / LLaMA models (mechanics only, random init).

What is recorded (``tests/golden/golden.json``), in float64 (router softmax and losses too), with
fixed seeds:
- ``lm_loss`` and the auxiliary loss per router kind;
- the logits and every trainable gradient, each as a fingerprint: sum, sum of squares and the
  dot product with a fixed seeded Gaussian tensor of the same shape. A change of any element
  moves the random projection (with probability 1), and the file stays small enough to commit
  (full tensors of 16 models would be megabytes);
- the trainable tensor names and shapes (those of the exported adapter);
- the TP report on the Qwen2-1.5B and LLaMA-3.2-1B shapes (exact integers).
Plus two adapters written by :func:`hmora_ds.save_adapter` (``tests/golden/adapters/``) with the
fingerprint of the logits they give, so adapters written before a refactor still load.

``python -m tests._golden`` rewrites the files: run it only on a commit whose outputs are
known good. ``python -m tests._golden --presets hmora hmora_lw`` re-records only those presets'
cases (both architectures) and TP reports and keeps everything else, the committed adapters
included: use it when a change is meant to alter those presets' outputs only (or adds presets).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from hmora_ds.adapter_io import save_adapter
from hmora_ds.config import load_config
from hmora_ds.model import HMoRAModel
from hmora_ds.params import build_meta_model, load_model_config, parameter_report
from tests.conftest import QUESTION_ID, batch, tiny_base

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN_FILE = GOLDEN_DIR / "golden.json"
PRESETS = ("lora_r8", "lora_r64", "molora", "mixlora", "hydralora", "hmora", "hmora_lw", "full_ft",
           "himole", "himole_one_stage")  # fmt: skip
ARCHS = ("qwen2", "llama")
TP_SHAPES = ("qwen2-1.5b", "llama-3.2-1b")
#: Adapters committed as written by the code that recorded the goldens.
#: 4 layers keep the files small and still give HMoRA token, hybrid and task layers.
ADAPTERS = {"hmora_lw_llama": ("hmora_lw", "llama"), "lora_r8_qwen2": ("lora_r8", "qwen2")}
ADAPTER_LAYERS = 4


def fingerprint(t: torch.Tensor, seed: int) -> list[float]:
    """[sum, Σx², ⟨x, g⟩] with g ~ N(0, 1) seeded by ``seed`` (float64)."""
    x = t.detach().double()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return [x.sum().item(), x.pow(2).sum().item(), (x * g).sum().item()]


def _seed_of(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % (2**31)


def golden_model(preset: str, arch: str, layers: int = 6) -> HMoRAModel:
    """The tiny model of one case, float64, B randomised so adapters change the output."""
    base = tiny_base(arch, seed=0, layers=layers)
    torch.manual_seed(1)
    model = HMoRAModel(base, load_config(preset), task_token_id=QUESTION_ID).double()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    return model


def case_outputs(model: HMoRAModel) -> dict:
    """Forward + backward of one fixed batch in training mode with dropout off."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        elif isinstance(m, torch.nn.MultiheadAttention):  # its dropout is a float, no module
            m.dropout = 0.0
    ids, attn, labels, prompt = batch(bsz=3, length=12, seed=3)
    instruction = prompt.clone()
    instruction[:, 0] = 0  # the first prompt token plays a chat template's wrapper
    model.zero_grad(set_to_none=True)
    out = model(ids, attn, labels, prompt, instruction_mask=instruction)
    out.loss.backward()
    grads = {
        n: fingerprint(p.grad, _seed_of(n))
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }
    return {
        "lm_loss": out.lm_loss.item(),
        "loss": out.loss.item(),
        "aux_loss": out.aux_loss.item(),
        "aux_by_kind": {k: float(v) for k, v in sorted(out.aux_by_kind.items())},
        "logits": fingerprint(out.logits, 7),
        "trainable": {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad},
        "grads": grads,
    }


def eval_logits(model: HMoRAModel) -> list[float]:
    """Fingerprint of eval-mode logits (what an adapter reproduces after loading)."""
    model.eval()
    ids, attn, labels, prompt = batch(bsz=3, length=12, seed=4)
    with torch.no_grad():
        return fingerprint(model(ids, attn, labels, prompt).logits.double(), 11)


def tp_reports(presets: tuple[str, ...] = PRESETS) -> dict:
    out = {}
    for shape in TP_SHAPES:
        cfg = load_model_config(shape)
        for preset in presets:
            rep = parameter_report(build_meta_model(cfg, load_config(preset)))
            out[f"{shape}/{preset}"] = {
                "components": dict(sorted(rep.components.items())),
                "trainable": rep.trainable,
                "base": rep.base,
            }
    return out


def record(presets: list[str] | None = None) -> None:
    """Re-record everything, or only the cases of ``presets`` (the rest of the file kept)."""
    torch.set_num_threads(1)
    if presets:
        unknown = sorted(set(presets) - set(PRESETS))
        if unknown:
            raise SystemExit(f"--presets: unknown {unknown}; choose from {list(PRESETS)}")
        data = json.loads(GOLDEN_FILE.read_text())
        for preset in presets:
            for arch in ARCHS:
                data["cases"][f"{preset}/{arch}"] = case_outputs(golden_model(preset, arch))
        data["tp"].update(tp_reports(tuple(presets)))
        GOLDEN_FILE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"rewrote the cases of {presets} in {GOLDEN_FILE}", file=sys.stderr)
        return
    cases = {}
    for preset in PRESETS:
        for arch in ARCHS:
            cases[f"{preset}/{arch}"] = case_outputs(golden_model(preset, arch))
    adapters = {}
    for name, (preset, arch) in ADAPTERS.items():
        model = golden_model(preset, arch, ADAPTER_LAYERS).float()
        save_adapter(model, GOLDEN_DIR / "adapters" / name)
        adapters[name] = {"preset": preset, "arch": arch, "eval_logits": eval_logits(model)}
    data = {"cases": cases, "tp": tp_reports(), "adapters": adapters}
    GOLDEN_FILE.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN_FILE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN_FILE} ({GOLDEN_FILE.stat().st_size:,} bytes)", file=sys.stderr)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests._golden", description=__doc__)
    parser.add_argument("--presets", nargs="+", help="re-record only these presets' cases")
    record(parser.parse_args().presets)
