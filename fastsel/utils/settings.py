"""Settings as dataclass fields: each field is one setting, with its type, default, help, ``--flag`` and JSON form.

A config dataclass declares a field with :func:`setting` (``lr: float = setting(2e-5, "peak learning rate")``);
:func:`add_setting_arguments` makes the command-line flags from those fields, :func:`values_from_args` reads them
back out of the parsed namespace, and :class:`JsonSettings` gives the dataclass ``to_json``/``from_json`` (unknown
keys refused, nested configs and tuples restored). Adding a setting is one line: the field.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import MISSING, Field, field, fields, is_dataclass
from typing import Any, Callable, Iterable, Mapping

__all__ = ["setting", "flag_of", "add_setting_arguments", "values_from_args", "needs_of", "check_needs",
           "differs_from_default", "JsonSettings", "comma_list", "comma_ints", "hints_of"]


def setting(default: Any = MISSING, help: str | Callable[[], str] = "", *, default_factory: Any = MISSING,
            flag: str | None = None, choices: Iterable | None = None, type: Callable | None = None,
            metavar: str | None = None, needs: str | None = None, cli: bool = True, shown: str | None = None,
            required: bool = False) -> Any:
    """A dataclass field that is a user setting.

    ``help``: the ``--help`` text (a function returning it when it lists a registry filled later); ``flag``: the
    option string (default ``--`` + the field name with dashes; a bool field whose default is True and whose flag
    starts with ``--no-`` is a switch that turns it off); ``type``: converts the command-line text (default: the
    default's type); ``needs``: the flag without which this one means nothing (the parser then has no default for
    it, so that a value given alone can be refused, and the field default is shown in the help); ``cli=False``: no
    flag (set by code); ``shown``: the default as ``--help`` shows it; ``required``: the flag must be given.
    """
    metadata = {"help": help, "flag": flag, "choices": tuple(choices) if choices is not None else None, "type": type,
                "metavar": metavar, "needs": needs, "cli": cli, "shown": shown, "required": required}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_of(f: Field) -> str:
    """The option string of a settings field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _is_setting(f: Field) -> bool:
    return bool(f.metadata) and f.metadata.get("cli", True) and "help" in f.metadata


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return MISSING


def _help(f: Field) -> str:
    text = f.metadata.get("help") or ""
    return text() if callable(text) else text


def add_setting_arguments(parser: Any, cls: type, *, only: Iterable[str] | None = None, skip: Iterable[str] = (),
                          taken: set[str] | None = None, defaults: Mapping[str, Any] | None = None,
                          required: Iterable[str] = ()) -> None:
    """One flag per settings field of the dataclass ``cls`` on ``parser`` (a parser or an argument group).

    ``only``/``skip``: field names to add or leave out; ``taken``: option strings already on the parser (skipped,
    and the new ones added to it: metrics share ``--pooling``); ``defaults``: parser defaults other than the field
    defaults (a command whose default differs, shown in its help); ``required``: fields whose flag must be given.
    """
    wanted = set(only) if only is not None else None
    skipped = set(skip)
    overrides = dict(defaults or {})
    must = set(required)
    for f in fields(cls):
        if not _is_setting(f) or f.name in skipped or (wanted is not None and f.name not in wanted):
            continue
        flag = flag_of(f)
        if taken is not None:
            if flag in taken:
                continue
            taken.add(flag)
        md = f.metadata
        default = overrides.get(f.name, _default(f))
        text = _help(f)
        kw: dict[str, Any] = {"dest": f.name}
        if md.get("required") or f.name in must:
            kw["required"] = True
        elif md.get("needs"):  # no parser default: given or absent is what the needs check reads
            kw["default"] = argparse.SUPPRESS
            text = f"{md['needs']}: {text} (default: {md.get('shown') or default})"
        else:
            kw["default"] = default
            if md.get("shown"):
                kw["default"] = md["shown"] if md.get("type") else default
        if isinstance(default, bool):
            if default and flag.startswith("--no-"):  # "%(default).0s": not "(default: True)" under a switch that turns off
                parser.add_argument(flag, action="store_false", help=text + " (default: off)%(default).0s", **kw)
            elif default:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text, **kw)
            else:
                parser.add_argument(flag, action="store_true", help=text, **kw)
            continue
        for key in ("choices", "metavar"):
            if md.get(key) is not None:
                kw[key] = md[key]
        conv = md.get("type") or (hints_of(cls, f) if default is None or default is MISSING else type(default))
        if conv is not None and conv is not tuple:
            kw["type"] = conv
        parser.add_argument(flag, help=text, **kw)


