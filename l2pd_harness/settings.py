"""Where decode settings come from, for every front end (the CLI, the lm-eval model, benchmarks, regression,
filter training).

:func:`decode_setup` is the one place that turns settings into ``(DecodeConfig, policy)``; command-line options
(:func:`add_config_options`) and lm-eval ``model_args`` are generated from the config's fields, their types and
their docstrings, and every text value is converted by the one :func:`coerce`. A knob added as a field of
:class:`DecodeConfig` therefore appears in ``l2pd generate --help`` and in ``--model_args`` with no other change.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import os
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, fields, replace
from functools import cache

from l2pd_harness.decoding.config import CHOICES, DEFAULT_THRESHOLD, PRESETS, DecodeConfig
from l2pd_harness.decoding.policies import POLICIES, Policy

if typing.TYPE_CHECKING:
    from l2pd_harness.filter.model import FilterCard

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class SettingsError(ValueError):
    """A setting with a bad name or value; the message names it and what is allowed."""


def field_kinds(cls: type) -> dict[str, tuple[type, bool]]:
    """``name -> (kind, optional)`` of every field of the dataclass ``cls`` (kind: int, float, bool or str)."""
    hints = typing.get_type_hints(cls)
    kinds = {}
    for f in fields(cls):
        args = typing.get_args(hints[f.name])
        optional = isinstance(hints[f.name], types.UnionType) and type(None) in args
        kind = next(a for a in args if a is not type(None)) if optional else hints[f.name]
        kinds[f.name] = (kind, optional)
    return kinds


def coerce(name: str, value, kind: type, optional: bool = False):
    """``value`` (text from a command line or ``model_args``, or already typed) as ``kind``; ``none`` is ``None``
    for an optional setting. Integers may come as ``64.0`` (lm-eval passes numbers through float)."""
    if value is None or (optional and isinstance(value, str) and value.lower() == "none"):
        if optional:
            return None
        raise SettingsError(f"{name}={value!r}: a value is required")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in TRUE + FALSE:
            return str(value).lower() in TRUE
        raise SettingsError(f"{name}={value!r} is not a boolean (use one of {list(TRUE + FALSE)})")
    if kind is int:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or not number.is_integer() or isinstance(value, bool):
            raise SettingsError(f"{name}={value!r} is not an integer")
        return int(number)
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{name}={value!r} is not a number") from None
    return str(value)


def coerce_fields(cls: type, values: Mapping[str, object]) -> dict:
    """``values`` checked against the fields of ``cls`` (an unknown name lists the known ones) and coerced."""
    kinds = field_kinds(cls)
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise SettingsError(f"unknown settings {unknown}; known: {sorted(kinds)}")
    return {name: coerce(name, value, *kinds[name]) for name, value in values.items()}


def make_config(values: Mapping[str, object], cls: type[DecodeConfig] = DecodeConfig) -> DecodeConfig:
    """A checked config from ``values`` (text or typed); the only place a :class:`DecodeConfig` is built. A
    ``preset`` supplies the settings ``values`` does not give."""
    typed = coerce_fields(cls, values)
    try:
        return cls(**{**PRESETS.get(typed.get("preset"), {}), **typed})
    except ValueError as err:
        raise SettingsError(str(err)) from None


def decode_setup(values: Mapping[str, object], pretrained: str | os.PathLike | None = None,
                 cls: type[DecodeConfig] = DecodeConfig) -> tuple[DecodeConfig, Policy]:
    """``(cfg, policy)`` for the settings ``values`` on the model ``pretrained`` (``None``: the shipped tiny model).

    A policy that reads a filter gets the one ``cfg.filter`` names (default: the shipped one), checked against the
    model and block length, and the settings left to the filter take its card's values (:func:`card_defaults`).
    """
    cfg = make_config(values, cls)
    if not POLICIES[cfg.policy].needs_filter:
        return cfg, POLICIES[cfg.policy].build(cfg, None)
    from l2pd_harness.filter.model import load_filter

    learned = load_filter(cfg.filter, pretrained, cfg.block_length)
    try:
        cfg = replace(cfg, **card_defaults(cfg, learned.card))
    except ValueError as err:
        raise SettingsError(str(err)) from None
    return cfg, POLICIES[cfg.policy].build(cfg, learned)


def decode_identity(values: Mapping[str, object], pretrained: str | os.PathLike | None = None,
                    cls: type[DecodeConfig] = DecodeConfig) -> dict:
    """What decides the outputs of a decode with the settings ``values`` on the model ``pretrained``: the model's
    fingerprint, its filter's (``None`` for a policy without one) and :func:`output_settings` of the config as
    decoded (the filter card's defaults filled in). Raises what :func:`decode_setup` raises."""
    from l2pd_harness.filter.model import filter_fingerprint, filter_path  # both import this module
    from l2pd_harness.loading import model_fingerprint, resolve_checkpoint

    model = model_fingerprint(resolve_checkpoint(pretrained))
    cfg, _ = decode_setup(values, pretrained, cls)
    filter_id = filter_fingerprint(filter_path(cfg.filter, pretrained)) if POLICIES[cfg.policy].needs_filter else None
    return {"model": model, "filter": filter_id, "settings": output_settings(cfg)}


def output_settings(cfg: DecodeConfig) -> dict:
    """``cfg``'s fields but the batch size, which does not change outputs."""
    return {k: v for k, v in asdict(cfg).items() if k != "batch_size"}


def setting_differences(recorded: dict, current: dict) -> list[str]:
    """``key: recorded -> current`` for every setting whose value differs or that only one of them has."""

    def shown(config: dict, key: str) -> str:
        return repr(config[key]) if key in config else "absent"

    keys = sorted(recorded.keys() | current.keys())
    return [f"{key}: {shown(recorded, key)} -> {shown(current, key)}" for key in keys
            if key not in recorded or key not in current or recorded[key] != current[key]]


def card_defaults(cfg: DecodeConfig, card: FilterCard) -> dict:
    """The settings ``cfg`` leaves to its filter, from the filter's card: the accept threshold chosen on
    validation problems and, when ``learned_commit`` is not given, the way the filter was trained to decode
    (``training.decode_with``: learned_commit, the threshold beside it unless ``cfg`` names one, candidates)."""
    serving = card.training.get("decode_with", {}) if cfg.learned_commit is None else {}
    if not isinstance(serving, dict):
        raise SettingsError(f"the filter card's training.decode_with={serving!r} must be a JSON object")
    return {"accept_threshold": card.accept_threshold if cfg.accept_threshold is None else cfg.accept_threshold,
            "learned_commit": serving.get("learned_commit", cfg.learned_commit or "accepted"),
            "threshold": serving.get("threshold", DEFAULT_THRESHOLD) if cfg.threshold is None else cfg.threshold,
            "learned_candidates": serving.get("learned_candidates") if cfg.learned_candidates is None
            else cfg.learned_candidates}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass and of its dataclass bases (the one description of a setting,
    used as ``--help``)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):  # a class without source (built-in) documents nothing
            continue
        docs.update({node.target.id: " ".join(after.value.value.split())
                     for node, after in zip(body, body[1:], strict=False)
                     if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                     and isinstance(after.value, ast.Constant)})
    return docs


