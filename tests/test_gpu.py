"""GPU checks (marker ``gpu``): run through the device tool when a GPU machine is lent.

Skipped here with a reason when no CUDA device is present (CI never has one).
"""

import pytest
import torch

from tests._train_helpers import launch, overrides, summary

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bf16_autocast_step_keeps_fp32_adapters(tiny_run_inputs):
    from hmora_ds.config import load_config
    from hmora_ds.model import HMoRAModel
    from hmora_ds.train.loading import load_base_model

    base = load_base_model(str(tiny_run_inputs / "model"), torch.bfloat16, "sdpa").cuda()
    model = HMoRAModel(base, load_config("hmora_lw"), task_token_id=5).cuda()
    ids = torch.randint(3, 1000, (2, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    lora = [p for n, p in model.named_parameters() if n.endswith("lora_B")]
    assert all(p.dtype == torch.float32 and p.grad is not None for p in lora)
    assert torch.isfinite(out.loss)


def test_training_entry_point_on_gpu(tiny_run_inputs, tmp_path):
    out = tmp_path / "gpu"
    launch(
        "python",
        "zero2.json",
        overrides(tiny_run_inputs, out, "train.precision=bf16"),
        env={"DS_ACCELERATOR": "cuda"},
    )
    s = summary(out)
    assert s["steps"] == 6 and s["lm_loss_last"] < s["lm_loss_first"] + 1.0
