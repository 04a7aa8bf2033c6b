"""Strict YAML reading for config files: safe tags only, duplicate keys rejected, each key's line and raw text kept.

The raw text lets a text key keep what the user wrote where YAML 1.1 would turn it into something
else (`mixed_precision: no` is the string 'no', not False; `run_name: 2024` is '2024').
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode


class YamlError(ValueError):
    """A config file that cannot be used; the message is one line."""


@dataclass
class YamlDoc:
    data: dict
    lines: dict[str, int] = field(default_factory=dict)   # dotted key -> 1-based line of the key
    raw: dict[str, str] = field(default_factory=dict)     # dotted key -> text of a plain (unquoted) scalar value


def _walk(node: Node, prefix: str, doc: YamlDoc, path: Path, visited: set[int]) -> None:
    """Record lines/raw text of every mapping key; reject a key that appears twice in one mapping."""
    stack = [(node, prefix)]
    while stack:  # iterative: nesting depth is bounded by the composer, not by us
        cur, pre = stack.pop()
        if not isinstance(cur, MappingNode) or id(cur) in visited:  # shared (aliased) nodes once: no alias bombs
            continue
        visited.add(id(cur))
        seen: dict[str, int] = {}
        for key_node, value_node in cur.value:
            if not isinstance(key_node, ScalarNode) or key_node.value == "<<":  # merge keys: YAML's own rule
                continue
            name, line = pre + key_node.value, key_node.start_mark.line + 1
            if key_node.value in seen:
                raise YamlError(f"{path}: key '{name[:200]}' is set twice (line {seen[key_node.value]} and line {line}); "
                                "YAML would silently keep the last one: remove one of them")
            seen[key_node.value] = line
            doc.lines.setdefault(name, line)
            if isinstance(value_node, ScalarNode) and value_node.style is None:
                doc.raw[name] = value_node.value
            stack.append((value_node, name + "."))


def read_yaml(path: Path) -> YamlDoc:
    """Parse a config file (safe YAML, a mapping at the top); YamlError with one line otherwise."""
    if not path.is_file():
        raise YamlError(f"config file not found: {path} (pass an existing YAML, e.g. configs/smoke.yaml)")
    try:
        loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            doc = YamlDoc({})
            if node is not None:
                _walk(node, "", doc, path, set())
                doc.data = loader.construct_document(node)
        finally:
            loader.dispose()
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise YamlError(f"{path}: not valid YAML ({first}); safe YAML only, no !!python tags") from None
    if doc.data is None:
        doc.data = {}
    if not isinstance(doc.data, dict):
        raise YamlError(f"{path}: top level must be a mapping of sections, got {type(doc.data).__name__}")
    return doc
