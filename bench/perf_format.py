"""What the perf-table renderers share: the registry, the bench-file loader, rounding and markdown."""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
DOC = DOCS / "PERFORMANCE.md"
REGION = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)
RENDERERS: dict[str, Callable[[], str]] = {}


def renderer(name: str):
    def register(fn):
        RENDERERS[name] = fn
        return fn
    return register


def load(name: str) -> dict:
    """A bench JSON from docs/, floats as Decimal (the file's own digits)."""
    return json.loads((DOCS / name).read_text(), parse_float=Decimal, parse_int=Decimal)


def fmt(x, places: int, sep: bool = False) -> str:
    """x rounded half away from zero to `places` decimals; `sep`: thousands separators (2,993)."""
    d = (x if isinstance(x, Decimal) else Decimal(str(x))).quantize(Decimal(1).scaleb(-places), ROUND_HALF_UP)
    return f"{d:,}" if sep else f"{d}"


def span(values, places: int) -> str:
    """'a-b' over values at the shown precision (one value when they round alike)."""
    lo, hi = fmt(min(values), places), fmt(max(values), places)
    return lo if lo == hi else f"{lo}-{hi}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "".join("| " + " | ".join(r) + " |\n" for r in lines) + "\n"  # blank line: the table ends before -->


def prose(text: str) -> str:
    """A generated sentence, wrapped like the doc's hand-written prose."""
    return textwrap.fill(text, 104, break_long_words=False, break_on_hyphens=False) + "\n"
