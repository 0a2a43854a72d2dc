"""``python -m bench NAME [NAME...]``: run the named benches, one JSON line each on stdout."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

import orjson

from bench import BENCHES


def load(name: str) -> Callable[[], dict[str, Any]]:
    """The ``run`` function of the bench registered as ``name``."""
    module = importlib.import_module(BENCHES[name])
    return cast(Callable[[], dict[str, Any]], module.run)


def main(argv: Sequence[str] | None = None) -> int:
    """Run each bench in the order given; a failing bench is reported and the rest still run."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="+", choices=sorted(BENCHES), metavar="NAME",
                        help=f"one of: {', '.join(sorted(BENCHES))}")
    args = parser.parse_args(argv)
    failed = False
    for name in args.names:
        try:
            figures = load(name)()
        except Exception as exc:  # one broken bench must not hide the others' figures
            failed = True
            print(f"bench {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        # The bench name goes first so each line says what it measured.
        line = orjson.dumps({"bench": name, **figures})
        sys.stdout.write(line.decode() + "\n")
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
