"""HMoRA on the real SmolLM2-135M-Instruct (LLaMA architecture, dequantised from its GGUF)."""

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from hmora_ds import assets
    from hmora_ds.runtime.loading import load_base_model, load_tokenizer, resolve_checkpoint
    from tests._assets import require_asset

    path = require_asset(assets.SMOLLM2, lambda: resolve_checkpoint("smollm2-135m-instruct"))
    return load_tokenizer(path), lambda: load_base_model(path, torch.float32, "sdpa").eval()


def test_real_model_injection_generation_and_tp(smollm2):
    from hmora_ds.config import load_config
    from hmora_ds.model import HMoRAModel
    from hmora_ds.params import parameter_report

    tok, base = smollm2
    msgs = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Hi")]
    tok.padding_side = "left"
    enc = tok.apply_chat_template(
        msgs, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    reference = base()
    model = HMoRAModel(base(), load_config("hmora_lw"), tokenizer=tok).eval()
    assert model.base_model.config.model_type == "llama"
    assert model.task_token_id == tok.encode("?", add_special_tokens=False)[0]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        ours = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
        ref = reference.generate(**enc, **kw)
    assert torch.equal(ours, ref)  # B = 0 at init: exactly the base model
    answer = tok.decode(ours[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    rep = parameter_report(model)
    assert rep.base == 134_515_008 and 8.0 < rep.tp_percent < 10.0
