"""Dataclass configs as command lines: one dataclass per verb, YAML files, CLI overrides.

Each field of a verb's config dataclass becomes a flag (`max_tokens` -> `--max-tokens`), typed
and documented from `field(metadata={"help": ...})`. Values resolve in this order:

    dataclass defaults  <  --config FILE.yaml  <  flags given on the command line

Fields marked `metadata={"positional": True}` are positional arguments. Supported field types:
str, int, float, bool (`--x/--no-x`), Path, Literal[...] (choices), Optional[...] and
list[...]/tuple[...] of those (several values after one flag).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from ember.errors import EmberError

T = TypeVar("T")


class CLIConfigError(EmberError):
    """A config file or flag value that does not fit the verb's config."""


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _scalar(tp: Any, value: Any, name: str) -> Any:
    """Convert one value (a CLI string or a YAML scalar) to tp, with an error naming the field."""
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        if value not in choices:
            # Numbers given on the command line arrive as strings.
            converted = next((c for c in choices if str(c) == str(value)), None)
            if converted is None:
                raise CLIConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")
            return converted
        return value
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if tp is int and isinstance(value, str):
            return int(float(value)) if "e" in value.lower() else int(value)
        if tp in (int, float, str, Path):
            return tp(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int("1e999") goes through inf
        raise CLIConfigError(f"{name}: {value!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    return value


def convert(tp: Any, value: Any, name: str) -> Any:
    """Convert a value to a field's declared type (handles Optional and sequences)."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise CLIConfigError(f"{name}: a value is required")
    origin = get_origin(inner)
    if origin in (list, tuple):
        elem = get_args(inner)[0]
        items = value if isinstance(value, (list, tuple)) else [value]
        converted = [_scalar(elem, v, name) for v in items]
        return tuple(converted) if origin is tuple else converted
    return _scalar(inner, value, name)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(cls: type, prog: str, description: str | None = None) -> argparse.ArgumentParser:
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=prog, description=description or cls.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of field values (flags override it)")
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "")
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if has_default:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            help_text += f" (default: {default})" if help_text else f"default: {default}"
        kwargs: dict[str, Any] = {"help": help_text, "dest": f.name}
        if get_origin(tp) in (list, tuple):
            kwargs["nargs"] = "+"
            elem = get_args(tp)[0]
            if get_origin(elem) is Literal:
                kwargs["choices"] = get_args(elem)
        elif tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(tp) is Literal:
            kwargs["choices"] = get_args(tp)
            kwargs["type"] = _literal_parser(tp, f.name)
        if f.metadata.get("positional"):
            kwargs.pop("dest")
            if not has_default:
                parser.add_argument(f.name, metavar=f.name.upper(), **kwargs)
            else:
                parser.add_argument(f.name, metavar=f.name.upper(), nargs=kwargs.pop("nargs", "?"), **kwargs)
        else:
            parser.add_argument(_flag(f.name), **kwargs)
    return parser


def _literal_parser(tp: Any, name: str):
    """argparse's type= for a Literal: its error names the field and the choices (argparse would
    print "invalid <lambda> value" for a plain ValueError)."""
    def parse(text: str) -> Any:
        try:
            return convert(tp, text, name)
        except CLIConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CLIConfigError(f"config file {p} does not exist") from None
    except yaml.YAMLError as e:
        raise CLIConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CLIConfigError(f"config file {p} must hold a mapping of field: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def make_config(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build cls from a dict of raw values, converting types; unknown or missing fields are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise CLIConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(fields))}")
    kwargs = {k: convert(hints[k], v, k) for k, v in values.items()}
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise CLIConfigError(f"{source}: missing required value(s): "
                             + ", ".join(_flag(m) if not fields[m].metadata.get("positional") else m.upper()
                                         for m in missing))
    try:
        return cls(**kwargs)
    except EmberError:
        raise
    except ValueError as e:  # __post_init__ validation in the config class
        raise CLIConfigError(f"{source}: {e}") from None


def parse_config(cls: type[T], argv: list[str], prog: str, description: str | None = None) -> T:
    """Parse argv into an instance of the dataclass cls (defaults < YAML < flags)."""
    parser = build_parser(cls, prog, description)
    ns = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_file = ns.pop("config", None)
    if config_file:
        values.update(load_yaml(config_file))
    values.update({k: v for k, v in ns.items() if v is not None})
    return make_config(cls, values, source=prog)
