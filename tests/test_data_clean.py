"""Cleaning: each step removes exactly what it should, and the report counts it exactly."""

from __future__ import annotations

import sys

import pytest

from slmkit.data import CleanConfig, Cleaner
from slmkit.data.clean import nonalnum_ratio, repeated_line_ratio
from slmkit.errors import InputError, MissingExtraError

PROSE = (
    "Python's packaging story has improved a great deal over the years, and this document "
    "describes how source distributions, wheels and installers fit together today. It explains "
    "which metadata fields a build backend must write, how an installer resolves dependencies, "
    "and what a user should expect when two packages declare conflicting requirements."
)
TOPICS = ["wheels", "sdists", "entry points", "metadata", "build isolation", "lock files", "extras", "markers"]
LONG = PROSE + " " + " ".join(f"Section {i} covers {topic} and the rules that apply to it." for i, topic in enumerate(TOPICS * 4))


def clean(docs, **config):
    cleaner = Cleaner(CleanConfig(**config))
    return list(cleaner(docs)), cleaner.report


def test_nfc_composes_characters():
    kept, report = clean(["cafe\u0301 ok", "caf\u00e9 ok"], dedup="none")
    assert kept == ["caf\u00e9 ok", "caf\u00e9 ok"]
    assert report.steps["nfc"].modified == 1
    assert report.steps["nfc"].chars == 1
    assert report.steps["nfc"].documents == 0


def test_control_characters_are_stripped_but_newlines_and_tabs_kept():
    kept, report = clean(["a\x00b\x07c\x1b[0m\n\td\r\n\x7f\x85"], dedup="none", max_nonalnum_ratio=None)
    assert kept == ["abc[0m\n\td\r\n"]
    assert report.steps["control_chars"].chars == 5
    assert report.steps["control_chars"].modified == 1


def test_min_chars_ignores_surrounding_whitespace():
    kept, report = clean(["tiny", "   tiny    ", "long enough", "  \n\t "], min_chars=5)
    assert kept == ["long enough"]
    assert report.steps["min_chars"].documents == 3
    assert report.steps["min_chars"].chars == 4 + 11 + 5


def test_nonalnum_ratio_filter():
    assert nonalnum_ratio("ab !!") == 0.5  # whitespace does not count
    assert nonalnum_ratio("   ") == 0.0
    symbols = "#### ==== ---- **** |||| ~~~~ ab"
    kept, report = clean([PROSE, symbols, "def f(x): return x[0]"], max_nonalnum_ratio=0.3)
    assert kept == [PROSE, "def f(x): return x[0]"]
    assert report.steps["max_nonalnum_ratio"].documents == 1
    assert report.steps["max_nonalnum_ratio"].chars == len(symbols)


def test_repeated_line_filter():
    boilerplate = "Home | About | Contact\n" * 8 + "Some content here\n\n\n"
    assert repeated_line_ratio(boilerplate) == pytest.approx(7 / 9)
    assert repeated_line_ratio("one line") == 0.0
    kept, report = clean([boilerplate, PROSE], max_repeated_line_ratio=0.5)
    assert kept == [PROSE]
    assert report.steps["max_repeated_line_ratio"].documents == 1
    assert report.steps["max_repeated_line_ratio"].chars == len(boilerplate)


def test_exact_dedup_ignores_case_and_whitespace_and_keeps_the_first():
    variant = PROSE.upper().replace(" ", "  \n")
    other = PROSE + " One more sentence."
    kept, report = clean([PROSE, variant, other, PROSE], dedup="exact")
    assert kept == [PROSE, other]
    assert report.steps["exact_dedup"].documents == 2
    assert report.steps["exact_dedup"].chars == len(variant) + len(PROSE)

    kept, report = clean([PROSE, variant, PROSE], dedup="none")
    assert len(kept) == 3
    assert "exact_dedup" not in report.steps


def test_near_dedup_removes_a_lightly_edited_copy():
    edited = LONG.replace("great deal", "lot").replace("Section 20 covers", "Section 20 describes")
    different = PROSE.replace("Python's packaging", "The import system's")
    kept, report = clean([LONG, edited, different], dedup="near")
    assert kept == [LONG, different]
    assert report.steps["exact_dedup"].documents == 0
    assert report.steps["near_dedup"].documents == 1
    assert report.steps["near_dedup"].chars == len(edited)

    kept, _ = clean([LONG, edited, different], dedup="exact")
    assert kept == [LONG, edited, different]
    kept, _ = clean([LONG, edited], dedup="near", near_threshold=0.98)
    assert kept == [LONG, edited]


def test_near_dedup_needs_datasketch(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasketch", None)  # makes `import datasketch` fail
    with pytest.raises(MissingExtraError, match=r"pip install 'slmkit\[data\]'"):
        Cleaner(CleanConfig(dedup="near"))
    Cleaner(CleanConfig(dedup="exact"))  # only near dedup needs it


def test_report_totals_add_up():
    docs = ["cafe\u0301 " + PROSE, "x", PROSE, "caf\u00e9 " + PROSE.lower(), "!!!!!!!!", "ok\x00 fine text"]
    kept, report = clean(docs, min_chars=2)
    assert kept == ["caf\u00e9 " + PROSE, PROSE, "ok fine text"]
    assert (report.documents_in, report.documents_out) == (6, 3)
    assert report.chars_in == sum(map(len, docs))
    assert report.chars_out == sum(map(len, kept))
    assert report.chars_in - report.chars_out == sum(s.chars for s in report.steps.values())
    assert {name: s.documents for name, s in report.steps.items()} == {
        "nfc": 0, "control_chars": 0, "min_chars": 1, "max_nonalnum_ratio": 1, "max_repeated_line_ratio": 0, "exact_dedup": 1,
    }


def test_cleaning_is_streaming():
    def docs():
        yield PROSE
        raise RuntimeError("the second document was read too early")

    assert next(Cleaner()(docs())) == PROSE


def test_invalid_config():
    with pytest.raises(InputError, match="dedup must be one of none, exact, near"):
        CleanConfig(dedup="fuzzy")
    with pytest.raises(InputError, match="max_nonalnum_ratio must be in"):
        CleanConfig(max_nonalnum_ratio=1.5)
    for threshold in (0, 0.99):
        with pytest.raises(InputError, match=r"near_threshold must be in \(0, 0.98\]"):
            CleanConfig(near_threshold=threshold)
