"""Command-line options from a YAML file, and an argparse parser whose refusals are one line (ours): what
``prunenet.compress --config`` uses (the LightningCLI entry points get the same from jsonargparse).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NoReturn

from prunenet.errors import ConfigurationError


class OneLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that raises :class:`ConfigurationError` instead of printing the usage and
    exiting, so ``cli.run_main`` prints the refusal as one ``error:`` line (exit 2) like every entry point.

    Raises:
        ConfigurationError: any parse error (unknown option, bad choice, missing value).
    """

    def error(self, message: str) -> NoReturn:
        raise ConfigurationError(message)


def yaml_defaults(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The options a ``--config`` YAML file sets (keys are the options' names without dashes), checked as the
    command line would check them: known keys, choices, true/false for flags, the option's type.

    Raises:
        ConfigurationError: unreadable file, not a mapping, an unknown key (lists the accepted ones),
            or a value outside an option's choices.
    """
    import yaml

    try:
        values = yaml.safe_load(Path(path).expanduser().read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"cannot read --config {path!r}: {str(exc).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigurationError(f"--config {path!r} must be a mapping of options, got {type(values).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    out = {}
    for key, value in values.items():
        if key not in actions:
            raise ConfigurationError(f"--config {path!r}: unknown key {key!r}; accepted: {', '.join(actions)}")
        action = actions[key]
        if value is None and action.default is None:  # the option's own "not given"
            out[key] = None
            continue
        if action.nargs == 0:  # a flag: only true or false, never the string "false"
            if not isinstance(value, bool):
                raise ConfigurationError(f"--config {path!r}: {key} must be true or false, got {value!r}")
        elif action.type is not None:  # what the flag's own type accepts (seed: 1.7 is not a seed)
            if isinstance(value, bool) or (action.type is int and not isinstance(value, int)):
                raise ConfigurationError(f"--config {path!r}: {key} must be an integer, got {value!r}")
            try:
                value = action.type(value)
            except (TypeError, ValueError):
                raise ConfigurationError(f"--config {path!r}: {key} must be a number, got {value!r}") from None
        elif isinstance(value, bool) or not isinstance(value, (str, int, float, list if key == "compression_ratio" else str)):
            raise ConfigurationError(f"--config {path!r}: {key} must be a string or number, got {value!r}")
        if action.choices is not None and value not in action.choices:
            raise ConfigurationError(f"--config {path!r}: {key} must be one of {', '.join(action.choices)}, "
                                     f"got {value!r}")
        out[key] = value
    return out
