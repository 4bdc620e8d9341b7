"""The value checks of the config schema: a Key says what one setting holds (kind, range or choices,
null allowed, extra words) and checks a value as the job reads it, or raises ConfigError naming it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from prunedm.cli.config import ConfigError


@dataclass(frozen=True)
class Key:
    """One config key: what it holds (kind), its range or choices, and a one-line doc."""

    kind: str  # int | number | bool | choice | text | texts | labels | pattern | pair | indices | any
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the range excludes `low`
    high_open: bool = False  # the range excludes `high`
    choices: tuple = ()
    nullable: bool = False  # null (None) is allowed
    texts: tuple = ()  # words allowed besides the kind's values (e.g. logit_init "budget", round_to "2:4")

    def describe(self) -> str:
        """What a valid value looks like, as the error message says it."""
        span = self._span()
        text = {
            "int": f"an integer {span}",
            "number": f"a number {span}",
            "bool": "true or false",
            "choice": "one of " + ", ".join(map(str, self.choices)),
            "text": "a non-empty text",
            "texts": "a non-empty list of texts",
            "labels": "a non-empty list of class ids (integers >= 0) or class names",
            "pattern": "an N:M pattern with 0 < N < M, e.g. 2:4",
            "pair": f"a list of two numbers {span} ([start, end])",
            "indices": "a non-empty list of distinct integers >= 0",
            "any": "anything",
        }[self.kind].strip()
        alternatives = [text, *self.texts, *(["null"] if self.nullable else [])]
        return alternatives[0] if len(alternatives) == 1 else ", ".join(alternatives[:-1]) + " or " + alternatives[-1]

    def _span(self) -> str:
        low, high = _plain(self.low), _plain(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return ""

    def check(self, name: str, value: Any) -> Any:
        """`value` as the job reads it (1e3 -> 1000 where an integer goes, 124 -> "2:4"), or ConfigError."""
        if value is None and (self.nullable or self.kind == "any"):
            return None
        if isinstance(value, str) and value in self.texts:
            return value
        if isinstance(value, int) and not isinstance(value, bool) and value in _SEXAGESIMAL:
            # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124: where "2:4" is a word, that is what was meant.
            if _SEXAGESIMAL[value] in self.texts:
                return _SEXAGESIMAL[value]
        result = _CHECKS[self.kind](self, value)
        if result is _BAD:
            raise ConfigError(f"{name} must be {self.describe()}, got {_short(value)}")
        return result

    def _in_range(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return self.high is None or (x < self.high if self.high_open else x <= self.high)


_BAD = object()
_SEXAGESIMAL = {124: "2:4"}  # N:M words of `texts` as YAML 1.1 reads them unquoted


def _plain(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _real(value: Any) -> float | None:
    """A finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int):  # exact, however large (math.isfinite would overflow past 1e308)
        return value
    return value if math.isfinite(value) else None


def _check_int(key: Key, value: Any):
    x = _real(value)
    if x is None or (isinstance(x, float) and not x.is_integer()):  # 1e3 is 1000 where a count goes
        return _BAD
    return int(x) if key._in_range(x) else _BAD


def _check_number(key: Key, value: Any):
    x = _real(value)
    if x is None or not key._in_range(x):
        return _BAD
    try:
        return float(x)
    except OverflowError:
        return _BAD


def _check_pair(key: Key, value: Any):
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return _BAD
    pair = [_check_number(key, v) for v in value]
    return _BAD if _BAD in pair else pair


def _check_indices(key: Key, value: Any):
    if not isinstance(value, (list, tuple)) or not value:
        return _BAD
    ints = [_check_int(key, v) for v in value]
    return _BAD if _BAD in ints or len(set(ints)) != len(ints) else ints


def _check_texts(key: Key, value: Any):
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        return _BAD
    return list(value) if all(isinstance(v, str) for v in value) else _BAD


def _check_labels(key: Key, value: Any):
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        return _BAD
    for v in value:
        if not ((isinstance(v, str) and v.strip()) or (_real(v) is not None and _check_int(key, v) is not _BAD)):
            return _BAD
    return [v if isinstance(v, str) else int(v) for v in value]


def _check_pattern(key: Key, value: Any):
    try:
        n, m = parse_pattern(value)
    except ConfigError:
        return _BAD
    return f"{n}:{m}"


_CHECKS = {
    "int": _check_int,
    "number": _check_number,
    "bool": lambda key, v: v if isinstance(v, bool) else _BAD,
    "choice": lambda key, v: v if isinstance(v, str) and v in key.choices else _BAD,
    "text": lambda key, v: v if isinstance(v, str) and v.strip() else _BAD,
    "texts": _check_texts,
    "labels": _check_labels,
    "pattern": _check_pattern,
    "pair": _check_pair,
    "indices": _check_indices,
    "any": lambda key, v: v,
}


def parse_pattern(text) -> tuple[int, int]:
    """'2:4' -> (2, 4): the N:M rule (keep N of every M consecutive weights, 0 < N < M)."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:  # unquoted 2:4 in YAML 1.1: 124
        text = "%d:%d" % divmod(text, 60)
    try:
        n, m = (int(part) for part in str(text).split(":"))
    except ValueError:
        raise ConfigError(f"pattern must look like N:M (e.g. 2:4), got {_short(text)}") from None
    if not 0 < n < m:
        raise ConfigError(f"pattern {text!r} breaks the N:M rule: need 0 < N < M")
    return n, m


def integer(doc: str, low: int | None = 0, high: int | None = None, nullable: bool = False) -> Key:
    return Key("int", doc, low, high, nullable=nullable)


def number(doc: str, low=None, high=None, low_open=False, high_open=False, nullable=False) -> Key:
    return Key("number", doc, low, high, low_open, high_open, nullable=nullable)


def choice(doc: str, choices, nullable: bool = False) -> Key:
    return Key("choice", doc, choices=tuple(choices), nullable=nullable)


def flag(doc: str, nullable: bool = False) -> Key:
    return Key("bool", doc, nullable=nullable)


def text(doc: str, nullable: bool = False) -> Key:
    return Key("text", doc, nullable=nullable)
