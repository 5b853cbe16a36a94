"""A strict YAML loader that remembers where every key came from.

PyYAML's `safe_load` is not strict enough for files that drive GPU jobs: it keeps the last of two
duplicate keys, expands aliases without bound (a 1 KB "billion laughs" file can eat all memory),
and forgets line numbers. Here the document is composed into PyYAML's node graph (cheap: aliases
stay shared nodes) and then built by our own walk, which

- refuses duplicate keys, merge keys (`<<`) and any tag outside the YAML core schema;
- counts every node it builds, aliases included, and stops at `MAX_NODES`;
- records the 1-based line of every mapping key and sequence item by its path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from automation.errors import Issue

MAX_NODES = 20_000
MAX_BYTES = 1_000_000

_CORE_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:timestamp",
}

Path = tuple[str | int, ...]
_YAML12_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


@dataclass
class LoadedYaml:
    """A parsed document with the line of each path (`("training", "learning_rate") -> 14`)."""

    data: Any
    lines: dict[Path, int] = field(default_factory=dict)

    def line_of(self, path: Path) -> int | None:
        """The line of `path`, or of its nearest ancestor that is in the file."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None


class YamlProblem(Exception):
    def __init__(self, issue: Issue):
        self.issue = issue
        super().__init__(str(issue))


class _Builder:
    def __init__(self, loader: yaml.SafeLoader, file: str):
        self.loader = loader
        self.file = file
        self.count = 0
        self.lines: dict[Path, int] = {}

    def fail(self, node: yaml.Node, path: Path, message: str) -> YamlProblem:
        return YamlProblem(Issue(self.file, node.start_mark.line + 1, _dotted(path), message))

    def build(self, node: yaml.Node, path: Path, depth: int = 0) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise self.fail(
                node, path,
                f"the document expands to more than {MAX_NODES} nodes (aliases included); "
                "an experiment file is far smaller, so this looks like an alias bomb",
            )
        if depth > 50:
            raise self.fail(node, path, "nesting deeper than 50 levels")
        if node.tag not in _CORE_TAGS:
            raise self.fail(
                node, path,
                f"tag {node.tag!r} is not allowed; use plain YAML values (strings, numbers, "
                "booleans, lists, mappings)",
            )
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, depth)
        if isinstance(node, yaml.SequenceNode):
            items = []
            for index, item in enumerate(node.value):
                self.lines.setdefault((*path, index), item.start_mark.line + 1)
                items.append(self.build(item, (*path, index), depth + 1))
            return items
        value = self.loader.construct_object(node, deep=True)
        if isinstance(value, str) and node.style is None and _YAML12_FLOAT.match(value):
            return float(value)  # YAML 1.2 reads 1e-5 as a number; PyYAML (YAML 1.1) as a string
        return value

    def _mapping(self, node: yaml.MappingNode, path: Path, depth: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise self.fail(key_node, path, "merge keys (<<) are not supported; write the keys out")
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.fail(key_node, path, "mapping keys must be plain strings")
            key = self.build(key_node, path, depth + 1)
            if not isinstance(key, str):
                key = str(key).lower() if isinstance(key, bool) else str(key)
            child = (*path, key)
            if key in result:
                first = self.lines.get(child)
                raise self.fail(key_node, child, f"duplicate key {key!r} (first defined on line {first})")
            self.lines[child] = key_node.start_mark.line + 1
            result[key] = self.build(value_node, child, depth + 1)
        return result


def _dotted(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def parse_yaml(text: str, file: str) -> LoadedYaml:
    """Parse one YAML document strictly; raise `YamlProblem` with file and line on any problem."""
    if len(text.encode("utf-8", errors="replace")) > MAX_BYTES:
        raise YamlProblem(Issue(file, None, "", f"file is larger than {MAX_BYTES} bytes"))
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            line = mark.line + 1 if mark else None
            detail = " ".join(p for p in (err.context, err.problem) if p)
            raise YamlProblem(Issue(file, line, "", f"YAML syntax error: {detail}")) from None
        except yaml.YAMLError as err:
            raise YamlProblem(Issue(file, None, "", f"YAML error: {err}")) from None
        if root is None:
            raise YamlProblem(Issue(file, 1, "", "the file is empty; expected a mapping of experiment keys"))
        builder = _Builder(loader, file)
        try:
            data = builder.build(root, ())
        except yaml.constructor.ConstructorError as err:
            line = err.problem_mark.line + 1 if err.problem_mark else None
            raise YamlProblem(Issue(file, line, "", f"cannot read value: {err.problem}")) from None
        return LoadedYaml(data=data, lines={(): root.start_mark.line + 1, **builder.lines})
    finally:
        loader.dispose()


def set_by_dotted_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply one `--set training.learning_rate=1e-5` override to a parsed document."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{dotted}: {part} is not a mapping")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.path=value` with the value read as a YAML scalar (so `3` is an int, `true` a bool)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, e.g. training.learning_rate=1e-5")
    try:
        value = parse_yaml(raw, "--set").data if raw.strip() else ""
    except YamlProblem:
        value = raw
    return key.strip(), value
