"""PEFT interop with the pinned PEFT: plain-LoRA adapters load in PEFT and merge into the base;
mixture adapters are refused by our converter and by PEFT's own loaders, with a message.

The conversion tests use tiny random-init models (the tensor mapping is mechanics); the merge
runs on the real SmolLM2-135M-Instruct, as a user would merge.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftConfig, PeftModel

from hmora_ds.adapter_io import save_adapter
from hmora_ds.export import main as export_main
from hmora_ds.peft_interop import to_peft
from tests.conftest import batch, randomize_adapters, tiny_base, tiny_hmora


@pytest.mark.parametrize(("preset", "arch"), [("lora_r8", "qwen2"), ("lora_r64", "llama")])
def test_a_plain_lora_adapter_loads_in_peft_and_computes_the_same_logits(preset, arch, tmp_path):
    ours = tiny_hmora(preset, arch).eval()
    randomize_adapters(ours, seed=3)
    save_adapter(ours, tmp_path / "adapter")
    assert export_main([str(tmp_path / "adapter"), str(tmp_path / "peft"), "--peft"]) == 0
    assert PeftConfig.from_pretrained(str(tmp_path / "peft")).r == (
        8 if preset == "lora_r8" else 64
    )
    theirs = PeftModel.from_pretrained(tiny_base(arch), str(tmp_path / "peft")).eval()
    ids, attn, _, _ = batch()
    with torch.no_grad():
        want = ours(input_ids=ids, attention_mask=attn).logits
        got = theirs(input_ids=ids, attention_mask=attn).logits
        plain = tiny_base(arch)(input_ids=ids, attention_mask=attn).logits
    real = attn.bool()  # padded positions' logits are nobody's output
    assert (want - plain)[real].abs().max() > 1e-3  # the adapter does change the output
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_mixture_adapters_are_refused_by_the_converter_and_by_peft(tmp_path, capsys):
    save_adapter(tiny_hmora("hmora_lw"), tmp_path / "mix")
    with pytest.raises(ValueError, match=r"^export --peft: method hmora is not plain LoRA"):
        to_peft(tmp_path / "mix", tmp_path / "out")
    assert export_main([str(tmp_path / "mix"), str(tmp_path / "m"), "--merge"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: export --merge: method hmora is not plain LoRA")
    # PEFT's own loaders stop at our tag, and their error says what the directory is.
    for load in (
        lambda: PeftConfig.from_pretrained(str(tmp_path / "mix")),
        lambda: PeftModel.from_pretrained(tiny_base(), str(tmp_path / "mix")),
    ):
        with pytest.raises(KeyError, match="hmora-ds mixture-of-LoRA-experts adapter"):
            load()


@pytest.mark.slow
def test_merge_folds_a_lora_into_the_real_smollm2_and_saves_a_plain_hf_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from hmora_ds import assets
    from hmora_ds.config import load_config
    from hmora_ds.model import HMoRAModel
    from hmora_ds.runtime.loading import load_base_model, resolve_checkpoint
    from tests._assets import require_asset

    path = require_asset(assets.SMOLLM2, lambda: resolve_checkpoint("smollm2-135m-instruct"))
    ours = HMoRAModel(load_base_model(path, torch.float32, "sdpa"), load_config("lora_r8")).eval()
    randomize_adapters(ours, seed=1, scale=0.05)
    save_adapter(ours, tmp_path / "adapter")
    out = tmp_path / "merged"
    args = [str(tmp_path / "adapter"), str(out), "--merge", "--model", "smollm2-135m-instruct"]
    assert export_main(args) == 0
    assert list(out.glob("*.safetensors")) and (out / "config.json").is_file()
    assert (out / "tokenizer_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 3843, 47]])
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
