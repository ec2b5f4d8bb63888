"""Command lines built from typed dataclasses: one field, one ``--flag``, its help the field's.

Every command states its flags as a frozen dataclass whose fields come from :func:`option`
(the one-line help, the choices, how the text is parsed); :func:`add_options` turns the class
into ``argparse`` arguments, and the class's ``__post_init__`` validates the values, raising the
command's own error with one line that names the flag and the fix. ``TrainConfig``
(core/config.py), ``CheckOptions`` (check/options.py) and the options of ``verify``, ``compare``
and ``bench`` are all parsed this way.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import field


def option(default, help: str, choices=None, type_=None, *, parse_choices: bool = False, group: str | None = None,
           **argparse_kwargs):
    """A dataclass field that is also a flag. ``choices`` are shown in the help (``{a,b}``) and checked
    by the class's ``__post_init__`` (or by argparse, with ``parse_choices``); ``type_`` parses the text
    (default: the default's type); ``group`` titles the block of ``--help`` it is listed in; the rest
    (``nargs``, ``metavar``, ``required``, ``positional``, ``action``) goes to ``add_argument``."""
    return field(default=default, metadata={"help": help, "choices": choices, "type": type_, "group": group,
                                            "parse_choices": parse_choices, "argparse": argparse_kwargs})


def whole_numbers(text: str) -> tuple[int, ...]:
    """``2,3`` or ``2`` (of ``2 3``): one command-line word of a list of whole numbers."""
    parts = text.replace(",", " ").split()
    if not parts or not all(p.isdigit() for p in parts):
        # argparse gives a list flag every word up to the next flag, a positional argument too
        hint = "; put the positional argument before the flag" if any(c in text for c in "/:.") else ""
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of whole numbers; write e.g. 2 3 or 2,3{hint}")
    return tuple(int(p) for p in parts)


class _Numbers(argparse.Action):
    """The words of ``--world-sizes 2 3`` or ``--world-sizes 2,3`` as one tuple, repeats dropped
    (of a :func:`names_option` too)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, tuple(dict.fromkeys(n for word in values for n in word)))


def numbers_option(default: tuple[int, ...], help: str, **kwargs):
    """A list of whole numbers, spaced or comma-separated, as every command's ``--world-sizes`` takes it."""
    return option(default, help, type_=whole_numbers, nargs="+", action=_Numbers, metavar="N", **kwargs)


def names_option(default: tuple[str, ...], help: str, choices: tuple[str, ...], **kwargs):
    """A list of names from ``choices``, spaced or comma-separated (``ddp zero`` or ``ddp,zero``)."""

    def names(text: str) -> tuple[str, ...]:
        parts = text.replace(",", " ").split()
        wrong = [p for p in parts if p not in choices] or ([] if parts else [text])
        if wrong:
            raise argparse.ArgumentTypeError(f"{wrong[0]!r} is not one of {', '.join(choices)}; write e.g. "
                                             f"{' '.join(choices)} or {','.join(choices)}")
        return tuple(parts)

    return option(default, help, choices, type_=names, nargs="+", action=_Numbers, **kwargs)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_named(cls, name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(cls)}[name]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag raises ``error_type`` (one line, printed once by the caller)."""

    def __init__(self, *args, error_type: type[Exception], **kwargs):
        super().__init__(*args, **kwargs)
        self.error_type = error_type

    def error(self, message: str):
        raise self.error_type(f"{message}; see --help")


def _shown(default, nargs) -> str:
    if isinstance(default, (tuple, list)):
        return (" " if nargs else ",").join(map(str, default))
    return str(default)


def add_options(parser: argparse.ArgumentParser, cls) -> argparse.ArgumentParser:
    """An argument per field of ``cls``, in field order, under its group's title (groups in the
    order they first appear); a field's help ends with its default, its metavar lists its choices.
    A bool is a switch: ``--name`` when it defaults to False, ``--no-name`` when True."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        meta, extra = f.metadata, dict(f.metadata["argparse"])
        title = meta.get("group")
        into = parser if title is None else groups.setdefault(title, parser.add_argument_group(title))
        if f.type in (bool, "bool"):
            off = f"--no-{f.name.replace('_', '-')}"
            into.add_argument(off if f.default else flag(f.name), dest=f.name, help=meta["help"],
                              action="store_false" if f.default else "store_true")
            continue
        name = f.name if extra.pop("positional", False) else flag(f.name)
        text = meta["help"]
        if f.default is not None and not extra.get("required") and name.startswith("--"):
            text += f" [default: {_shown(f.default, extra.get('nargs'))}]"
        if meta["choices"]:
            extra.setdefault("metavar", "{" + ",".join(meta["choices"]) + "}")
            if meta["parse_choices"]:
                extra["choices"] = meta["choices"]
        into.add_argument(name, type=meta["type"] or type(f.default), default=f.default, help=text, **extra)
    return parser


def parse_into(cls, parser: argparse.ArgumentParser, argv: list[str] | None):
    """``cls(**parsed)``: a list that ``nargs`` gave becomes the tuple a frozen field holds."""
    args = vars(parser.parse_args(argv))
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
