"""Where a config's values come from, before they are typed and checked (:mod:`config`): YAML files that may
inherit (``base: other.yaml``) and ``--key value`` overrides from the command line, merged key by key.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Set

import yaml

from files import first_line


class ConfigError(ValueError):
    """A configuration mistake; ``str(err)`` is the one line shown to the user."""


def read_yaml(path: str, _seen: Optional[List[str]] = None) -> Dict[str, Any]:
    """Read a config file, resolving ``base: other.yaml`` (relative to the file) by a deep merge."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    seen = (_seen or []) + [os.path.abspath(path)]
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{_yaml_where(e, path)}: YAML syntax error: {_yaml_problem(e)}; fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = os.path.join(os.path.dirname(path), base)
    if os.path.abspath(base_path) in seen:
        raise ConfigError(f"{path}: 'base: {base}' makes an inheritance cycle")
    return deep_merge(read_yaml(base_path, seen), data)


def _yaml_where(err: "yaml.YAMLError", path: str) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    return f"{path}:{mark.line + 1}:{mark.column + 1} (line {mark.line + 1}, column {mark.column + 1})" if mark else path


def _yaml_problem(err: "yaml.YAMLError") -> str:
    return getattr(err, "problem", None) or first_line(err)


def deep_merge(base: Dict[str, Any], override: Dict[str, Any]) -> Dict[str, Any]:
    """Mappings merge key by key at every level (sections, ``model_kwargs``, ``teacher_kwargs``); other values
    replace."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(argv: List[str], flags: Set[str]) -> Dict[str, Any]:
    """``--key value`` / ``--key=value`` / ``--section.key value`` into a nested dict; values are read as YAML.

    A key given twice: the later value wins, except that two mappings (``--model_kwargs '{a: 1}' --model_kwargs
    '{b: 2}'``, a section and its keys) merge key by key, as a YAML file and the command line do. ``flags``: the
    boolean keys, which also work bare (``--eval``, ``--no-model_ema``).
    """
    out: Dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument '{arg}': overrides are written --key value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            key = key.replace("-", "_")
            i += 1
        else:
            key = arg[2:].replace("-", "_")
            bare = i + 1 >= len(argv) or argv[i + 1].startswith("--")
            if key in flags and bare:                  # --eval
                key, raw = key, "true"
                i += 1
            elif key.startswith("no_") and key[3:] in flags:     # --no-model_ema
                key, raw = key[3:], "false"
                i += 1
            elif bare:
                raise ConfigError(f"override {arg} has no value: write {arg} VALUE")
            else:
                raw = argv[i + 1]
                i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            if raw.lstrip()[:1] in "{[":
                raise ConfigError(f"--{key}: {raw!r} is not valid YAML ({_yaml_problem(e)}); write e.g. "
                                  f"--{key} '{{a: 1, b: 2}}' or '[1, 2]'") from None
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key} conflicts with an earlier override of --{p}")
        earlier = node.get(parts[-1])
        node[parts[-1]] = deep_merge(earlier, value) if isinstance(earlier, dict) and isinstance(value, dict) else value
    return out
