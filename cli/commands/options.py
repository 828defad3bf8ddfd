"""Pieces the command modules share: parameter types and callbacks, and options built from the
config dataclasses of :mod:`saereg.training.config`.

:func:`config_options` turns each field of a config class into a click option: the flag is
``--field-name``, the type and the default come from the field, the help from the docstring
under it. A per-command table lists the few fields that differ (another flag, a comma-separated
sweep, a count written as ``1M``, a repeated option) or that get no option at all. Each option
remembers its field, so that :func:`flag_for` finds the flag that sets a field named by a
:class:`saereg.registry.errors.ConfigError`.

Only click and light saereg modules are imported here.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import click

from saereg.training.fields import format_count, parse_count

_CONTEXT_KEY = "saereg.command_context"
_UNSET: Any = object()


def kv_pairs(_ctx, _param, values) -> dict[str, str]:
    """Click callback: repeated KEY=VALUE options -> a dict."""
    out = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        out[key] = value
    return out


class Count(click.ParamType):
    """A count written for people: 4096, 200k, 1.5M (see saereg.training.fields.parse_count)."""

    name = "count"

    def __init__(self, minimum: int | None = None):
        self.minimum = minimum

    def convert(self, value, param, ctx):
        try:
            n = parse_count(value)
        except ValueError:
            self.fail(f"{value!r} is not a count (examples: 4096, 200k, 1.5M)", param, ctx)
        if self.minimum is not None and n < self.minimum:
            self.fail(f"{value} must be at least {self.minimum}", param, ctx)
        return n


def comma_list(item: type = str) -> Callable:
    """Click callback: 'a,b,c' -> a list (of ints, counts allowed, when ``item`` is int; of
    floats when it is float)."""
    def convert(_ctx, _param, value):
        if value is None:
            return None
        parts = [v.strip() for v in str(value).split(",") if v.strip()]
        if item is int:
            try:
                parts = [parse_count(v) for v in parts]
            except ValueError:
                raise click.BadParameter(f"{value!r} is not a comma-separated list of integers")
        elif item is float:
            try:
                parts = [float(v) for v in parts]
            except ValueError:
                raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers")
        if not parts:
            raise click.BadParameter(f"{value!r} holds no value")
        return parts
    return convert


# -- options from config dataclasses ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Opt:
    """How one config field differs on the command line; unset attributes keep the defaults."""

    flag: str | None = None
    """The option, when it is not --field-name."""
    dest: str | None = None
    """The command's parameter name, when it is not the field name."""
    type: Any = None
    """A click type in place of the field's."""
    count: bool = False
    """Accept counts written for people (200k, 1.5M); the default is shown that way too."""
    sweep: bool = False
    """Comma-separated values, each training its own SAE (the parameter is a list)."""
    multiple: bool = False
    """Repeat the option for several values (the parameter is a tuple)."""
    default: Any = _UNSET
    """A default in place of the field's (a field without one makes the option required)."""


