"""In and out of distribution: ``data.tasks`` / ``data.exclude_tasks``, the offline-task →
benchmark mapping and its ID / OOD split, proof on the real mixture that the OOD benchmarks
share no training record, the ``ood`` study's grid and refused rows, and its table's numbers
against hand computations."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from hmora_ds.ablate import rows as rowio
from hmora_ds.ablate.cli import build_options, describe, main, parse_args
from hmora_ds.ablate.ood_table import markdown
from hmora_ds.ablate.runner import Options, plan, run_job
from hmora_ds.ablate.scales import CPU, PAPER
from hmora_ds.ablate.studies import OOD_BENCHMARKS, OOD_TRAIN_TASKS, Row, get_study
from hmora_ds.ablate.table import TableRow
from hmora_ds.data.offline_tasks import TASKS
from hmora_ds.data.records import DataError, select_tasks
from hmora_ds.eval.benchmarks import OFFLINE_TASK
from hmora_ds.eval.ood import TASK_BENCHMARK, shared_questions, split_benchmarks
from hmora_ds.train.config import load_run_config

REGISTERED_ROWS = "mixlora,hydralora,lora-r8,hmora-lw"  # the himole rows need its presets


# ---------------------------------------------------------------------------- data.tasks
def _recs(*tasks: str) -> list[dict]:
    return [{"id": f"{t}/{i}", "source": "s", "target": "t", "task_name": t}
            for t in tasks for i in range(2)]  # fmt: skip


def test_data_tasks_select_records_and_bad_names_are_one_line_errors():
    """Guards a task list that is accepted but not applied (training on every task anyway),
    and a misspelt task that silently trains on nothing of it."""
    recs = _recs("arc_easy", "piqa", "boolq")
    assert [r["task_name"] for r in select_tasks(recs, ["piqa", "arc_easy"])] == [
        "arc_easy", "arc_easy", "piqa", "piqa"]  # fmt: skip
    assert {r["task_name"] for r in select_tasks(recs, None, ["piqa"])} == {"arc_easy", "boolq"}
    assert {r["task_name"] for r in select_tasks(recs, ["piqa", "boolq"], ["boolq"])} == {"piqa"}
    assert select_tasks(recs) is recs
    with pytest.raises(DataError, match=r"^data\.tasks: no record of task\(s\) 'pica' in x\.jsonl; "
                       r"its tasks are arc_easy, boolq, piqa$"):  # fmt: skip
        select_tasks(recs, ["pica"], where="x.jsonl")
    with pytest.raises(DataError, match=r"^data\.exclude_tasks: leaves no task"):
        select_tasks(recs, None, ["arc_easy", "piqa", "boolq"])

    run = load_run_config(None, ["data.tasks=[arc_easy, piqa]", "data.exclude_tasks=[piqa]"])
    assert (run.data.tasks, run.data.exclude_tasks) == (["arc_easy", "piqa"], ["piqa"])
    known = ", ".join(TASKS)
    for overrides, message in (
        (["data.tasks=[arc_easy, commonsenseqa]"],
         f"data.tasks: unknown offline task(s) 'commonsenseqa'; the offline mixture's tasks are "
         f"{known}"),
        (["data.exclude_tasks=[csqa]"], "data.exclude_tasks: unknown offline task(s) 'csqa'"),
        (["data.tasks=[]"], "data.tasks: is empty; list the tasks to train on, or null for all"),
        (["data.tasks=[piqa]", "data.exclude_tasks=[piqa]"],
         "data.exclude_tasks: excludes every task of data.tasks"),
    ):  # fmt: skip
        with pytest.raises(ValueError) as err:
            load_run_config(None, overrides)
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
    # Other kinds name their own tasks: checked against the records when they load.
    run = load_run_config(None, ["data.kind=local", "data.path=x.jsonl", "data.tasks=[mine]"])
    assert run.data.tasks == ["mine"]


def test_split_records_trains_and_validates_on_the_selected_tasks_only(tmp_path):
    """The selection reaches the records the trainer encodes, validation included."""
    from hmora_ds.train.data import split_records

    path = tmp_path / "d.jsonl"
    recs = [{**r, "id": f"{r['id']}/{k}"} for k in range(40) for r in _recs("a", "b", "c")]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    run = load_run_config(None, ["data.kind=local", f"data.path={path}", "data.tasks=[a, c]",
                                 "data.exclude_tasks=[c]", "data.val_fraction=0.3"])  # fmt: skip
    train, val = split_records(run)
    assert train and val and {r["task_name"] for r in train + val} == {"a"}
    assert len(train) + len(val) == 80


# ---------------------------------------------------------------------------- mapping
def test_task_benchmark_mapping_and_the_studys_split():
    """Guards a renamed task or benchmark (commonsense_qa vs csqa, hellaswag vs swag) that
    would silently turn an ID benchmark into an OOD one."""
    assert TASK_BENCHMARK == {
        "arc_challenge": "arc_challenge",
        "arc_easy": "arc_easy",
        "openbookqa": "openbookqa",
        "commonsense_qa": "commonsense_qa",
        "hellaswag": "swag",
    }
    assert all(OFFLINE_TASK[b] == t and t in TASKS for t, b in TASK_BENCHMARK.items())
    every = ("mmlu", "mmlu_pro", "arc_challenge", "arc_easy", "openbookqa", "swag",
             "commonsense_qa")  # fmt: skip
    split = split_benchmarks(every, OOD_TRAIN_TASKS)
    assert split.id == ("arc_challenge", "arc_easy", "openbookqa")
    assert split.ood == ("mmlu", "mmlu_pro", "swag", "commonsense_qa") and not split.notes
    assert split_benchmarks(every, TASKS).ood == ("mmlu", "mmlu_pro")  # the full mixture
    near = split_benchmarks(["arc_easy", "arc_challenge"], ["arc_easy"])
    assert (
        near.ood == ("arc_challenge",) and "ARC-C is held out but arc_easy trains" in near.notes[0]
    )


def test_shared_questions_needs_question_and_answer_in_one_record():
    """The leak check on hand-made records: a template that shows the question and the answer
    (any case and punctuation) is found; the question with another answer only by the strict
    check; a short generic stem never; HellaSwag's activity label is not part of the text."""
    from hmora_ds.eval.benchmarks import Question

    qs = [
        Question("a", "arc_easy", "Which gas do plants take in from the air?",
                 ("Oxygen", "Carbon dioxide"), 1),
        Question("b", "arc_easy", "Which is true?", ("This one", "That one"), 0),
        Question("hellaswag/7", "swag", "Baking cookies: A woman mixes flour and sugar in a bowl",
                 ("then bakes them.", "then swims."), 0),
    ]  # fmt: skip
    recs = [
        {"id": "r1", "source": "Q: which gas do plants take in from the AIR", "target": "oxygen"},
        {"id": "r2", "source": "which gas do plants take in from the air? (carbon dioxide)",
         "target": "B"},
        {"id": "r3", "source": "Which is true? This one.", "target": "This one"},
        {"id": "r4", "source": "a woman mixes flour and sugar in a bowl...",
         "target": "Then bakes them"},
    ]  # fmt: skip
    assert shared_questions(qs, recs) == [("a", "r2"), ("hellaswag/7", "r4")]
    assert shared_questions(qs, recs[:1]) == []  # the question, but with another answer
    assert shared_questions(qs, recs[:1], require_answer=False) == [("a", "r1")]