def argument_type(name: str, kind: type, optional: bool = False, positive: bool = False, unit: bool = False):
    """An argparse ``type`` that converts with :func:`coerce` (``positive``: also refuse numbers <= 0; ``unit``: also
    refuse numbers outside [0, 1])."""

    def convert(text: str):
        try:
            value = coerce(name, text, kind, optional)
        except SettingsError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        if positive and value is not None and value <= 0:
            raise argparse.ArgumentTypeError(f"{name}={value} must be positive")
        if unit and value is not None and not 0 <= value <= 1:
            raise argparse.ArgumentTypeError(f"{name}={value} must be in [0, 1]")
        return value

    convert.__name__ = kind.__name__
    return convert


def add_config_options(parser: argparse.ArgumentParser, cls: type, names: tuple[str, ...] | None = None,
                       defaults: Mapping[str, object] | None = None, given_only: bool = False) -> None:
    """One ``--option`` per field of the dataclass ``cls`` (``names``: a subset), typed by its annotation, help from
    its docstring, choices from :data:`CHOICES`, booleans as ``--x/--no-x``. ``defaults`` overrides the field
    defaults for this command. ``given_only``: an option not on the command line is left out of the parsed
    arguments (so a ``preset`` can tell what was given), and the field's default applies."""
    docs, kinds = field_docs(cls), field_kinds(cls)
    for f in fields(cls):
        if names is not None and f.name not in names:
            continue
        kind, optional = kinds[f.name]
        default = (defaults or {}).get(f.name, None if f.default is MISSING else f.default)
        option = "--" + f.name.replace("_", "-")
        help_text = f"{docs.get(f.name, '')} ({default})"
        parsed_default = argparse.SUPPRESS if given_only else default
        if kind is bool:
            parser.add_argument(option, action=argparse.BooleanOptionalAction, default=parsed_default,
                                help=help_text)
        else:
            choices = CHOICES.get(f.name) if issubclass(cls, DecodeConfig) else None
            parser.add_argument(option, type=argument_type(f.name, kind, optional), default=parsed_default,
                                choices=choices, help=help_text)


def option_values(args: argparse.Namespace, cls: type) -> dict:
    """The values of ``cls``'s fields among parsed command-line ``args``."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
