"""Argument checks shared by the Python API and the command line: one small function per kind of
argument, each returning the value in its plain Python form or raising a one-line GenerationError
that names the argument.

Messages name an argument as the Python API spells it (`max_new_tokens`); inside `spelled(...)`
they use another spelling instead (the CLI passes its flags: `--max-new-tokens`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from collections.abc import Iterator, Mapping

from gemma_jax.errors import DependencyError, GenerationError

_SPELLING: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("spelling", default={})


@contextlib.contextmanager
def spelled(names: Mapping[str, str]) -> Iterator[None]:
    """Within this block, messages call argument `a` by `names[a]` (where it has an entry)."""
    token = _SPELLING.set(dict(names))
    try:
        yield
    finally:
        _SPELLING.reset(token)


def name(arg: str) -> str:
    """How messages call the argument `arg` here."""
    return _SPELLING.get().get(arg, arg)


def _is_integer(value) -> bool:
    """A Python or NumPy integer; bools are refused (True is not a token count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(arg: str, value, minimum: int | None = None, maximum: int | None = None,
            optional: bool = False) -> int | None:
    """An int (NumPy integers accepted, bools refused) within [minimum, maximum]."""
    if value is None and optional:
        return None
    if not _is_integer(value) or (minimum is not None and value < minimum) \
            or (maximum is not None and value > maximum):
        bounds = (f" >= {minimum}" if maximum is None else f" in [{minimum}, {maximum}]") \
            if minimum is not None else ""
        raise GenerationError(f"{name(arg)} must be an integer{bounds}, got {value!r}")
    return int(value)


def number(arg: str, value, minimum: float = 0.0, strict: bool = False) -> float:
    """A finite real number >= minimum (> minimum when strict; NumPy scalars accepted, bools refused)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) \
            or value < minimum or (strict and value == minimum):
        bound = f" {'>' if strict else '>='} {minimum:g}" if math.isfinite(minimum) else ""
        raise GenerationError(f"{name(arg)} must be a finite number{bound}, got {value!r}")
    return float(value)


def probability(arg: str, value, optional: bool = False) -> float | None:
    """A number in (0, 1]."""
    if value is None and optional:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < value <= 1:
        raise GenerationError(f"{name(arg)} must be in (0, 1], got {value!r}")
    return float(value)


def seed(value) -> int:
    """A sampling seed: an integer in [0, 2**32) (JAX keeps 32 bits of it)."""
    return integer("seed", value, 0, 2**32 - 1)


def token_ids(arg: str, value, vocab_size: int) -> list[int]:
    """A list of token ids in [0, vocab_size) (e.g. stop_ids)."""
    if isinstance(value, (str, bytes)) or _is_integer(value) or not hasattr(value, "__iter__"):
        raise GenerationError(f"{name(arg)} must be a list of token ids, got {value!r}"
                              + (f" (for one id write [{value!r}])" if _is_integer(value) else ""))
    ids = list(value)
    for token in ids:
        if not _is_integer(token):
            raise GenerationError(f"{name(arg)} must be a list of token ids, got an element {token!r}")
        if not 0 <= token < vocab_size:
            raise GenerationError(f"{name(arg)}: token id {token} is outside the vocabulary [0, {vocab_size})")
    return [int(t) for t in ids]


def strings(arg: str, value) -> list[str]:
    """One string or a list of strings (a plain string is one string, never its characters);
    empty strings are dropped."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, bytes) or not hasattr(value, "__iter__"):
        raise GenerationError(f"{name(arg)} must be a string or a list of strings, got {value!r}")
    out = list(value)
    for s in out:
        if not isinstance(s, str):
            raise GenerationError(f"{name(arg)} must be a string or a list of strings, got an element {s!r}")
    return [s for s in out if s]


def callback(arg: str, value):
    """None or something callable."""
    if value is not None and not callable(value):
        raise GenerationError(f"{name(arg)} must be a function or None, got {value!r}")
    return value


def importable(modules: tuple[str, ...], what: str, extra: str = "test") -> None:
    """Raise DependencyError naming `what` (a command or flag) when a module it needs is missing;
    checked up front, without importing anything."""
    import importlib.util
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise DependencyError(f"{what} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                              f"not installed (pip install 'gemma_jax[{extra}]')")
