"""Flags of one `skymoe` subcommand: --config, --config.a.b=value overrides, and the named options the
command accepts, each typed by its default. Shared by cli.py and the benchmarks' entry points."""

from __future__ import annotations

from collections.abc import Sequence

from skymoe_jax.errors import ConfigError


class Args:
    """Flags of one subcommand: --config, --config.* overrides, and the named options it accepts."""

    def __init__(self, argv: Sequence[str], options: dict[str, object]):
        self.config = None
        self.overrides: list[str] = []
        self.options = dict(options)
        argv = list(argv)
        while argv:
            arg = argv.pop(0)
            if not arg.startswith("--"):
                raise ConfigError(f"unexpected argument {arg!r}; flags look like --name=value")
            name, has_value, value = arg[2:].partition("=")
            if name.startswith("config."):
                if not has_value:
                    if not argv:
                        raise ConfigError(f"--{name} needs a value")
                    value = argv.pop(0)
                self.overrides.append(f"--{name}={value}")
                continue
            if name != "config" and name not in self.options:
                known = ", ".join(f"--{o}" for o in ["config", *self.options])
                raise ConfigError(f"unknown flag --{name}; this command takes {known} and --config.a.b=value")
            default = self.config if name == "config" else self.options[name]
            if isinstance(default, bool) and not has_value:
                value = "true"
            elif not has_value:
                if not argv:
                    raise ConfigError(f"--{name} needs a value")
                value = argv.pop(0)
            if name == "config":
                self.config = value
            else:
                self.options[name] = _typed(name, value, default)

    def __getattr__(self, name):
        try:
            return self.__dict__["options"][name]
        except KeyError:
            raise AttributeError(name) from None


def _typed(name: str, value: str, default: object):
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"--{name}={value!r} must be true or false")
        return value.lower() in ("true", "1")
    if isinstance(default, int):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"--{name}={value!r} must be an integer") from None
    return value
