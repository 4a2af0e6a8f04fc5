"""The base of lowbit's quantization configs and their registry by ``quant_method``.

:class:`QuantConfig` turns a ``quantization_config`` dict into a config and back: legacy synonyms
mapped (``_ALIASES``), keys other tools write dropped (``_IGNORED_INPUT_KEYS``) or checked
(``_CHECKED_INPUT_KEYS``), anything else refused with the keys that are known. Each method's
config (:mod:`lowbit.config`) registers itself in :data:`CONFIGS` with :func:`registered`, and
:func:`config_from_dict` dispatches on ``quant_method`` through it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, ClassVar, TypeVar

from lowbit._config_fields import check_str_tuple, to_plain, where
from lowbit.registry import Registry

Q = TypeVar("Q", bound="QuantConfig")


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """Base of all configs: ``quant_method`` names the method, the rest is per-method data."""

    quant_method: ClassVar[str]
    _ALIASES: ClassVar[Mapping[str, str]] = {}  # legacy input key -> field it sets
    _IGNORED_INPUT_KEYS: ClassVar[frozenset[str]] = frozenset()  # accepted on input, then dropped
    _CHECKED_INPUT_KEYS: ClassVar[frozenset[str]] = frozenset()  # accepted if they hold the one allowed value
    _LEGACY_OUTPUT: ClassVar[Mapping[str, str]] = {}  # extra key to_dict writes -> field it copies

    modules_to_not_convert: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_str_tuple(self, "modules_to_not_convert")
        self._validate()

    def _validate(self) -> None:
        """Per-class checks and normalization (hook for subclasses)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict with ``quant_method``: tuples -> lists, dtypes -> names like ``"float16"``."""
        out: dict[str, Any] = {"quant_method": self.quant_method}
        for f in fields(self):
            out[f.name] = to_plain(getattr(self, f.name), where(self, f.name))
        for key, source in self._LEGACY_OUTPUT.items():
            out[key] = out[source]
        return out

    def to_json_string(self) -> str:
        """:meth:`to_dict` as JSON, keys sorted, indented by 2."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantConfig:
        """Build a config from a ``quantization_config`` dict.

        On :class:`QuantConfig` itself this dispatches on ``d["quant_method"]``; on a subclass it
        builds that class (``quant_method`` may then be left out, but must match if given).
        """
        if cls is QuantConfig:
            return config_from_dict(d)
        if not isinstance(d, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict needs a dict, not {type(d).__name__}")
        kw = {str(k): v.value if isinstance(v, Enum) else v for k, v in d.items()}
        method = kw.pop("quant_method", cls.quant_method)
        if method != cls.quant_method:
            raise ValueError(f"{cls.__name__} has quant_method {cls.quant_method!r}, but the dict says {method!r}")
        cls._map_aliases(kw)
        cls._take_checked_keys(kw)
        for key in cls._IGNORED_INPUT_KEYS:
            kw.pop(key, None)
        unknown = sorted(set(kw) - set(inspect.signature(cls).parameters))
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} keys {', '.join(map(repr, unknown))}; known keys: "
                + ", ".join(cls.input_keys())
            )
        return cls(**kw)

    @classmethod
    def _map_aliases(cls, kw: dict[str, Any]) -> None:
        """Rename legacy keys in place; a legacy key and its field given together must agree."""
        for alias, name in cls._ALIASES.items():
            if alias not in kw:
                continue
            value = kw.pop(alias)
            if name in kw and kw[name] != value:
                raise ValueError(
                    f"{cls.__name__}: {alias}={value!r} conflicts with {name}={kw[name]!r}; give one of them"
                )
            kw[name] = value

    @classmethod
    def _take_checked_keys(cls, kw: dict[str, Any]) -> None:
        """Remove, in place, keys that other tools write and that must hold one value here
        (raising ``ValueError`` if not); see :attr:`_CHECKED_INPUT_KEYS`. Default: none."""

    @classmethod
    def input_keys(cls) -> list[str]:
        """Every key :meth:`from_dict` accepts, sorted."""
        keys = (set(inspect.signature(cls).parameters) | set(cls._ALIASES) | cls._IGNORED_INPUT_KEYS
                | cls._CHECKED_INPUT_KEYS)
        return sorted(keys | {"quant_method"})

    def replace(self: Q, **changes: Any) -> Q:
        """A new, validated config with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


CONFIGS: Registry[type[QuantConfig]] = Registry("quant_method")


def registered(cls: type[Q]) -> type[Q]:
    """Class decorator: add ``cls`` to :data:`CONFIGS` under its ``quant_method``."""
    CONFIGS.add(cls.quant_method, cls)
    return cls


def config_from_dict(d: Mapping[str, Any]) -> QuantConfig:
    """The config a ``quantization_config`` dict describes, chosen by its ``quant_method``.

    Raises ``TypeError`` for a non-dict, ``ValueError`` for a missing or unknown ``quant_method``
    and for keys the chosen class does not accept.
    """
    if not isinstance(d, Mapping):
        raise TypeError(f"quantization_config must be a dict, not {type(d).__name__}")
    if "quant_method" not in d:
        raise ValueError(f"quantization_config has no 'quant_method'; known methods: {', '.join(CONFIGS)}")
    method = d["quant_method"]
    method = method.value if isinstance(method, Enum) else method
    if not isinstance(method, str):
        raise TypeError(f"quantization_config 'quant_method' must be a str, not {type(method).__name__}")
    return CONFIGS.get(method).from_dict(d)
