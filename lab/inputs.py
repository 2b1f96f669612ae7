"""Checks of the tasks' inputs that no one module owns (tasks.py calls them first): each bad
value is one ConfigError naming the option and what it accepts, raised before any work."""

from __future__ import annotations

import shlex

from .config import ConfigError


def option(name: str) -> str:
    """`kernel_arg` -> `--kernel-arg`, `break_` -> `--break` (invoke's spelling of the option)."""
    return "--" + name.rstrip("_").replace("_", "-")


def not_empty(**values: object) -> None:
    """An option given with an empty value is a mistake, never "use the default": invoke hands
    a task "" for `--cpu ''` and None for an option left out."""
    for name, value in values.items():
        if value == "" or (isinstance(value, (list, tuple)) and any(v == "" for v in value)):
            raise ConfigError(f"{option(name)} '': empty; give it a value or leave the option out")


def whole_number(value: object, name: str, minimum: int = 1) -> int:
    """A count given on the command line (text from invoke): a whole number >= minimum."""
    try:
        n = int(str(value), 10)
    except ValueError:
        raise ConfigError(f"{option(name)} {value!r}: a whole number (at least {minimum})") from None
    if n < minimum:
        raise ConfigError(f"{option(name)} {n}: at least {minimum}")
    return n


def pytest_args(text: str) -> list[str]:
    """`invoke test --args`: words as a shell would split them (pytest checks them itself)."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"--args {text!r}: {exc} (quote it as you would in a shell)") from None
