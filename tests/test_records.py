"""Record readers: CSV/TSV with and without header, JSONL, JSON lists; file:line errors; --skip-bad."""

from __future__ import annotations

import pytest

from slmkit.data.records import read_records, split_records
from slmkit.errors import InputError


def test_csv_with_header_and_quoted_commas(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text('text,label\n"hello, world",greeting\nbye,farewell\n', encoding="utf-8")
    records = read_records(f, ("text", "label"))
    assert [(r["text"], r["label"]) for r in records.items] == [("hello, world", "greeting"), ("bye", "farewell")]
    assert records.items[1]["_source"] == f"{f}:3"


def test_tsv_without_header_by_column_number(tmp_path):
    f = tmp_path / "sms"
    f.write_text('ham\tsay "hi" to mum\nspam\tWIN now\n', encoding="utf-8")
    records = read_records(f, ("1", "0"), fmt="tsv")
    assert [(r["0"], r["1"]) for r in records.items] == [("ham", 'say "hi" to mum'), ("spam", "WIN now")]


def test_unknown_field_names_the_columns(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text("text,label\nhi,x\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"no column named 'labels'"):
        read_records(f, ("text", "labels"))


def test_bad_tsv_row_reports_file_and_line_and_skip_bad_counts(tmp_path):
    f = tmp_path / "a.tsv"
    f.write_text("ham\tfine\nspam\ttoo\tmany\nham\tok\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{f}:2: expected 2 columns, got 3 \(pass --skip-bad"):
        read_records(f, ("0", "1"))
    records = read_records(f, ("0", "1"), skip_bad=True)
    assert len(records) == 2 and records.skipped == 1


def test_jsonl_invalid_line_and_missing_field(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "a", "label": "x"}\n{not json}\n\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{f}:2: invalid JSON"):
        read_records(f, ("text", "label"))
    records = read_records(f, ("text", "label"), skip_bad=True)
    assert records.skipped == 2
    assert "a.jsonl:4: missing field 'label'" in records.errors[1]


def test_json_list_reports_the_line_where_the_record_starts(tmp_path):
    f = tmp_path / "a.json"
    f.write_text('[\n  {"instruction": "a {b}", "output": "c"},\n  {\n    "instruction": "",\n    "output": "d"\n  }\n]\n')
    with pytest.raises(InputError, match=rf"^{f}:3: field 'instruction' is empty"):
        read_records(f, ("instruction", "output"))


def test_unknown_suffix_asks_for_format(tmp_path):
    f = tmp_path / "data.txt"
    f.write_text("x\n")
    with pytest.raises(InputError, match="pass --format"):
        read_records(f)


def test_split_is_deterministic_and_disjoint():
    items = list(range(100))
    a, b = split_records(items, 0.2, seed=3)
    assert (a, b) == split_records(items, 0.2, seed=3)
    assert len(b) == 20 and sorted(a + b) == items
    assert split_records(items, 0.2, seed=4)[1] != b
