"""Turn a config dataclass into a typer command: one definition serves the CLI, the saved config
and the validation (the sparsify style). Help texts are the field docstrings."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
import typing
from collections.abc import Callable

import typer


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, by field name."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text: str) -> int:
    """A whole number written as 16384, 1e9, 2.5e6 or 100M (k, M, B/G, T: powers of 1000)."""
    s = str(text).strip().replace("_", "")
    scale = _SUFFIXES.get(s[-1:].lower(), 1) if s else 1
    try:
        value = float(s[:-1] if scale > 1 else s) * scale
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a count (e.g. 16384, 1e9, 100M)") from None
    if value != value or value in (float("inf"), float("-inf")) or value != int(value):
        raise typer.BadParameter(f"{text!r} is not a whole number")
    return int(value)


def _option(name: str, hint, default, doc: str, short: dict[str, str],
            flags: dict[str, str], count: bool = False) -> inspect.Parameter:
    flag = flags.get(name, name).replace("_", "-")
    names = [f"--{flag}/--no-{flag}" if hint is bool else f"--{flag}"]
    names += [short[name]] if name in short else []
    extra = {"parser": parse_count, "metavar": "COUNT"} if count else {}
    option = typer.Option(default, *names, help=doc, show_default=True, **extra)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=hint)


def command_from_dataclass(cls: type, run: Callable, skip: tuple[str, ...] = (),
                           short: dict[str, str] | None = None,
                           extra: tuple[inspect.Parameter, ...] = (),
                           nested: dict[str, list] | None = None,
                           arguments: tuple[str, ...] = (),
                           flags: dict[str, str] | None = None,
                           helps: dict[str, str] | None = None) -> Callable:
    """A function whose keyword parameters are typer options for every field of `cls` (plus
    `extra` ones); calling it builds `cls(**options)` and calls run(config, **extra_values).
    Fields without a default become required; fields in `arguments` are positional; `flags`
    renames a field's flag (layers: --layer); `helps` replaces help texts. A field named in
    `nested` is a dict shown as flat options, one per entry (objects with name, hint, default
    and doc), in the field's place. A field with metadata {"count": True} takes 1e9 or 100M."""
    hints = typing.get_type_hints(cls)
    docs = {**field_docs(cls), **(helps or {})}
    short, flags, nested = short or {}, flags or {}, nested or {}
    params = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if f.name in nested:
            params += [_option(s.name, s.hint, s.default, s.doc, short, flags)
                       for s in nested[f.name]]
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...
        if f.name in arguments:
            params.append(inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                default=typer.Argument(default, help=docs.get(f.name, ""))))
        else:
            params.append(_option(f.name, hints[f.name], default, docs.get(f.name, ""), short,
                                  flags, f.metadata.get("count", False)))

    names = {p.name for p in extra}

    def command(**kwargs):
        extras = {k: kwargs.pop(k) for k in names}
        for field, entries in nested.items():
            kwargs[field] = {s.name: kwargs.pop(s.name) for s in entries}
        return run(cls(**kwargs), **extras)

    command.__signature__ = inspect.Signature(params + list(extra))
    command.__name__ = run.__name__
    command.__doc__ = run.__doc__
    return command
