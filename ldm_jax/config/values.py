"""The value checks the config's validation shares: one of a set, a positive integer, a source
('name' or 'prefix:<path>'). Each raises a ValueError naming the key, the value and what is allowed."""
from __future__ import annotations


def choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}")


def positive_int(key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key}={value!r} must be a positive integer")


def source(key: str, value, allowed) -> None:
    """'name' or 'prefix:<path>' with a non-empty path."""
    plain = [a for a in allowed if ":" not in a]
    prefixes = [a.split(":")[0] + ":" for a in allowed if ":" in a]
    if value in plain:
        return
    if isinstance(value, str) and any(value.startswith(p) and value[len(p):].strip() for p in prefixes):
        return
    raise ValueError(f"{key}={value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}")
