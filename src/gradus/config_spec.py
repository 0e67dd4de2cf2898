"""The valid values of a config field, declared next to its default: `spec(default, gt=0)`,
`spec("ddp", choices=(...))`, `spec(None, pattern=...)`. `gradus.config_checks.validate` checks every
field against its `Allowed`; `--help-config` prints `Allowed.describe()`."""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Allowed:
    """The valid values of one field: a numeric range, a list of choices, or a text pattern.

    `choices` may name where the list lives ("module:attribute", a collection or a function that
    returns one), so a registry stays the one source of its names. None is always allowed where the
    field's type allows it; numbers must be finite.
    """

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple[Any, ...] | str | None = None
    pattern: str | None = None
    text: str = ""  # how a pattern (or a free-text field) reads to a user

    def options(self) -> tuple[Any, ...] | None:
        if not isinstance(self.choices, str):
            return self.choices
        module, _, attr = self.choices.partition(":")
        found = getattr(importlib.import_module(module), attr)
        return tuple(found() if callable(found) else found)

    def describe(self) -> str:
        """E.g. '> 0', 'in [0, 1]', 'one of float32, bfloat16'."""
        low = (f"({_num(self.gt)}" if self.gt is not None else f"[{_num(self.ge)}" if self.ge is not None else None)
        high = (f"{_num(self.lt)})" if self.lt is not None else f"{_num(self.le)}]" if self.le is not None else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>' if low[0] == '(' else '>='} {low[1:]}"
        if high:
            return f"{'<' if high[-1] == ')' else '<='} {high[:-1]}"
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.options() or ()))
        return self.text or "any"

    def problem(self, value: Any) -> str | None:
        """Why `value` is not allowed, or None when it is."""
        if value is None or isinstance(value, bool):
            return None
        if isinstance(value, int | float):
            if not math.isfinite(value):
                return f"must be a finite number {self.describe()}"
            bounds = ((self.gt, lambda b: value > b), (self.ge, lambda b: value >= b),
                      (self.lt, lambda b: value < b), (self.le, lambda b: value <= b))
            if not all(ok(b) for b, ok in bounds if b is not None):
                return f"must be {self.describe()}"
        if self.choices is not None and value not in self.options():
            return f"must be {self.describe()}"
        if self.pattern is not None and not re.fullmatch(self.pattern, str(value), re.DOTALL):
            return f"must be {self.describe()}"
        return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def spec(default: Any, *, fixed: bool = False, **allowed: Any) -> Any:
    """A dataclass field with a default and its valid values (see `Allowed`). `fixed`: the value is part of what a
    run is, so `--resume` may not change it (`gradus.config.fixed_on_resume`)."""
    return field(default=default, metadata={"allowed": Allowed(**allowed), "fixed": fixed})