def test_ood_benchmarks_share_no_training_record_of_the_real_mixture():
    """The study's claim, on the records it trains on (the offline mixture of seed 0, its 7
    tasks) and the questions it evaluates (the first 100 of each test subset): no training
    record holds an evaluation question with its answer, and no record even contains an OOD
    question's text. The positive control shows that the check finds the questions a record
    does hold (ARC-E's train split: 1000 of them trained)."""
    from hmora_ds.data import ensure_offline_mixture, load_records
    from hmora_ds.eval.benchmarks import load_benchmark
    from hmora_ds.eval.suite import SuiteConfig, prepare_suite
    from tests._eval_helpers import olmo_dir_or_skip

    olmo_dir_or_skip()
    records = load_records(ensure_offline_mixture(1000, 0))
    train = select_tasks(records, OOD_TRAIN_TASKS)
    assert len(train) == 7000
    suite = SuiteConfig(benchmarks=["mmlu,arc-c,arc-e,obqa,swag,csqa"], max_questions=100)
    prepared = prepare_suite(suite)
    questions = [q for p in prepared.values() for q in p.questions]
    assert len(questions) == 600
    assert shared_questions(questions, train) == []
    ood = [q for q in questions if q.benchmark in ("mmlu", "swag", "commonsense_qa")]
    assert len(ood) == 300 and shared_questions(ood, train, require_answer=False) == []
    arc_train = load_benchmark("arc_easy", "train", "offline").questions
    hits = shared_questions(arc_train, [r for r in train if r["task_name"] == "arc_easy"])
    assert len({rid for _, rid in hits}) >= 990  # ≥ 99 % of the 1000 ARC-E records found


