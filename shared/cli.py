"""Argparse generated from a typed config dataclass: one source of truth for flags and help.

Each field becomes `--field-name`; its help is the comment written beside the field; booleans
that default to False are switches, those that default to True get a `--no-...` switch.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect


def field_comments(cls) -> dict[str, str]:
    out = {}
    for line in inspect.getsource(cls).splitlines():
        line = line.strip()
        if "#" in line and ":" in line.split("#", 1)[0] and not line.startswith(("#", "def ", "raise", "if ", "return")):
            name = line.split(":", 1)[0].strip()
            if name.isidentifier():
                out[name] = line.split("#", 1)[1].strip()
    return out


def parser_for(cls, prog: str, description: str, required: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = field_comments(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        text = helps.get(f.name, f.name.replace("_", " "))
        typ = str(f.type)
        if typ == "bool":
            if f.default:
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                               help=f"turn off: {text}")
            else:
                p.add_argument(flag, action="store_true", help=text)
            continue
        conv = int if typ.startswith("int") else float if typ.startswith("float") else str
        is_req = f.name in required
        p.add_argument(flag, type=conv, required=is_req, help=text,
                       default=None if is_req or f.default is dataclasses.MISSING else f.default)
    return p


def config_from_args(cls, argv, prog: str, description: str, required: tuple[str, ...] = ()):
    return cls(**vars(parser_for(cls, prog, description, required).parse_args(argv)))


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a CLI reports as one `error:` line (bad input, missing files, refused stores)."""
    from .data.errors import ClipDataError, DatasetLayoutError
    from .store import StoreError

    return (ValueError, OSError, StoreError, DatasetLayoutError, ClipDataError)
