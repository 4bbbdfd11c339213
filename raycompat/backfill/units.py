"""Parse counts, byte sizes and bandwidths written by people ("1e9", "50 kB", "1 GB/s").

Every parser raises a one-line :class:`ConfigError` naming the config key.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from raycompat.errors import ConfigError

# Decimal (SI) and binary byte units; sizes are bytes, bandwidths bytes per second.
BYTE_UNITS: dict[str, float] = {
    "B": 1.0,
    "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "PB": 1e15,
    "KiB": 2.0**10, "MiB": 2.0**20, "GiB": 2.0**30, "TiB": 2.0**40, "PiB": 2.0**50,
}
# Network links are quoted in bits; only spelled-out "bit" units, since "Mb" vs "MB" is a classic typo.
BIT_UNITS: dict[str, float] = {"bit": 1 / 8, "kbit": 1e3 / 8, "Mbit": 1e6 / 8, "Gbit": 1e9 / 8, "Tbit": 1e12 / 8}

_QUANTITY = re.compile(r"^\s*([0-9][0-9_.]*(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*(/\s*s)?\s*$")


def parse_count(value: object, key: str) -> int:
    """A positive whole number: 1000000000, 1e9 (float), "1e9", "1_000_000_000" -> int.

    Strings go through Decimal so "1e10" or "2.5e12" stay exact (no float rounding).
    """
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a positive whole number, got {value!r}")
    if isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a positive whole number, got {value!r}")
        number = Decimal(value)
    elif isinstance(value, str):
        try:
            number = Decimal(value.strip().replace("_", ""))
        except InvalidOperation:
            raise ConfigError(f"{key}: expected a positive whole number like 1e9, got {value!r}") from None
        if not number.is_finite():
            raise ConfigError(f"{key}: expected a positive whole number, got {value!r}")
    else:
        raise ConfigError(f"{key}: expected a positive whole number, got {value!r}")
    if number != number.to_integral_value():
        raise ConfigError(f"{key}: expected a whole number, got {value!r}")
    if number <= 0:
        raise ConfigError(f"{key}: must be positive, got {value!r}")
    return int(number)


def parse_positive(value: object, key: str) -> float:
    """A positive finite number; strings like "2e6" are accepted (YAML reads a bare 2e6 as a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}: expected a positive number, got {value!r}")
    try:
        number = float(value.strip().replace("_", "")) if isinstance(value, str) else float(value)
    except ValueError:
        raise ConfigError(f"{key}: expected a positive number like 2e6, got {value!r}") from None
    return _positive(number, key, value)


def _split(value: str, key: str, what: str) -> tuple[float, str, bool]:
    match = _QUANTITY.match(value)
    if not match:
        raise ConfigError(f"{key}: cannot read {what} {value!r} (write e.g. '1 GB/s' or '50 kB')")
    try:
        number = float(match.group(1).replace("_", ""))
    except ValueError:
        raise ConfigError(f"{key}: cannot read the number in {value!r}") from None
    return number, match.group(2), match.group(3) is not None


def _positive(number: float, key: str, value: object) -> float:
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"{key}: must be positive and finite, got {value!r}")
    return number


def parse_bytes(value: object, key: str) -> float:
    """A positive size in bytes: a plain number means bytes; strings may carry a unit ("50 kB", "4 KiB")."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}: expected a size like '50 kB', got {value!r}")
    if not isinstance(value, str):
        return _positive(float(value), key, value)
    number, unit, per_second = _split(value, key, "the size")
    if per_second:
        raise ConfigError(f"{key}: expected a size, got a rate {value!r}")
    unit = unit or "B"
    if unit not in BYTE_UNITS:
        raise ConfigError(f"{key}: unknown unit {unit!r} in {value!r} (known: {', '.join(BYTE_UNITS)})")
    return _positive(number * BYTE_UNITS[unit], key, value)


def parse_bandwidth(value: object, key: str) -> float:
    """A positive bandwidth in bytes/s: a plain number means MB/s; strings need a unit per second ("1 GB/s")."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}: expected a bandwidth like '1 GB/s', got {value!r}")
    if not isinstance(value, str):
        return _positive(float(value) * BYTE_UNITS["MB"], key, value)
    number, unit, per_second = _split(value, key, "the bandwidth")
    if not unit:
        return _positive(number * BYTE_UNITS["MB"], key, value)
    scale = BYTE_UNITS.get(unit, BIT_UNITS.get(unit))
    if scale is None or not per_second:
        known = ", ".join(f"{u}/s" for u in (*BYTE_UNITS, *BIT_UNITS))
        raise ConfigError(f"{key}: unknown unit {unit + ('/s' if per_second else '')!r} in {value!r} (known: {known})")
    return _positive(number * scale, key, value)


def format_bytes(n: float) -> str:
    """A short human size with decimal units (for reports)."""
    units = ("B", "kB", "MB", "GB", "TB", "PB", "EB")
    i = 0
    while abs(n) >= 1000 and i < len(units) - 1:
        n /= 1000
        i += 1
    return f"{n:.3g} {units[i]}"
