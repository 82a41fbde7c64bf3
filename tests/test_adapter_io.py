"""Adapters on disk: round trip and strict, readable loading errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hmora_ds.adapter_io import load_adapter, save_adapter
from tests.conftest import batch, randomize_adapters, tiny_base, tiny_hmora


@pytest.fixture
def saved(tmp_path):
    model = tiny_hmora("hmora_lw", "llama", overrides=["routing.learn_alpha=true"])
    randomize_adapters(model)
    model.eval()
    path = save_adapter(model, tmp_path / "adapter")
    return model, path


def test_round_trip_gives_identical_logits(saved):
    model, path = saved
    ids, attn, labels, prompt = batch()
    with torch.no_grad():
        ref = model(ids, attn, labels, prompt)
        loaded = load_adapter(tiny_base("llama"), path).eval()
        out = loaded(ids, attn, labels, prompt)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.aux_loss, ref.aux_loss)
    assert loaded.config.to_dict() == model.config.to_dict()


def test_files_are_real_safetensors_with_trainable_tensors_only(saved):
    model, path = saved
    tensors = load_file(str(path / "adapter_model.safetensors"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(tensors) == trainable
    meta = json.loads((path / "adapter_config.json").read_text())
    assert meta["config"]["preset"] == "hmora_lw"
    assert meta["config"]["routing"]["topk_renorm"] == "paper"
    assert meta["base_model"]["fingerprint"]["hidden_size"] == 64
    assert meta["base_model"]["fingerprint"]["model_type"] == "llama"
    assert not list(path.glob(".*.tmp"))


def _rewrite(path, mutate):
    f = path / "adapter_model.safetensors"
    tensors = load_file(str(f))
    mutate(tensors)
    save_file(tensors, str(f))


def test_missing_tensor_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.pop("task_encoder.task_embedding"))
    with pytest.raises(
        ValueError, match=r"1 missing \(e\.g\. \['task_encoder\.task_embedding'\]\)"
    ):
        load_adapter(tiny_base("llama"), path)


def test_extra_tensor_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.__setitem__("routers.bogus.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"1 unexpected \(e\.g\. \['routers\.bogus\.weight'\]\)"):
        load_adapter(tiny_base("llama"), path)


def test_misshaped_tensor_is_named(saved):
    _, path = saved
    key = "base_model.model.layers.0.self_attn.q_proj.lora_B"
    _rewrite(path, lambda t: t.__setitem__(key, torch.zeros(3, 3)))
    with pytest.raises(ValueError, match=rf"tensor {key} has shape \(3, 3\) .* expects \(64, 64\)"):
        load_adapter(tiny_base("llama"), path)


def test_adapter_for_another_base_is_refused(saved):
    _, path = saved
    other = tiny_base("qwen2")
    with pytest.raises(ValueError, match=r"another shape: model_type llama \(adapter\) vs qwen2"):
        load_adapter(other, path)
    assert not any("lora" in n for n, _ in other.named_parameters())  # left untouched
    with pytest.raises(ValueError, match="num_hidden_layers 6 \\(adapter\\) vs 4 \\(base\\)"):
        load_adapter(tiny_base("llama", layers=4), path)


def test_missing_files_are_clear(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match=r"adapter directory \S+nowhere does not exist"):
        load_adapter(tiny_base("llama"), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json not found"):
        load_adapter(tiny_base("llama"), tmp_path / "empty")
    _, path = saved
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors not found"):
        load_adapter(tiny_base("llama"), path)


def test_full_finetune_has_no_adapter(tmp_path):
    with pytest.raises(ValueError, match="full fine-tune has no adapter"):
        save_adapter(tiny_hmora("full_ft"), tmp_path)


def test_adapters_saved_before_the_task_encoder_options_keep_their_behaviour(tmp_path):
    """An adapter whose config predates routing.task_slot_position / task_input loads with the
    behaviour it was trained with (slot position, whole prompt); a new one keeps its own."""
    from hmora_ds.adapter_io import read_adapter_config
    from tests._golden import GOLDEN_DIR

    old = read_adapter_config(GOLDEN_DIR / "adapters" / "hmora_lw_llama")["config"]["routing"]
    assert (old["task_slot_position"], old["task_input"]) == (True, "prompt")
    model = tiny_hmora("hmora")
    save_adapter(model, tmp_path / "new")
    raw = json.loads((tmp_path / "new" / "adapter_config.json").read_text())["config"]["routing"]
    assert (raw["task_slot_position"], raw["task_input"]) == (False, "instruction")
    new = read_adapter_config(tmp_path / "new")["config"]["routing"]
    assert (new["task_slot_position"], new["task_input"]) == (False, "instruction")


def test_learnable_alpha_saved_as_a_scalar_still_loads(saved):
    """A learnable α is a (1,) parameter (DeepSpeed cannot broadcast a 0-D one); adapters that
    stored it 0-D load into it with the same value and logits."""
    model, path = saved
    weights = path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    alphas = [n for n in tensors if n.endswith("alpha_logit")]
    assert alphas and all(tensors[n].shape == (1,) for n in alphas)
    save_file({n: t.reshape(()) if n in alphas else t for n, t in tensors.items()}, str(weights))
    loaded = load_adapter(tiny_base("llama"), path).eval()
    ids, attn, labels, prompt = batch()
    with torch.no_grad():
        got, want = loaded(ids, attn, labels, prompt), model(ids, attn, labels, prompt)
    assert torch.equal(got.logits, want.logits)  # the same code path: exactly