# ---------------------------------------------------------------------------- the study
def _opts(tmp_path, study=None, scale=CPU, **kw) -> Options:
    s = study or get_study("ood")
    kw.setdefault("benchmarks", OOD_BENCHMARKS)
    return Options(study=s, scale=scale, out=tmp_path / "ood", config=scale.config, seeds=[0],
                   launcher="python", **kw)  # fmt: skip


def test_ood_grid_trains_on_seven_tasks_and_selects_on_id_benchmarks_only(tmp_path):
    """Each row is its own preset on the 7 tasks; at paper scale the checkpoint is chosen on the
    in-distribution benchmarks only (choosing on the held-out ones would leak them)."""
    study = get_study("ood")
    assert [r.name for r in study.rows] == ["himole", "himole-one-stage", "mixlora", "hydralora",
                                            "lora-r8", "hmora-lw"]  # fmt: skip
    assert [r.overrides["preset"] for r in study.rows] == ["himole", "himole_one_stage",
                                                            "mixlora", "hydralora", "lora_r8",
                                                            "hmora_lw"]  # fmt: skip
    rows = [r for r in study.rows if r.name in REGISTERED_ROWS.split(",")]
    for scale in (CPU, PAPER):
        for job in plan(_opts(tmp_path, scale=scale, benchmarks=scale.benchmarks), rows):
            d = job.run.data
            assert (d.kind, d.path, d.tasks) == ("offline", None, list(OOD_TRAIN_TASKS))
            assert job.run.hmora_config().preset == job.row.overrides["preset"]
            t = job.run.train
            if scale is PAPER:  # the paper's training, not the CPU recipe
                assert (t.max_steps, t.lr, t.router_lr_mult, d.max_records) == (
                    10000,
                    2e-5,
                    1.0,
                    None,
                )
                assert job.run.eval.kind == "benchmarks"
                assert job.run.eval.benchmarks == "arc_challenge,arc_easy,openbookqa"
            else:  # the learning recipe (routers that move in 40 steps), 1,000 records
                assert (t.max_steps, t.grad_accum, t.router_lr_mult) == (40, 2, 20.0)
                assert d.max_records == 1000
    opts = build_options(parse_args(["ood"]))
    assert (opts.benchmarks, opts.max_questions, opts.max_per_task, opts.analysis_data) == (
        "mmlu,arc-c,arc-e,obqa,swag,csqa", 100, 20, "benchmarks")  # fmt: skip
    assert build_options(parse_args(["ood", "--max-questions", "7"])).max_questions == 7
    assert build_options(parse_args(["ood", "--scale", "paper"])).benchmarks == "all"


