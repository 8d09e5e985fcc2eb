"""The ``--help`` page and the configuration reference, generated from the schema: every key of :class:`config.Config`
and of each section, with its type, default and description (a field's ``metadata["help"]``, else its comment).
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from typing import Dict, List, Tuple, Union

import yaml

from config import SECTION_FIELDS, Config, _type_name, section_classes
from methods import registry


def field_docs(cls) -> Dict[str, Tuple[str, str]]:
    """``name -> (group, description)`` for a config dataclass, read from the schema itself: a field's
    ``metadata["help"]``, else its trailing comment, else the comment lines right above it; the group is the last
    ``# --- group ---`` heading before it."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        source = ""
    comments: Dict[int, Tuple[str, bool]] = {}       # line -> (text, whole-line comment)
    code_lines = set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = (tok.string.lstrip("#").strip(), tok.line.strip().startswith("#"))
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
                code_lines.add(tok.start[0])
    except (tokenize.TokenError, IndentationError):
        pass
    lines = source.splitlines()
    names = {f.name: f for f in dataclasses.fields(cls)}
    out: Dict[str, Tuple[str, str]] = {}
    group, above = "", []
    for n, line in enumerate(lines, start=1):
        text, whole = comments.get(n, ("", False))
        if whole:
            if text.startswith("---"):
                group, above = text.strip("- ").strip(), []
            else:
                above.append(text)
            continue
        stripped = line.strip()
        name = stripped.split(":", 1)[0].strip() if ":" in stripped else ""
        if name in names and n in code_lines:
            help_text = names[name].metadata.get("help") or text or " ".join(above)
            out[name] = (group, help_text)
        if n in code_lines:
            above = []
    for name, f in names.items():
        if name not in out:
            out[name] = ("", f.metadata.get("help", ""))
    return out


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def key_rows() -> List[Tuple[str, str, str, str, str]]:
    """Every config key as ``(group, key, type, default, description)``: Config's own, then each section's."""
    rows = []
    hints = typing.get_type_hints(Config)
    docs = field_docs(Config)
    for f in dataclasses.fields(Config):
        if f.name in SECTION_FIELDS or dataclasses.is_dataclass(_strip_optional(hints[f.name])):
            continue
        group, text = docs[f.name]
        rows.append((f"{group}:" if group else "general:", f.name, _type_name(hints[f.name]), _default_text(f),
                     _with_choices(f, text)))
    for section, cls in section_classes().items():
        kind = "method section" if section in registry() else "section"
        doc = " ".join((inspect.getdoc(cls) or "").split())
        group = f"{section}: {kind} (null or --{section} none: off). {doc}".strip()
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name.startswith("_"):
                continue
            rows.append((group, f"{section}.{f.name}", _type_name(hints[f.name]), _default_text(f),
                         _with_choices(f, docs[f.name][1])))
    return rows


def _with_choices(f: dataclasses.Field, text: str) -> str:
    choices = f.metadata.get("choices")
    if not choices or all(str(c) in text for c in choices):
        return text
    return " | ".join(map(str, choices)) + (f"; {text}" if text else "")


def _strip_optional(tp):
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def help_text(usage: str = "") -> str:
    """The ``--help`` page: every key with its type, default and description, generated from the schema."""
    rows = key_rows()
    width_key = max(len(r[1]) for r in rows) + 2
    width_type = min(max(len(r[2]) for r in rows), 24) + 2
    width_default = 24
    out = [usage.rstrip(), ""] if usage else []
    out += ["Config keys (YAML file, or --KEY VALUE after --config; values are read as YAML; booleans also as bare",
            "flags --KEY / --no-KEY; method sections as --SECTION.KEY VALUE, --SECTION none to drop one; a key given",
            "twice: the last value wins, and mappings such as model_kwargs merge key by key, the later value winning):"]
    group = None
    for g, key, tp, default, text in rows:
        if g != group:
            out += ["", g]
            group = g
        default = default if len(default) <= width_default - 2 else default[:width_default - 5] + "..."
        out.append(f"  {key:<{width_key}}{tp:<{width_type}}{default:<{width_default}}{text}".rstrip())
    return "\n".join(out) + "\n"
