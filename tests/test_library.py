"""The LoRA library's manifest and loader (``hmora_ds.library``): round trip, the (A, B,
scaling) read back equals the model's own update, and every damaged input is one clear line.
Tiny random-init models: the tests are about mechanics."""

from __future__ import annotations

import json

import pytest
import torch

from hmora_ds.adapter_io import save_adapter
from hmora_ds.library import Library, LibraryEntry, LibraryError, load_lora
from tests.conftest import randomize_adapters, tiny_base, tiny_hmora


def _library(tmp_path, tasks=("a", "b"), preset="lora_r8"):
    base = tiny_base()
    entries = []
    for i, task in enumerate(tasks):
        model = tiny_hmora(preset, seed=0)
        randomize_adapters(model, seed=i)
        entries.append(LibraryEntry(task, save_adapter(model, tmp_path / task / "adapter"),
                                    val_loss=1.0 + i, steps=4))  # fmt: skip
    from hmora_ds.base_model import base_fingerprint

    lib = Library(tmp_path, "tiny", base_fingerprint(base), entries)
    lib.write()
    return lib, model


def test_round_trip_and_relative_paths(tmp_path):
    _library(tmp_path)
    data = json.loads((tmp_path / "library.json").read_text())
    assert [e["adapter"] for e in data["entries"]] == ["a/adapter", "b/adapter"]
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    tmp_path.rename(moved)
    back = Library.load(moved)
    assert back.tasks == ["a", "b"]
    assert back.entry("b").adapter == moved / "b" / "adapter"
    assert back.entry("b").val_loss == 2.0
    assert back.select(exclude=["a"]).tasks == ["b"]
    assert back.select(["b", "a"]).tasks == ["b", "a"]


def test_load_lora_equals_the_model_update(tmp_path):
    lib, model = _library(tmp_path)
    sites = load_lora(lib.entry("b").adapter)
    model.eval()  # no dropout
    mod = model.adapted_modules()
    name = next(iter(mod))
    key = name.removeprefix("base_model.")
    site = sites[key]
    x = torch.randn(3, site.A.shape[1])
    got = x @ site.delta().T
    m = mod[name]
    want = m(x) - m.base_layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert site.scaling == pytest.approx(16.0 / 8)


def test_check_base_refuses_another_shape(tmp_path):
    lib, _ = _library(tmp_path)
    lib.check_base(tiny_base())
    with pytest.raises(LibraryError, match=r"trained on base 'tiny' of another shape: "
                       r"num_hidden_layers 6 \(library\) vs 4 \(base\)"):  # fmt: skip
        lib.check_base(tiny_base(layers=4))


def test_damaged_manifests_are_one_line_errors(tmp_path):
    with pytest.raises(LibraryError, match=r"library\.json not found; build one with"):
        Library.load(tmp_path)
    lib, _ = _library(tmp_path)
    path = tmp_path / "library.json"
    good = json.loads(path.read_text())
    cases = [
        ("{", "not valid JSON"),
        (json.dumps({**good, "format": "x"}), "not a LoRA library"),
        (json.dumps({**good, "version": 9}), "library version 9"),
        (json.dumps({**good, "entries": []}), "entries must be a non-empty list"),
        (json.dumps({**good, "entries": [good["entries"][0]] * 2}), "'a' appears twice"),
        (json.dumps({**good, "entries": [{"task": "a"}]}), r"entries\[0\] needs a task"),
    ]
    for text, msg in cases:
        path.write_text(text)
        with pytest.raises(LibraryError, match=msg):
            Library.load(tmp_path)
    path.write_text(json.dumps(good))
    (tmp_path / "b" / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(LibraryError, match=r"adapter of task 'b' .* is missing; rebuild that"):
        Library.load(tmp_path)
    with pytest.raises(LibraryError, match="no LoRA for task 'c'; it holds a, b"):
        lib.entry("c")


def test_only_plain_loras(tmp_path):
    model = tiny_hmora("molora")
    save_adapter(model, tmp_path / "m")
    with pytest.raises(LibraryError, match="is a 'molora' adapter; a library holds plain LoRAs"):
        load_lora(tmp_path / "m")
