"""Units a recipe and the command line speak: durations ('3m', '24h'), sizes ('8GB'), intervals (50 steps or '10m').

Each parser names the field it reads in its error, so a bad value says where it came from."""

from __future__ import annotations

import re

from daytune.errors import ConfigError

_DURATION_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(d|hr|h|min|m|sec|s)")


def parse_duration(value: str | int | float | None, field_name: str = "budget") -> float | None:
    """'3m', '24h', '1h30m', '90s', '90' (seconds) or a number of seconds -> seconds. None/'none' -> None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{field_name}: expected a duration like '3m' or '24h', got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        if text in ("", "none", "null", "inf", "unlimited"):
            return None
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            compact = text.replace(" ", "")
            parts = _PART.findall(compact)
            if not parts or "".join(n + u for n, u in parts) != compact:
                raise ConfigError(
                    f"{field_name}: cannot parse duration {value!r}; use a number of seconds or units "
                    "s/m/h/d, e.g. '90s', '3m', '1h30m', '24h'"
                )
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(f"{field_name}: duration must be positive, got {value!r}")
    return seconds


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "∞"
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}  # fmt: skip


def parse_size(value, field: str = "train.memory_limit") -> int | None:
    """'8GB', '7.5GiB', '6000MB' or a number of bytes -> bytes; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{field}: expected a size like '8GB', got {value!r}")
    if isinstance(value, (int, float)):
        size = float(value)
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ConfigError(f"{field}: cannot parse size {value!r}; use e.g. '8GB', '7.5GiB' or bytes")
        size = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]
    if size <= 0:
        raise ConfigError(f"{field}: must be positive, got {value!r}")
    return int(size)


def parse_interval(value: int | str, field_name: str) -> tuple[str, float]:
    """An interval in optimizer steps (50, "50") or wall-clock time ("10m") -> ("steps", 50) / ("seconds", 600)."""
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        steps = int(value)
        if steps < 1:
            raise ConfigError(f"{field_name}: must be at least 1 step, got {value!r}")
        return "steps", float(steps)
    return "seconds", parse_duration(value, field_name)