class FieldOption(click.Option):
    """An option that sets a config field; ``field`` names it."""

    def __init__(self, *args, field: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.field = field

    def handle_parse_result(self, ctx, opts, args):
        ctx.meta[_CONTEXT_KEY] = ctx  # the command whose options set config fields
        return super().handle_parse_result(ctx, opts, args)


def command_context(ctx: click.Context) -> click.Context:
    """The context of the command that ran under the group context ``ctx``: the one that set
    config fields from its options, else one for the sub-command ``ctx`` invoked (else
    ``ctx``)."""
    if _CONTEXT_KEY in ctx.meta:
        return ctx.meta[_CONTEXT_KEY]
    name = ctx.invoked_subcommand
    group = ctx.command if isinstance(ctx.command, click.Group) else None
    command = group.get_command(ctx, name) if group and name else None
    return click.Context(command, info_name=name, parent=ctx) if command else ctx


def flag_for(command: click.Command, field: str) -> str | None:
    """The option of ``command`` that sets ``field`` (a FieldOption first, then an option of
    that name)."""
    options = [p for p in command.params if isinstance(p, click.Option)]
    for p in options:
        if getattr(p, "field", None) == field:
            return p.opts[0]
    return next((p.opts[0] for p in options if p.name == field), None)


@functools.cache
def _module_tree(module: str) -> ast.Module:
    return ast.parse(inspect.getsource(sys.modules[module]))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of the dataclass ``cls`` (read from its source), with
    whitespace collapsed and reST literals unquoted: {field: help}."""
    node = next(n for n in ast.walk(_module_tree(cls.__module__))
                if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    docs = {}
    for stmt, after in zip(node.body, node.body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = " ".join(after.value.value.replace("``", "").split())
    return docs


def _base_type(hint: Any) -> Any:
    """``X | None`` -> X."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


_SCALARS = {int: click.INT, float: click.FLOAT, str: click.STRING}


def _field_option(cls: type, f: dataclasses.Field, hint: Any, doc: str | None, opt: Opt):
    name = f.name
    if not doc:
        raise TypeError(f"{cls.__name__}.{name} has no docstring to use as its option's help")
    base = _base_type(hint)
    default = opt.default
    if default is _UNSET:
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
    attrs: dict[str, Any] = {"help": doc, "show_default": True}
    origin = typing.get_origin(base)
    if base is bool:
        attrs.update(is_flag=True, default=bool(default) if default is not _UNSET else False)
        if attrs["default"]:
            raise TypeError(f"{cls.__name__}.{name} defaults to True: give it a --no- option")
    elif opt.sweep or (origin is list and not opt.multiple):
        item = typing.get_args(base)[0] if origin is list else base
        if item not in (int, float, str):
            raise TypeError(f"{cls.__name__}.{name}: no comma-separated form for {item}")
        metavar = {int: "INT,...", float: "FLOAT,...", str: "TEXT,..."}[item]
        attrs.update(callback=comma_list(item), metavar=metavar)
        if opt.sweep:
            attrs["help"] = f"{doc} Comma-separated values train one SAE each."
        else:
            attrs["help"] = f"{doc} Comma-separated."
        if default is not _UNSET and default is not None:
            values = default if isinstance(default, (list, tuple)) else [default]
            default = ",".join(str(v) for v in values)
    elif origin is tuple:
        items = typing.get_args(base)
        if not items or Ellipsis in items or any(i not in _SCALARS for i in items):
            raise TypeError(f"{cls.__name__}.{name}: no option form for {base}")
        attrs["type"] = click.Tuple([_SCALARS[i] for i in items])
    elif opt.multiple:
        item = typing.get_args(base)[0] if origin in (list, tuple) else base
        attrs.update(multiple=True, type=_SCALARS[item])
        attrs["help"] = f"{doc} Repeat for several."
    elif opt.count:
        attrs["type"] = Count()
        if isinstance(default, int):
            default = format_count(default)  # shown as 1M; Count reads it back exactly
    elif base in _SCALARS:
        attrs["type"] = _SCALARS[base]
    elif opt.type is None:
        raise TypeError(f"{cls.__name__}.{name}: no option form for {base}; add it to the table")
    if opt.type is not None:
        attrs["type"] = opt.type
    if "is_flag" not in attrs:
        if default is _UNSET:
            attrs["required"] = True
        else:
            attrs["default"] = default
    flag = opt.flag or "--" + name.replace("_", "-")
    return click.option(flag, opt.dest or name, cls=FieldOption, field=name, **attrs)


def config_options(*classes: type, table: Mapping[str, Opt | None]) -> Callable:
    """A decorator adding one option per field of ``classes``, in field order. ``table`` maps
    a field to how its option differs (:class:`Opt`), or to None for no option. A field that
    several classes share becomes one option that sets all of them; its help comes from the
    last of them. A field whose type has no option form must be in the table."""
    entries: dict[str, tuple[type, dataclasses.Field, Any]] = {}
    docs: dict[str, str] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        own = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in table and table[f.name] is None:
                continue
            entries.setdefault(f.name, (cls, f, hints[f.name]))
            docs[f.name] = own.get(f.name) or docs.get(f.name, "")
    unknown = set(table) - {f.name for cls in classes for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"the options table names no field of {classes}: {sorted(unknown)}")
    decorators = [_field_option(cls, f, hint, docs[name], table.get(name) or Opt())
                  for name, (cls, f, hint) in entries.items()]

    def decorate(fn):
        for d in reversed(decorators):
            fn = d(fn)
        return fn
    return decorate


def fields_of(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` (a command's parameters) that are fields of ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}
