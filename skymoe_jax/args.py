"""Flags of one `skymoe` subcommand, parsed with absl: the named flags the command declares (each typed
by its default, with a help line), --config=PATH and --config.a.b=VALUE overrides where the command
reads a config, --flagfile=PATH (absl's: one flag per line, nested files allowed) and --help.

Overrides are kept as written and applied by config.py, which types and validates them against the
config they change (the file's, or a resumed run's saved one). Every mistake is a ConfigError of one
sentence that names the flag; --help raises Help, whose text the command line prints with status 0.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from absl import flags as absl_flags

from skymoe_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Flag:
    default: object  # its type is the flag's: bool, int, float, str, or list (a repeated string flag)
    help: str
    shown: str = ""  # the default as --help states it where it is worked out (the machine's cores, a GPU, a name)


class Help(Exception):  # noqa: N818 - a request, not an error
    """--help was given; str(self) is the text to print."""


_TYPES = {bool: "true or false", int: "an integer", float: "a number"}


class Args:
    """Parsed flags of one subcommand: .config (a path or None), .overrides (--config.* as given) and
    each declared flag as an attribute."""

    def __init__(
        self,
        argv: Sequence[str],
        command: str,
        about: str,
        flags: dict[str, Flag],
        *,
        config: bool = False,
    ):
        """command: its words after `skymoe` (e.g. "bench step"); about: what it does, for --help;
        config: whether it reads a config (--config and --config.a.b=VALUE)."""
        self._command, self._flags, self._takes_config = command, flags, config
        fv = absl_flags.FlagValues()
        for name, flag in flags.items():
            define = {
                bool: absl_flags.DEFINE_boolean,
                int: absl_flags.DEFINE_integer,
                float: absl_flags.DEFINE_float,
                list: absl_flags.DEFINE_multi_string,  # repeated: --name=A --name=B
            }.get(type(flag.default), absl_flags.DEFINE_string)
            define(name, flag.default, flag.help, flag_values=fv)
        try:
            argv = fv.read_flags_from_files(list(argv), force_gnu=True)
        except absl_flags.Error as e:
            raise ConfigError(f"--flagfile: {str(e).replace('ERROR:: ', '')}") from None
        if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv):
            raise Help(self.help(about))
        self.config: str | None = None
        self.overrides: list[str] = []
        rest = self._take_config(list(argv))
        try:
            positional = fv(["skymoe", *rest])[1:]
        except absl_flags.UnrecognizedFlagError as e:
            raise ConfigError(f"unknown flag --{e.flagname}; {self._takes()}") from None
        except absl_flags.IllegalFlagValueError as e:
            raise ConfigError(self._illegal(str(e))) from None
        except absl_flags.Error as e:
            raise ConfigError(f"{e}; {self._takes()}") from None
        if positional:
            raise ConfigError(f"unexpected argument {positional[0]!r}; flags look like --name=value")
        self._values = {name: fv[name].value for name in flags}

    def __getattr__(self, name):
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def _take_config(self, argv: list[str]) -> list[str]:
        """Moves --config and --config.a.b=VALUE out of argv (both also as two words)."""
        rest = []
        while argv:
            arg = argv.pop(0)
            name, has_value, value = arg[2:].partition("=")
            if not arg.startswith("--") or (name != "config" and not name.startswith("config.")):
                rest.append(arg)
                continue
            if not self._takes_config:
                raise ConfigError(
                    f"skymoe {self._command} reads no config, so --{name} does not apply; {self._takes()}"
                )
            if not has_value:
                if not argv:
                    raise ConfigError(f"--{name} needs a value")
                value = argv.pop(0)
            if name == "config":
                self.config = value
            else:
                self.overrides.append(f"--{name}={value}")
        return rest

    def _takes(self) -> str:
        known = [f"--{name}" for name in self._flags] + (
            ["--config", "--config.a.b=VALUE"] if self._takes_config else []
        )
        listed = f"takes {', '.join(known)}" if known else "takes no flags"
        return f"skymoe {self._command} {listed} (see skymoe {self._command} --help)"

    def _illegal(self, message: str) -> str:
        match = re.match(r"flag --(\w+)=(.*?): ", message)
        if match and match.group(1) in self._flags:
            name, value = match.groups()
            return f"--{name}={value!r} must be {_TYPES[type(self._flags[name].default)]}"
        return message.splitlines()[0]

    def help(self, about: str) -> str:
        lines = [f"usage: skymoe {self._command} [flags]", "", about, "", "flags:"]
        for name, flag in self._flags.items():
            default = flag.shown or (
                str(flag.default).lower() if isinstance(flag.default, bool) else repr(flag.default)
            )
            lines.append(f"  --{name}  {flag.help} (default: {default})")
        if self._takes_config:
            lines.append("  --config=PATH  a config file with get_config() (default: configs/default.py)")
            lines.append("  --config.a.b=VALUE  set one config field; `skymoe config` prints them all")
        lines.append("  --flagfile=PATH  read more flags from a file, one per line")
        lines.append("  --help  show this text")
        return "\n".join(lines)
