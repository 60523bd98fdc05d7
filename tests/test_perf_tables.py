"""docs/PERFORMANCE.md's tables equal what bench/perf_tables.py renders from the committed bench files."""

from __future__ import annotations

import importlib.util
from decimal import Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("perf_tables", ROOT / "bench" / "perf_tables.py")
perf_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(perf_tables)


def test_committed_doc_matches_the_bench_files(capsys):
    rc = perf_tables.main(["--check"])
    assert rc == 0, "docs/PERFORMANCE.md is stale: run `python bench/perf_tables.py`\n" + capsys.readouterr().out


def test_check_reports_a_hand_edited_number(tmp_path, capsys):
    text = perf_tables.DOC.read_text()
    old = "| 4 cameras | 2,993 | 162 ms | 156 ms |"
    assert old in text
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(text.replace(old, "| 4 cameras | 2,993 | 161 ms | 156 ms |"))
    assert perf_tables.main(["--check", "--doc", str(doc)]) == 1
    out = capsys.readouterr().out
    assert "-| 4 cameras | 2,993 | 161 ms" in out and "+| 4 cameras | 2,993 | 162 ms" in out
    assert perf_tables.main(["--doc", str(doc)]) == 0  # rewrite in place, then it is current
    assert doc.read_text() == text


@pytest.mark.parametrize("region, error", [("no_such_table", "no renderer"), (None, "have no region")])
def test_regions_and_renderers_must_pair(tmp_path, region, error):
    text = perf_tables.DOC.read_text()
    if region:
        text += f"\n<!-- table: {region} -->\n<!-- /table -->\n"
    else:
        text = text.replace("<!-- table: prefill -->", "<!-- prefill -->")
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(text)
    with pytest.raises(SystemExit, match=error):
        perf_tables.main(["--check", "--doc", str(doc)])


@pytest.mark.parametrize("x, places, want", [
    ("1.155", 2, "1.16"),    # half: away from zero (binary round(1.155, 2) happens to agree)
    ("0.2445", 3, "0.245"),  # half: away from zero, where round(0.2445, 3) gives 0.244
    ("2.675", 2, "2.68"),    # round(2.675, 2) gives 2.67: the file's digits, not the binary float
    ("0.125", 2, "0.13"),    # not to even (banker's rounding would give 0.12)
    ("-0.125", 2, "-0.13"),  # away from zero on the negative side too
    ("0.36498215", 2, "0.36"),  # below half: down (the doc showed 0.37 for this field)
    ("1.1549296", 2, "1.15"),   # the doc showed 1.16
    ("0.0449999", 3, "0.045"),
    ("2993", 0, "2993"),
    ("0.1", 3, "0.100"),     # trailing zeros kept at the shown precision
])
def test_rounding_is_half_away_from_zero_on_decimal_digits(x, places, want):
    assert perf_tables.fmt(Decimal(x), places) == want


def test_rounding_of_floats_uses_their_shortest_repr():
    assert perf_tables.fmt(0.2445, 3) == "0.245" and round(0.2445, 3) == 0.244
    assert perf_tables.fmt(2993, 0, sep=True) == "2,993"


def test_load_keeps_the_files_digits():
    d = perf_tables.load("bench_cache_build_h200.json")
    assert d["4cam_prefill_B1_s_per_sample"] == Decimal("0.16215892800000375")
    assert perf_tables.span([Decimal("0.244"), Decimal("0.2449")], 2) == "0.24"
    assert perf_tables.span([Decimal("1.347"), Decimal("1.755")], 2) == "1.35-1.76"
