"""Argparse generated from a typed config dataclass: one source of truth for flags and help.

Each field becomes `--field-name`; its help is the comment written beside the field; booleans
that default to False are switches, those that default to True get a `--no-...` switch. Bad command
lines end in one `prog: error: ...` line and exit code 2 (argparse's usage block is left to --help).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the bad value (usage stays in --help)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


_SAYS_DEFAULT = re.compile(r"default:|\(default\b")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" unless the help already says what the default is, or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (_SAYS_DEFAULT.search(text) or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or isinstance(action, argparse._StoreFalseAction)):
            return text
        return f"{text} (default: %(default)s)"


def field_comments(cls) -> dict[str, str]:
    out = {}
    for klass in reversed(cls.__mro__[:-1]):  # base classes first: a subclass's comment wins
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in src.splitlines():
            line = line.strip()
            if "#" in line and ":" in line.split("#", 1)[0] and not line.startswith(("#", "def ", "raise", "if ",
                                                                                       "return")):
                name = line.split(":", 1)[0].strip()
                if name.isidentifier():
                    out[name] = line.split("#", 1)[1].strip()
    return out


def parser_for(cls, prog: str, description: str, required: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description=description, formatter_class=_DefaultsFormatter)
    helps = field_comments(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        text = helps.get(f.name, f.name.replace("_", " ")).replace("%", "%%")
        typ = str(f.type)
        if typ == "bool":  # both spellings, so a preset's choice can be undone (--no-gradient-checkpointing)
            off = "--no-" + f.name.replace("_", "-")
            if f.default:  # the first action's default is the field's
                p.add_argument(off, dest=f.name, action="store_false", help=f"turn off: {text}")
                p.add_argument(flag, dest=f.name, action="store_true", help=f"turn on (the default): {text}")
            else:
                p.add_argument(flag, action="store_true", help=text)
                p.add_argument(off, dest=f.name, action="store_false", help="turn off (e.g. a preset's choice)")
            continue
        conv = int if typ.startswith("int") else float if typ.startswith("float") else str
        is_req = f.name in required
        p.add_argument(flag, type=conv, required=is_req, help=text,
                       default=None if is_req or f.default is dataclasses.MISSING else f.default)
    return p


def config_from_args(cls, argv, prog: str, description: str, required: tuple[str, ...] = ()):
    return cls(**vars(parser_for(cls, prog, description, required).parse_args(argv)))


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(flag: str, value: str) -> None:
    """ValueError naming the flag unless `value` is auto | cpu | cuda | cuda:N."""
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise ValueError(f"{flag} {value!r}: use auto, cpu, cuda or cuda:N")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a CLI reports as one `error:` line (bad input, missing files, refused stores)."""
    from .data.errors import ClipDataError, DatasetLayoutError
    from .store import StoreError

    return (ValueError, OSError, StoreError, DatasetLayoutError, ClipDataError)
