"""Load manifests from YAML files: multi-document, recursive, every error with file, line, path."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from packetflow.spec import API_VERSION, MANIFEST_KINDS, Actor, Capability, Federation, Manifest
from packetflow.validation import format_path, validation_errors

MANIFEST_SUFFIXES = (".yaml", ".yml")
M = TypeVar("M", bound=BaseModel)


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
    # Run by `packetflow federation`, not by a runtime: kept apart from what runtimes serve.
    federations: list[Federation] = field(default_factory=list)

    def add(self, manifest: Manifest | Federation) -> None:
        """File a parsed manifest under its kind."""
        if isinstance(manifest, Actor):
            self.actors.append(manifest)
        elif isinstance(manifest, Federation):
            self.federations.append(manifest)
        else:
            self.capabilities.append(manifest)

    @property
    def manifests(self) -> list[Manifest]:
        """Every manifest that loaded, capabilities first."""
        return [*self.capabilities, *self.actors]


def parse_manifest(
    data: Any, source: str = "<input>", node: yaml.Node | None = None
) -> Manifest | list[ManifestError]:
    """Validate one Capability or Actor document (what a runtime serves); return the model or
    its errors."""
    parsed = parse_document(data, source, node)
    if isinstance(parsed, Federation):
        return [ManifestError(source, "kind", "a Federation runs in a federation gateway "
                              "(`packetflow federation`), not in a runtime",
                              node_line(node, ["kind"]))]
    return parsed


def parse_document(
    data: Any, source: str = "<input>", node: yaml.Node | None = None
) -> Manifest | Federation | list[ManifestError]:
    """Validate one manifest document of any kind; return the model or its errors."""
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
    return validate_model(model, data, source, node)


def validate_model(model: type[M], data: Any, source: str = "<input>",
                   node: yaml.Node | None = None) -> M | list[ManifestError]:
    """``model.model_validate(data)``, or its errors with the path and (given the YAML
    ``node``) the line of each."""
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
            parsed = parse_document(data, source, node)
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
        result.federations.extend(loaded.federations)
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