def hints_of(cls: type, f: Field) -> Callable | None:
    """The command-line type of a field whose default is None: the first of int, float, str in its annotation."""
    hint = typing.get_type_hints(cls).get(f.name)
    for candidate in (int, float, str):
        if hint is candidate or candidate in typing.get_args(hint):
            return candidate
    return None


def values_from_args(cls: type, args: argparse.Namespace, *, only: Iterable[str] | None = None,
                     skip: Iterable[str] = ()) -> dict[str, Any]:
    """{field: value} of the settings fields of ``cls`` found in the parsed ``args`` (a flag with ``needs`` that was
    not given is absent, so the field keeps its default)."""
    wanted = set(only) if only is not None else None
    skipped = set(skip)
    return {f.name: getattr(args, f.name) for f in fields(cls)
            if _is_setting(f) and f.name not in skipped and (wanted is None or f.name in wanted) and hasattr(args, f.name)}


def differs_from_default(obj: Any, name: str) -> bool:
    """Whether the settings field ``name`` of the dataclass instance ``obj`` holds another value than its default."""
    f = obj.__dataclass_fields__[name]
    return getattr(obj, name) != _default(f)


def needs_of(*classes: type) -> list[tuple[str, str, str]]:
    """(flag, field, the flag it needs) of every settings field that only applies with another flag."""
    return [(flag_of(f), f.name, f.metadata["needs"]) for cls in classes for f in fields(cls)
            if _is_setting(f) and f.metadata.get("needs")]


def check_needs(args: argparse.Namespace, *classes: type) -> None:
    """One-line ValueError for a flag given without the flag it needs (it would be ignored); the needed flag is a
    settings field of one of ``classes``, given when its value in ``args`` is truthy."""
    by_flag = {flag_of(f): f.name for cls in classes for f in fields(cls) if _is_setting(f)}
    for flag, dest, needs in needs_of(*classes):
        if hasattr(args, dest) and not getattr(args, by_flag.get(needs, ""), None):
            raise ValueError(f"fastsel: {flag} only applies with {needs}; add {needs}, or leave {flag} out")


def comma_list(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"a, b"`` -> ``("a", "b")`` (empty items dropped); a sequence passes through as a tuple."""
    items = text.split(",") if isinstance(text, str) else text
    return tuple(s.strip() for s in items if str(s).strip())


def comma_ints(text: str | Iterable[int]) -> tuple[int, ...]:
    """``"1,3"`` -> ``(1, 3)``; ValueError (argparse: a one-line usage error) for anything else."""
    items = text.split(",") if isinstance(text, str) else text
    return tuple(int(s) for s in items if str(s).strip())


comma_ints.__name__ = "comma-separated integers"  # argparse names the type in its error line


class JsonSettings:
    """JSON round trip for a settings dataclass: ``to_dict``/``to_json``, ``from_dict``/``from_json`` (unknown keys
    are a one-line ValueError; nested settings dataclasses and tuple fields are restored from their JSON form)."""

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        if not isinstance(data, Mapping):
            raise ValueError(f"fastsel: {cls.__name__} must be a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - set(known)
        if unknown:
            raise ValueError(f"fastsel: unknown {cls.__name__} keys {sorted(unknown)}")
        hints = typing.get_type_hints(cls)
        values = {}
        for name, value in data.items():
            hint = hints.get(name)
            if isinstance(hint, type) and is_dataclass(hint) and issubclass(hint, JsonSettings) and isinstance(value, Mapping):
                value = hint.from_dict(value)
            elif isinstance(value, list) and _is_tuple(hint):
                value = tuple(value)
            values[name] = value
        return cls(**values)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


def _is_tuple(hint: Any) -> bool:
    if hint is tuple or typing.get_origin(hint) is tuple:
        return True
    return any(_is_tuple(a) for a in typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, _UnionType) else False


_UnionType = type(int | None)


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (what JSON writes), so that ``to_dict`` equals ``json.loads(to_json())``."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
