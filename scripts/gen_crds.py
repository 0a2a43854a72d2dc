"""Regenerate the CRD YAML in crds/ and in the Helm chart (charts/packetflow/crds/) from the models.

Usage: python scripts/gen_crds.py [--check]
  --check   write nothing; exit 1 and list the stale files when either copy differs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from packetflow.operator.crds import crd_files

ROOT = Path(__file__).resolve().parent.parent
CRD_DIRS = (ROOT / "crds", ROOT / "charts" / "packetflow" / "crds")


def stale_files(files: dict[str, str]) -> list[Path]:
    """Files that differ from ``files`` in either CRD directory, or that should not exist."""
    stale: list[Path] = []
    for directory in CRD_DIRS:
        existing = {p.name for p in directory.glob("*.yaml")} if directory.is_dir() else set()
        for name in sorted(existing | set(files)):
            path = directory / name
            if name not in files or not path.is_file() or path.read_text() != files[name]:
                stale.append(path)
    return stale


def write(files: dict[str, str]) -> list[Path]:
    """Bring both CRD directories to ``files``; returns what changed."""
    changed = stale_files(files)
    for path in changed:
        if path.name in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(files[path.name])
        else:
            path.unlink()  # a CRD the models no longer define
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args()
    files = crd_files()
    if args.check:
        stale = stale_files(files)
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)}", file=sys.stderr)
        sys.exit(1 if stale else 0)
    for path in write(files):
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
