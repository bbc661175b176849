"""Configuration sources below the command line: a TOML/YAML/JSON file and the environment."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from sqlproxy.config import ConfigError

# Google's proxy's prefix first, then our own; both spell every flag in upper case.
ENV_PREFIXES = ("CSQL_PROXY_", "SQLPROXY_")
INSTANCES_KEY = "instance-connection-name"


def env_names(flag: str) -> list[str]:
    """env_names are the environment variables that may set --flag."""
    suffix = flag.upper().replace("-", "_")
    return [prefix + suffix for prefix in ENV_PREFIXES]


def find_config_file(args: Sequence[str]) -> str | None:
    """find_config_file spots --config-file in argv (or the environment) before parsing."""
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--config-file" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config-file="):
            return arg.split("=", 1)[1]
    for name in env_names("config-file"):
        if value := os.environ.get(name):
            return value
    return None


def load_config_file(path: str) -> dict[str, Any]:
    """load_config_file reads a .toml, .yaml/.yml or .json file of flag-name keys."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read --config-file {path}: {exc.strerror}") from None
    suffix = file.suffix.lower()
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(
                f"--config-file {path}: unknown format {suffix or '(none)'}; "
                "use .toml, .yaml, .yml or .json"
            )
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(
            f"--config-file {path} is not valid {suffix[1:].upper()}: {first}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config-file {path}: expected a table of flag names and values")
    return data


def split_file_config(
    data: dict[str, Any], known_flags: Iterable[str], path: str
) -> tuple[dict[str, Any], list[str]]:
    """split_file_config turns file keys into click's default_map and the instance list.

    Instances come from "instance-connection-name" (a string or a list) or the numbered
    "instance-connection-name-0", "-1", ... keys, as in Google's proxy.
    """
    known = set(known_flags)
    defaults: dict[str, Any] = {}
    instances: list[str] = []
    numbered: dict[int, str] = {}
    for key, value in data.items():
        if key == INSTANCES_KEY:
            instances = [value] if isinstance(value, str) else [str(v) for v in value]
        elif key.startswith(INSTANCES_KEY + "-") and key.rsplit("-", 1)[1].isdigit():
            numbered[int(key.rsplit("-", 1)[1])] = str(value)
        elif key in known and key != "config-file":
            defaults[key.replace("-", "_")] = value
        else:
            raise ConfigError(f'--config-file {path}: unknown key "{key}"')
    instances += [numbered[i] for i in sorted(numbered)]
    return defaults, instances


def env_conflicts(flags: Iterable[str]) -> None:
    """env_conflicts refuses a flag set differently under CSQL_PROXY_ and SQLPROXY_."""
    for flag in flags:
        values = {name: os.environ[name] for name in env_names(flag) if name in os.environ}
        if len(set(values.values())) > 1:
            shown = " and ".join(sorted(values))
            raise ConfigError(f"{shown} disagree; set --{flag} in one place only")


def instances_from_env() -> list[str]:
    """instances_from_env reads ..._INSTANCE_CONNECTION_NAME, or _0, _1, ... in order."""
    for name in env_names(INSTANCES_KEY):
        if single := os.environ.get(name):
            return [single]
    for name in env_names(INSTANCES_KEY):
        found: list[str] = []
        while value := os.environ.get(f"{name}_{len(found)}"):
            found.append(value)
        if found:
            return found
    return []
