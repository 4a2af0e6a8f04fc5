"""Field checks and JSON conversion shared by the quantization configs in :mod:`lowbit.config`.

Each ``check_*`` function reads one field of a (frozen) config, raises ``TypeError`` for a value
of the wrong type and ``ValueError`` for a value out of range, and writes the normalized value
back (e.g. a list becomes a tuple). Messages name ``<Class>.<field>``, the bad value and what is
allowed, e.g. ``GPTQConfig.bits=5 is not supported; use one of 2, 3, 4, 8``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from enum import Enum
from typing import Any

import torch


def where(cfg: object, name: str) -> str:
    """``"GPTQConfig.bits"``: how errors name a field."""
    return f"{type(cfg).__name__}.{name}"


def set_field(cfg: object, name: str, value: Any) -> None:
    """Write a field of a frozen dataclass (only from its ``__post_init__``)."""
    object.__setattr__(cfg, name, value)


def _type_error(cfg: object, name: str, value: Any, expected: str) -> TypeError:
    return TypeError(f"{where(cfg, name)} must be {expected}, not {type(value).__name__} {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_bool(cfg: object, name: str, *, optional: bool = False) -> None:
    """``True``/``False`` (or ``None`` when ``optional``); ints such as 0/1 are refused."""
    value = getattr(cfg, name)
    if value is None and optional:
        return
    if not isinstance(value, bool):
        raise _type_error(cfg, name, value, "a bool" + (" or None" if optional else ""))


def check_int(
    cfg: object,
    name: str,
    *,
    optional: bool = False,
    minimum: int | None = None,
    maximum: int | None = None,
    choices: Collection[int] | None = None,
) -> None:
    """An int (not a bool) within ``[minimum, maximum]`` and in ``choices`` when given."""
    value = getattr(cfg, name)
    if value is None and optional:
        return
    if not _is_int(value):
        raise _type_error(cfg, name, value, "an int" + (" or None" if optional else ""))
    if choices is not None and value not in choices:
        allowed = ", ".join(str(c) for c in sorted(choices))
        raise ValueError(f"{where(cfg, name)}={value!r} is not supported; use one of {allowed}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = [f">= {minimum}" if minimum is not None else "", f"<= {maximum}" if maximum is not None else ""]
        rule = " and ".join(b for b in bounds if b)
        raise ValueError(f"{where(cfg, name)}={value!r} is out of range; use an int {rule}")


def check_group_size(cfg: object, name: str = "group_size") -> None:
    """``-1`` (one group per row) or a positive int."""
    value = getattr(cfg, name)
    if not _is_int(value):
        raise _type_error(cfg, name, value, "an int")
    if value != -1 and value <= 0:
        raise ValueError(f"{where(cfg, name)}={value!r} is not allowed; use -1 (one group per row) or a positive int")


def check_float(cfg: object, name: str, ok: Callable[[float], bool], rule: str) -> None:
    """A finite number (int or float, stored as float) for which ``ok`` holds; ``rule`` says when."""
    value = getattr(cfg, name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _type_error(cfg, name, value, "a float")
    value = float(value)
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{where(cfg, name)}={value!r} is out of range; use a finite float with {rule}")
    set_field(cfg, name, value)


def check_str(cfg: object, name: str, *, optional: bool = False, lower: bool = False) -> None:
    """A str (or ``None`` when ``optional``), lower-cased when ``lower``."""
    value = getattr(cfg, name)
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise _type_error(cfg, name, value, "a str" + (" or None" if optional else ""))
    value = value.value if isinstance(value, Enum) else value  # a str-Enum member -> its plain str
    set_field(cfg, name, value.lower() if lower else str(value))


def check_choice(cfg: object, name: str, choices: Collection[str], *, lower: bool = False) -> None:
    """A str in ``choices`` (compared lower-cased and stored lower-cased when ``lower``)."""
    check_str(cfg, name, lower=lower)
    value = getattr(cfg, name)
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{where(cfg, name)}={value!r} is not supported; use one of {allowed}")


def _str_items(cfg: object, name: str, value: Any, expected: str) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise _type_error(cfg, name, value, expected)
    if not all(isinstance(v, str) for v in value):
        raise _type_error(cfg, name, value, expected)
    return tuple(value)


def check_str_tuple(cfg: object, name: str) -> None:
    """``None`` or a list/tuple of str, stored as a tuple (a bare str is refused)."""
    value = getattr(cfg, name)
    if value is not None:
        set_field(cfg, name, _str_items(cfg, name, value, "a list of str or None"))


def check_nested_str_tuple(cfg: object, name: str) -> None:
    """``None`` or a list of lists of str, stored as a tuple of tuples."""
    value = getattr(cfg, name)
    if value is None:
        return
    expected = "a list of lists of str or None"
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise _type_error(cfg, name, value, expected)
    set_field(cfg, name, tuple(_str_items(cfg, name, v, expected) for v in value))


def check_json_dict(cfg: object, name: str) -> None:
    """``None`` or a JSON-able mapping with str keys, stored as a fresh plain ``dict``.

    The copy holds only JSON types (enum members become their values, tuples become lists), so
    the config compares equal to itself after a JSON round trip. The dict itself stays mutable:
    a frozen dataclass can hold one, but then the config is not hashable.
    """
    value = getattr(cfg, name)
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise _type_error(cfg, name, value, "a dict or None")
    set_field(cfg, name, to_plain(value, where(cfg, name)))


def check_dtype_name(cfg: object, name: str, choices: Collection[str]) -> None:
    """``None``, a ``torch.dtype`` or its name (``"float16"``, ``"torch.float16"``, ``"half"``).

    Stored as the canonical name, e.g. ``torch.bfloat16`` -> ``"bfloat16"``.
    """
    value = getattr(cfg, name)
    if value is None:
        return
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    elif isinstance(value, torch.dtype):
        dtype = value
    else:
        raise _type_error(cfg, name, value, "a torch.dtype, a dtype name such as 'float16', or None")
    canonical = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else None
    if canonical not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{where(cfg, name)}={value!r} is not supported; use one of {allowed} or None")
    set_field(cfg, name, canonical)


def to_plain(value: Any, name: str) -> Any:
    """``value`` as JSON types: tuples -> lists, enum members -> values, dtypes -> names.

    Raises ``TypeError`` naming ``name`` for anything else (e.g. a tokenizer object).
    """
    if isinstance(value, Enum):
        return to_plain(value.value, name)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (list, tuple)):
        return [to_plain(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{name} must have str keys to be written as JSON, got {list(value)!r}")
        return {k: to_plain(v, f"{name}[{k!r}]") for k, v in value.items()}
    raise TypeError(f"{name} holds a {type(value).__name__}, which cannot be written to JSON; use a str or None")


def check_legacy_format(cfg: object, legacy_key: str, legacy: str | None, default: str) -> None:
    """Map a legacy format key (GPTQ ``checkpoint_format``, AWQ ``version``) onto ``format``.

    As in transformers, the legacy key wins over the default ``format``; an explicitly different
    ``format`` is a conflict.
    """
    if legacy is None:
        return
    if not isinstance(legacy, str):
        raise TypeError(f"{where(cfg, legacy_key)} must be a str, not {type(legacy).__name__} {legacy!r}")
    legacy = legacy.lower()
    current = getattr(cfg, "format")
    if isinstance(current, str) and current.lower() not in (default, legacy):
        raise ValueError(f"{where(cfg, legacy_key)}={legacy!r} conflicts with format={current!r}; give one of them")
    set_field(cfg, "format", legacy)


def check_exllama_config(cfg: object) -> None:
    """transformers 4.x rule: an ``exllama_config`` names ``version`` 1 or 2."""
    config = getattr(cfg, "exllama_config")
    if config is not None and config.get("version") not in (1, 2):
        raise ValueError(
            f"{where(cfg, 'exllama_config')}={config!r} is not supported; it needs 'version' 1 or 2"
        )
