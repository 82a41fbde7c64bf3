"""Local data files: schema, formats, and every bad-data case."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hmora_ds.data import DataError, iter_records, load_records
from hmora_ds.data.__main__ import main
from hmora_ds.data.records import DEFAULT_TASK, stable_id

GOOD = [
    {"source": "What is 2 + 2?", "target": "4", "task_name": "math"},
    {"source": "Capital of France?", "target": "Paris"},
]


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_jsonl_json_parquet_same_records(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    (tmp_path / "b.json").write_text(json.dumps(GOOD))
    (tmp_path / "c.json").write_text(json.dumps({"data": GOOD}))
    pq.write_table(pa.Table.from_pylist(GOOD), tmp_path / "d.parquet")
    expected = load_records(tmp_path / "a.jsonl")
    assert expected[0] == {
        "source": "What is 2 + 2?",
        "target": "4",
        "task_name": "math",
        "id": stable_id("math", "What is 2 + 2?", "4"),
    }
    assert expected[1]["task_name"] == DEFAULT_TASK
    for name in ("b.json", "c.json", "d.parquet"):
        assert load_records(tmp_path / name) == expected
    assert len(load_records(tmp_path)) == 8  # a directory of files


def test_optional_fields_and_ids_are_kept(tmp_path):
    rec = {
        "source": "s",
        "target": "t",
        "task_name": "x",
        "task_source": "P3",
        "template": "tpl",
        "id": 17,
        "extra": [1, 2],
    }
    (tmp_path / "a.jsonl").write_text(json.dumps(rec) + "\n")
    assert load_records(tmp_path / "a.jsonl") == [
        {
            "source": "s",
            "target": "t",
            "task_name": "x",
            "task_source": "P3",
            "template": "tpl",
            "id": "17",
        }
    ]


def test_bad_records_are_counted_and_skipped_with_one_warning(tmp_path, caplog):
    lines = [
        json.dumps(GOOD[0]).encode(),
        json.dumps({"source": "no target"}).encode(),  # line 2: missing field
        json.dumps({"source": "x", "target": "   "}).encode(),  # line 3: empty target
        json.dumps({"source": 5, "target": "y"}).encode(),  # line 4: non-string
        b'{"source": "broken", "target": ',  # line 5: invalid JSON
        b'{"source": "\xff\xfe", "target": "z"}',  # line 6: invalid UTF-8
        json.dumps({"source": "a", "target": "b", "task_name": 3}).encode(),  # line 7: non-string
        json.dumps(["not", "an", "object"]).encode(),  # line 8
        b"",  # blank lines are not records
        json.dumps(GOOD[1]).encode(),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    reports = []
    with caplog.at_level(logging.WARNING):
        recs = list(iter_records(path, reports))
    assert [r["target"] for r in recs] == ["4", "Paris"]
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    msg = warnings[0]
    assert str(path) in msg and "skipped 7 of 9" in msg
    assert "line 2: missing field 'target'" in msg and "line 3: empty target" in msg
    assert "line 4: non-string field 'source'" in msg and "line 5: invalid JSON" in msg
    assert "line 6: undecodable line" in msg and "+2 more" in msg
    assert reports[0].good == 2 and reports[0].bad == 7
    assert reports[0].reasons["non-string field 'task_name'"] == 1


def test_one_warning_per_file(tmp_path, caplog):
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text(
            json.dumps(GOOD[0]) + "\n" + json.dumps({"target": "t"}) + "\n"
        )
    with caplog.at_level(logging.WARNING):
        assert len(load_records(tmp_path)) == 2
    warnings = _warnings(caplog)
    assert len(warnings) == 2
    assert "a.jsonl" in warnings[0] and "line 2: missing field 'source'" in warnings[0]
    assert "b.jsonl" in warnings[1]


def test_parquet_nulls_and_wrong_types(tmp_path, caplog):
    rows = [GOOD[0], {"source": "q", "target": None}, {"source": "", "target": "t"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    with caplog.at_level(logging.WARNING):
        assert len(load_records(tmp_path / "p.parquet")) == 1
    (msg,) = _warnings(caplog)
    assert (
        "p.parquet" in msg
        and "row 2: missing field 'target'" in msg
        and "row 3: empty source" in msg
    )


def test_file_without_usable_record_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"source": "x"}) + "\n" + json.dumps({"source": "y", "target": ""}) + "\n"
    )
    with pytest.raises(DataError, match=r"bad\.jsonl: no usable record"):
        load_records(path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no usable record"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid UTF-8 JSON"):
        load_records(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(DataError, match="JSON array"):
        load_records(tmp_path / "y.json")
    (tmp_path / "z.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="Parquet"):
        load_records(tmp_path / "z.parquet")


def test_unknown_format_and_missing_path(tmp_path):
    (tmp_path / "data.csv").write_text("source,target\na,b\n")
    with pytest.raises(DataError, match="unknown data format"):
        load_records(tmp_path / "data.csv")
    with pytest.raises(DataError, match="no data file"):
        load_records(tmp_path)  # only a .csv inside
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(tmp_path / "missing.jsonl")


def test_cli_check(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD) + "{oops\n")
    assert main(["check", str(tmp_path / "a.jsonl")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["records"] == 2 and out["tasks"] == {"math": 1, DEFAULT_TASK: 1}
    assert next(iter(out["files"].values()))["bad"] == 1
    assert main(["check", str(tmp_path / "nope.jsonl")]) == 2