def test_unregistered_preset_row_is_refused_in_one_line_not_a_crash(tmp_path):
    """A row whose preset no registered method ships (here a made-up one; in a checkout
    without HiMoLE, the himole rows) is shown and recorded as not run, with the reason."""
    base = get_study("ood")
    lora = next(r for r in base.rows if r.name == "lora-r8")
    ghost = Row("ghost", {"Method": "Ghost"}, {"preset": "no_such_preset"})
    opts = _opts(tmp_path, dataclasses.replace(base, rows=(ghost, lora)))
    jobs = plan(opts, [ghost, lora])
    assert jobs[0].run is None and jobs[1].run is not None and jobs[1].unsupported is None
    reason = jobs[0].unsupported
    assert reason.startswith("preset 'no_such_preset' is not registered in this checkout")
    assert "lora_r8" in reason and "\n" not in reason
    text = describe(opts, jobs)
    assert f"not run: {reason}" in text and "seed 0: not run" in text
    assert "out of distribution (tasks never trained): MMLU, SWAG (HellaSwag offline), Comm" in text
    record, worked = run_job(opts, jobs[0], None)
    assert not worked and record["status"] == rowio.UNSUPPORTED and record["error"] == reason
    assert rowio.read_row(jobs[0].dir)["status"] == rowio.UNSUPPORTED
    assert not (jobs[0].dir / "train").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--benchmarks", "mmlu,csqa"], "needs in- and out-of-distribution benchmarks; training "
         "on arc_easy, arc_challenge, openbookqa, piqa, social_iqa, boolq, winogrande gives ID: "
         "none, OOD: MMLU, Comm"),
        (["--set", "data.kind=local", "data.path=x.jsonl"],
         "maps offline task names to benchmarks; data.kind must be offline, got local"),
        (["--set", "data.tasks=[arc_easy, nope]"], "data.tasks: unknown offline task(s) 'nope'"),
    ],
)  # fmt: skip
def test_ood_study_one_line_errors(argv, message, tmp_path, capsys):
    rc = main(["ood", "--rows", "lora-r8", *argv, "--out", str(tmp_path / "o"), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


# ---------------------------------------------------------------------------- the table
def _results(tmp_path, name, seed, correct: dict[str, list[bool]]) -> dict:
    """A row record whose results.json holds per-question correctness (MMLU: subjects a, a, b)."""
    benches = {}
    for bench, flags in correct.items():
        res = {"status": "ok", "correct": {f"q{i}": c for i, c in enumerate(flags)}}
        if bench == "mmlu":
            res["subjects"] = {f"q{i}": "ab"[i // 2] for i in range(len(flags))}
        benches[bench] = res
    path = tmp_path / f"{name}{seed}.json"
    path.write_text(json.dumps({"benchmarks": benches}))
    return {"seed": seed, "tp_percent": 1.0, "stages": {"eval": {"results": str(path)}}}


def test_ood_table_accuracy_ci_and_paired_delta_match_hand_computations(tmp_path):
    """LoRA: ARC-E 2/4 right, MMLU macro (a: 1/2, b: 1/1) = 75 %. MixLoRA: ARC-E 3/4, MMLU the
    same answers. Accuracy CI: c = (1,1,0,0), s² = 1/3, Var = s²/4, 50 ± 1.96·28.87 = [-6.6,
    106.6]. Paired Δ: d = (0,0,1,0), s² = 1/4, Var = 1/16, +25 ± 1.96·25 = [-24.0, +74.0]; MMLU
    Δ 0 with no spread. Two seeds: the t interval over seeds (t₁ = 12.706)."""
    study = get_study("ood")
    rows = {r.name: r for r in study.rows}
    split = split_benchmarks(["arc_easy", "mmlu"], OOD_TRAIN_TASKS)
    lora = [_results(tmp_path, "lora", 0, {"arc_easy": [True, True, False, False],
                                           "mmlu": [True, False, True]})]  # fmt: skip
    mix = [_results(tmp_path, "mix", 0, {"arc_easy": [True, True, True, False],
                                         "mmlu": [True, False, True]})]  # fmt: skip
    table = [
        TableRow(rows["himole"], [], {0: "unsupported: preset 'himole' is not registered"}),
        TableRow(rows["mixlora"], mix, {}),
        TableRow(rows["lora-r8"], lora, {}),
    ]
    md = markdown(study, table, split, "setting")
    assert ("| Method | TP | ID (n = 4) | OOD (n = 3) | Δ ID vs LoRA r = 8 | Δ OOD vs LoRA r = 8 "
            "| Seeds |") in md  # fmt: skip
    assert "| MixLoRA | 1.00% | 75.0 [26.0, 124.0] | 75.0 [5.7, 144.3] " in md
    assert "| +25.0 [-24.0, +74.0] | +0.0 [+0.0, +0.0] | 0 |" in md
    assert "| LoRA r = 8 | 1.00% | 50.0 [-6.6, 106.6] | 75.0 [" in md
    assert "| (reference) | (reference) | 0 |" in md
    assert "| HiMoLE | — | — | — | — | — | — |" in md
    assert "- himole seed 0: unsupported: preset 'himole' is not registered" in md
    assert "| Method | ARC-E (ID, n = 4) | MMLU (OOD, n = 3) |" in md
    # MMLU macro: weights 1/4, 1/4, 1/2 on (1, 0, 1); s² = 1/3, Σw² = 3/8 → ± 1.96 · 0.3536.
    assert "| LoRA r = 8 | 50.0 [-6.6, 106.6] | 75.0 [5.7, 144.3] |" in md

    mix.append(_results(tmp_path, "mix", 1, {"arc_easy": [True, True, False, False],
                                             "mmlu": [True, False, True]}))  # fmt: skip
    lora.append(_results(tmp_path, "lora", 1, {"arc_easy": [True, True, False, False],
                                               "mmlu": [False, False, True]}))  # fmt: skip
    md = markdown(study, table, split, "setting")
    # ID over seeds (75, 50): mean 62.5, s = 17.68, h = 12.706 · 17.68 / √2 = 158.8.
    assert "| MixLoRA | 1.00% | 62.5 [-96.3, 221.3] |" in md
    # Δ ID per seed (+25, 0) → +12.5 ± 158.8; Δ OOD per seed (0, +25) → same spread.
    assert "| +12.5 [-146.3, +171.3] | +12.5 [-146.3, +171.3] | 0,1 |" in md


def test_ood_table_routing_per_task_adds_group_shares(tmp_path):
    """Per-task expert shares of the analysis, summed per group for grouped methods (HiMoLE's
    M experts per group): a wrong grouping would misreport which group a task uses."""
    study = get_study("ood")
    rows = {r.name: r for r in study.rows}
    split = split_benchmarks(["arc_easy", "mmlu"], OOD_TRAIN_TASKS)
    routing = tmp_path / "routing.json"
    tasks = {
        "mmlu": {"n": 3, "mep": None, "share": None,
                 "routing": {"token_balance": 0.5, "token_certainty": 0.25,
                             "token_load": [0.1, 0.2, 0.3, 0.4], "task_load": None}},
        "arc_easy": {"n": 3, "mep": [0, 1], "share": 0.5,
                     "routing": {"token_balance": 0.9, "token_certainty": 0.8,
                                 "token_load": [0.4, 0.3, 0.2, 0.1], "task_load": None}},
    }  # fmt: skip
    meta = {"per_task_routers": {"token": "layer29.gate_up.token", "task": None}}
    routing.write_text(json.dumps({"meta": meta, "tasks": tasks}))
    rec = _results(tmp_path, "mix", 0, {"arc_easy": [True], "mmlu": [True, False]})
    rec["stages"]["analyze"] = {"routing": str(routing)}
    md = markdown(study, [TableRow(rows["mixlora"], [rec], {})], split, "s", {"mixlora": 2})
    assert "of `layer29.gate_up.token` (the last token router) by groups of 2" in md
    assert "| ARC-E | ID | 3 | 0.800 | 0.900 | g0 70 · g1 30 | (0, 1) 50% |" in md
    assert "| MMLU | OOD | 3 | 0.250 | 0.500 | g1 70 · g0 30 | — |" in md
    rec["metrics"] = {"stand_in": {"mmlu": "a toy stand-in"}}
    md = markdown(study, [TableRow(rows["mixlora"], [rec], {})], split, "s")
    assert "| MMLU | OOD | 3 | 0.250 | 0.500 | e3 40 · e2 30 · e1 20 · e0 10 | — |" in md
    assert "| Method | ARC-E (ID, n = 1) | MMLU† (OOD, n = 2) |" in md
    assert "OOD: MMLU† (tasks never trained)" in md and "† MMLU: a toy stand-in." in md


def test_task_selection_changes_the_training_hash_only_when_set(tmp_path, monkeypatch):
    """A row trained on other tasks must never be reused; a row trained before data.tasks
    existed (the key at its default) must stay reusable: its hash is the one computed from a
    config without the two keys, as the runner did before they existed."""
    from hmora_ds.ablate.runner import _hashes
    from hmora_ds.train.config import RunConfig

    study = get_study("baselines")
    row = next(r for r in study.rows if r.name == "lora-r8")

    def train_hash(*sets: str) -> str:
        opts = _opts(tmp_path, study, benchmarks="all", sets=list(sets))
        return plan(opts, [row])[0].hashes["train"]

    plain = train_hash()
    assert train_hash("data.exclude_tasks=[]") == plain
    assert train_hash("data.tasks=[piqa, boolq]") != plain
    assert train_hash("data.exclude_tasks=[piqa]") != plain
    opts = _opts(tmp_path, study, benchmarks="all")
    job = plan(opts, [row])[0]
    data = job.run.to_dict()["data"]
    assert (data["tasks"], data["exclude_tasks"]) == (None, [])  # the keys exist, at defaults
    new = RunConfig.to_dict

    def before_the_keys(self):
        d = new(self)
        del d["data"]["tasks"], d["data"]["exclude_tasks"]
        return d

    monkeypatch.setattr(RunConfig, "to_dict", before_the_keys)
    ds_json = json.loads(opts.deepspeed.read_text())
    assert _hashes(opts, job.run, ds_json, 1)["train"] == plain


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_ood_study_end_to_end_on_the_tiny_model(tiny_run_inputs, tmp_path):
    """Two rows on the tiny model, one process: training sees only the selected tasks, both
    sides are evaluated, MixLoRA's routing is analysed per task, and the table pairs MixLoRA
    with LoRA per question."""
    import sys

    from tests._dist import run_command
    from tests._eval_helpers import toy_questions, write_local
    from tests._train_helpers import REPO

    mixture = tmp_path / "mixture"  # an offline build directory the runner reuses as is
    mixture.mkdir()
    lines = [json.loads(x) for x in (tiny_run_inputs / "data.jsonl").read_text().splitlines()]
    tasks = ("arc_easy", "piqa", "commonsense_qa")
    with (mixture / "data.jsonl").open("w") as f:
        for i, rec in enumerate(lines):
            f.write(json.dumps({**rec, "task_name": tasks[i % 3]}) + "\n")
    (mixture / "manifest.json").write_text(
        json.dumps({"kind": "offline", "max_per_task": 1000, "seed": 0})
    )
    bench = write_local(
        tmp_path / "bench",
        {
            "arc_easy": {"test": toy_questions(6)},
            "commonsense_qa": {"validation": toy_questions(8, "commonsense_qa")},
        },
    )
    out = tmp_path / "study"
    argv = ["ood", "--rows", "lora-r8,mixlora", "--launcher", "python", "--source",
            "local", "--local-dir", str(bench), "--benchmarks", "arc-e,csqa", "--max-questions",
            "0", "--out", str(out), "--stage-timeout", "200", "--set",
            f"model.name_or_path={tiny_run_inputs / 'model'}", "model.attn_implementation=eager",
            f"data.path={mixture}", "data.tasks=[arc_easy, piqa, commonsense_qa]",
            "data.exclude_tasks=[commonsense_qa]", "data.val_fraction=0.15",
            "data.max_input_tokens=48", "data.max_output_tokens=24", "train.max_steps=2",
            "train.grad_accum=1", "train.warmup_steps=1", "eval.every=2", "eval.batch_size=4",
            "checkpoint.every=2"]  # fmt: skip
    rc, log = run_command([sys.executable, "-m", "hmora_ds.ablate", *argv], 500, cwd=REPO)
    assert rc == 0, log[-4000:]
    train_log = (out / "mixlora" / "seed0" / "train.log").read_text()
    assert "records from 2 task(s) (arc_easy, piqa)" in train_log
    rec = rowio.read_row(out / "mixlora" / "seed0")
    n = rec["metrics"]["questions"]
    assert rec["status"] == "done" and set(n) == {"arc_easy", "commonsense_qa"}
    routing = json.loads(Path(rec["stages"]["analyze"]["routing"]).read_text())
    assert {t: v["n"] for t, v in routing["tasks"].items()} == n  # the evaluated questions
    assert all(sum(t["routing"]["token_load"]) == pytest.approx(1.0)
               for t in routing["tasks"].values())  # fmt: skip
    md = (out / "table.md").read_text()
    head = f"| Method | TP | ID (n = {n['arc_easy']}) | OOD (n = {n['commonsense_qa']}) |"
    assert head in md
    assert "ID: ARC-E (held-out questions of trained tasks). OOD: Comm (tasks never" in md
    mix = next(line for line in md.splitlines() if line.startswith("| MixLoRA |"))
    assert mix.count("[") == 4  # ID, OOD and both paired Δ have an interval
    assert "### Routing per task" in md and f"| ARC-E | ID | {n['arc_easy']} |" in md
