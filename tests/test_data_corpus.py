"""Reading corpora: every format, the order of files, and the errors a user can run into."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmkit.data import Corpus, iter_texts
from slmkit.errors import InputError


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def test_plain_text_files_are_one_document_each(tmp_path):
    for name, text in [("a.txt", "alpha\nbeta\n"), ("b.md", "# Title\n"), ("c.rst", "Head\n====\n"), ("d.py", "x = 1\n")]:
        write(tmp_path / name, text)
    assert list(Corpus(tmp_path)) == ["alpha\nbeta\n", "# Title\n", "Head\n====\n", "x = 1\n"]


def test_jsonl_streams_one_document_per_line(tmp_path):
    lines = [json.dumps({"text": "first", "id": 1}), "", json.dumps({"text": "second"}), json.dumps({"text": ""})]
    path = write(tmp_path / "docs.jsonl", "\n".join(lines) + "\n")
    assert list(Corpus(path)) == ["first", "second"]  # blank lines and empty texts are not documents

    path = write(tmp_path / "other.jsonl", json.dumps({"body": "b1"}) + "\n" + json.dumps({"body": "b2"}) + "\n")
    assert list(Corpus(path, text_field="body")) == ["b1", "b2"]


def test_jsonl_is_read_lazily(tmp_path):
    path = write(tmp_path / "docs.jsonl", '{"text": "ok"}\nnot json\n')
    docs = iter(Corpus(path))
    assert next(docs) == "ok"  # the bad second line is not read yet
    with pytest.raises(InputError, match=r"docs\.jsonl:2: invalid JSON"):
        next(docs)


def test_jsonl_errors_name_the_line(tmp_path):
    path = write(tmp_path / "docs.jsonl", '{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(InputError, match=r"docs\.jsonl:2: no 'text' field.*--text-field"):
        list(Corpus(path))
    path = write(tmp_path / "num.jsonl", '{"text": 3}\n')
    with pytest.raises(InputError, match=r"num\.jsonl:1: field 'text' is int"):
        list(Corpus(path))


def test_csv_and_tsv_columns(tmp_path):
    path = write(tmp_path / "docs.csv", 'id,text\n1,hello\n2,"two\nlines, with comma"\n3,\n')
    assert list(Corpus(path)) == ["hello", "two\nlines, with comma"]

    path = write(tmp_path / "docs.tsv", "label\tmessage\nham\thi there\nspam\tWIN NOW\n")
    assert list(Corpus(path, text_field="message")) == ["hi there", "WIN NOW"]

    with pytest.raises(InputError, match=r"docs\.tsv has no column 'text' \(columns: label, message\)"):
        list(Corpus(path))


def test_byte_order_mark_is_dropped(tmp_path):
    path = write(tmp_path / "bom.csv", "\ufefftext\nvalue\n")
    assert list(Corpus(path)) == ["value"]
    path = write(tmp_path / "bom.txt", "\ufeffbody")
    assert list(Corpus(path)) == ["body"]


def test_directories_are_walked_recursively_in_sorted_order(tmp_path):
    write(tmp_path / "b" / "2.txt", "b2")
    write(tmp_path / "b" / "1.md", "b1")
    write(tmp_path / "a.jsonl", '{"text": "a"}\n')
    write(tmp_path / "c" / "d" / "deep.rst", "deep")
    write(tmp_path / "b.txt", "b.")
    write(tmp_path / "z.txt", "z")
    write(tmp_path / "image.png", "not text")
    write(tmp_path / "b" / "notes.docx", "skip me")
    write(tmp_path / ".git" / "HEAD.txt", "hidden")
    write(tmp_path / ".hidden.txt", "hidden")

    corpus = Corpus(tmp_path)
    assert list(corpus) == ["a", "b1", "b2", "b.", "deep", "z"]  # sorted by path components
    names = [f.path.relative_to(tmp_path).as_posix() for f in corpus.files]
    assert names == ["a.jsonl", "b/1.md", "b/2.txt", "b.txt", "c/d/deep.rst", "z.txt"]
    assert [f.documents for f in corpus.files] == [1] * 6
    assert [f.bytes for f in corpus.files] == [14, 2, 2, 2, 4, 1]
    assert sorted(p.name for p in corpus.skipped) == ["image.png", "notes.docx"]


def test_explicit_file_with_unknown_extension_is_plain_text(tmp_path):
    path = write(tmp_path / "SMSCollection", "ham\tline one\nspam\tline two\n")
    assert list(Corpus(path)) == ["ham\tline one\nspam\tline two\n"]


def test_paths_are_read_in_the_order_given(tmp_path):
    a, b = write(tmp_path / "a.txt", "A"), write(tmp_path / "b.txt", "B")
    assert list(iter_texts([b, a])) == ["B", "A"]
    assert list(iter_texts(str(a))) == ["A"]


@pytest.mark.parametrize(
    ("name", "content", "offset"),
    [
        ("bad.txt", b"caf\xc3\xa9 ok\n\xff\xfe", 9),
        ("bad.jsonl", b'{"text": "fine"}\n{"text": "x\x80y"}\n', 28),
        ("bad.csv", b"text\nok\nno\xe9\n", 10),
    ],
)
def test_undecodable_input_names_the_file_and_offset(tmp_path, name, content, offset):
    path = write(tmp_path / name, content)
    with pytest.raises(InputError, match=rf"{name} is not valid UTF-8 \(byte offset {offset}\).*errors='replace'"):
        list(Corpus(path))


def test_errors_replace_substitutes_undecodable_bytes(tmp_path):
    write(tmp_path / "bad.txt", b"caf\xe9")
    write(tmp_path / "bad.jsonl", b'{"text": "x\x80y"}\n')
    assert list(Corpus(tmp_path, errors="replace")) == ["x\ufffdy", "caf\ufffd"]
    with pytest.raises(InputError, match="errors must be one of strict, replace"):
        Corpus(tmp_path, errors="ignore")


def test_binary_file_is_rejected(tmp_path):
    path = write(tmp_path / "weights.txt", b"PK\x03\x04\x00\x00binary")
    with pytest.raises(InputError, match=r"weights\.txt looks binary"):
        list(Corpus(path))


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match=r"nope\.txt does not exist"):
        Corpus([tmp_path / "nope.txt"])


@pytest.mark.parametrize("files", [{}, {"only.bin": "x"}, {"empty.txt": ""}, {"blank.jsonl": "\n\n"}])
def test_empty_corpus(tmp_path, files):
    for name, content in files.items():
        write(tmp_path / name, content)
    with pytest.raises(InputError, match="no documents found in"):
        list(Corpus(tmp_path))
