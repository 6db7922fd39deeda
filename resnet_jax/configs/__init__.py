"""Config files, each a `get_config(arg)` for one model family (big_vision style).

`parse_arg("depth=56,residual=false", depth=20, residual=True)` turns the string after the config
path's colon into typed values, starting from the family's defaults.
"""

from __future__ import annotations


def parse_arg(arg: str | None, **defaults):
    """key=value pairs, comma-separated; values take the type of their default."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in defaults:
            raise ValueError(
                f"config argument {item!r} is not key=value with key in {', '.join(defaults)}"
            )
        kind = type(defaults[key])
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={raw} must be true or false")
            values[key] = raw.lower() in ("true", "1")
        elif kind is int:
            try:
                values[key] = int(raw)
            except ValueError:
                raise ValueError(f"config argument {key}={raw} must be an integer") from None
        else:
            values[key] = raw
    return values
