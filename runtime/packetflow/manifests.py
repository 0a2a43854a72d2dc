"""Load manifests from YAML files: multi-document, recursive, every error with file, line, path."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from packetflow.spec import API_VERSION, MANIFEST_KINDS, Actor, Capability, Manifest

MANIFEST_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class ManifestError:
    """One problem with one manifest, located as precisely as the source allows."""

    source: str
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.source + (f":{self.line}" if self.line else "")
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


@dataclass
class LoadResult:
    """The manifests that loaded and the errors of those that did not."""

    capabilities: list[Capability] = field(default_factory=list)
    actors: list[Actor] = field(default_factory=list)
    errors: list[ManifestError] = field(default_factory=list)

    def add(self, manifest: Manifest) -> None:
        """File a parsed manifest under its kind."""
        if isinstance(manifest, Actor):
            self.actors.append(manifest)
        else:
            self.capabilities.append(manifest)

    @property
    def manifests(self) -> list[Manifest]:
        """Every manifest that loaded, capabilities first."""
        return [*self.capabilities, *self.actors]


def error_path(data: Any, loc: tuple[int | str, ...]) -> tuple[list[str | int], bool]:
    """Turn a pydantic ``loc`` into the path inside ``data``, dropping union-member tags.

    Returns the path and whether it was found in the data all the way down.
    """
    path: list[str | int] = []
    current = data
    for position, part in enumerate(loc):
        if _has_child(current, part):
            current = current[part]
            path.append(part)
        elif position == len(loc) - 1 or not isinstance(current, dict | list):
            # A missing or unexpected key at the end; tags of union members are skipped.
            if position == len(loc) - 1 and not _is_union_tag(part):
                path.append(part)
                return path, False
            return path, True
    return path, True


def _has_child(container: Any, part: int | str) -> bool:
    if isinstance(container, dict):
        return part in container
    return isinstance(container, list) and isinstance(part, int) and part < len(container)


def _is_union_tag(part: int | str) -> bool:
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


def format_path(path: Iterable[str | int]) -> str:
    """``['spec', 'requires', 'a']`` -> ``spec.requires.a``; list indices as ``[0]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_errors(data: Any, exc: ValidationError) -> list[tuple[list[str | int], str]]:
    """One (path, message) per distinct path, in the order pydantic reported them."""
    seen: dict[str, tuple[list[str | int], str]] = {}
    for err in exc.errors():
        path, _ = error_path(data, tuple(err["loc"]))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            message = "field required"
        elif err["type"] == "extra_forbidden":
            message = "unknown field"
        seen.setdefault(format_path(path), (path, message))
    return list(seen.values())


def parse_manifest(
    data: Any, source: str = "<input>", node: yaml.Node | None = None
) -> Manifest | list[ManifestError]:
    """Validate one manifest document; return the model or its errors."""
    if not isinstance(data, dict):
        return [ManifestError(source, "", "a manifest is a mapping", node_line(node, []))]
    kind = data.get("kind")
    if data.get("apiVersion") != API_VERSION:
        return [ManifestError(source, "apiVersion", f"must be {API_VERSION!r}, got "
                              f"{data.get('apiVersion')!r}", node_line(node, ["apiVersion"]))]
    model = MANIFEST_KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        return [ManifestError(source, "kind", f"must be one of {sorted(MANIFEST_KINDS)}, "
                              f"got {kind!r}", node_line(node, ["kind"]))]
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        return [
            ManifestError(source, format_path(path), message, node_line(node, path))
            for path, message in validation_errors(data, exc)
        ]


def load_text(text: str, source: str = "<input>") -> LoadResult:
    """Load every manifest document in a YAML string."""
    result = LoadResult()
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            data = loader.construct_document(node)
            if data is None:
                continue
            parsed = parse_manifest(data, source, node)
            if isinstance(parsed, list):
                result.errors.extend(parsed)
            else:
                result.add(parsed)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        result.errors.append(ManifestError(source, "", f"invalid YAML: {problem}", line))
    finally:
        loader.dispose()
    return result


def manifest_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Every manifest file under the given files and directories, recursively, sorted."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix in MANIFEST_SUFFIXES
                              and p.is_file())
        else:
            yield path


def load_paths(paths: Iterable[Path]) -> LoadResult:
    """Load manifests from files and directories; unreadable files become errors too."""
    result = LoadResult()
    first_seen: dict[str, str] = {}
    for file in manifest_files(paths):
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            result.errors.append(ManifestError(str(file), "", f"cannot read: {exc}"))
            continue
        loaded = load_text(text, str(file))
        result.errors.extend(loaded.errors)
        for manifest in loaded.manifests:
            # One namespace for capabilities and actor types: both are callable by name.
            if manifest.name in first_seen:
                result.errors.append(ManifestError(
                    str(file), "metadata.name", f"{manifest.kind} {manifest.name!r}: the name "
                    f"is already declared in {first_seen[manifest.name]}"))
            else:
                first_seen[manifest.name] = str(file)
                result.add(manifest)
    return result


def node_line(node: yaml.Node | None, path: list[str | int]) -> int | None:
    """The 1-based line of the deepest node along ``path`` in the YAML node tree."""
    if node is None:
        return None
    current = node
    for part in path:
        child: yaml.Node | None = None
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                if getattr(key, "value", None) == part:
                    child = value
                    break
        elif (isinstance(current, yaml.SequenceNode) and isinstance(part, int)
              and part < len(current.value)):
            child = current.value[part]
        if child is None:
            break
        current = child
    return current.start_mark.line + 1
