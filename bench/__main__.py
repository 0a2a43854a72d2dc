"""``python -m bench NAME [NAME...]``: run the named benches, one JSON line each on stdout."""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

import orjson

from bench import BENCHES


def load(name: str) -> Callable[..., dict[str, Any]]:
    """The ``run`` function of the bench registered as ``name``."""
    module = importlib.import_module(BENCHES[name])
    return cast(Callable[..., dict[str, Any]], module.run)


def main(argv: Sequence[str] | None = None) -> int:
    """Run each bench in the order given; a failing bench is reported and the rest still run."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="+", choices=sorted(BENCHES), metavar="NAME",
                        help=f"one of: {', '.join(sorted(BENCHES))}")
    # Flags after the names belong to the bench (one that takes them: ``run(argv)``).
    args, extra = parser.parse_known_args(argv)
    if extra and len(args.names) != 1:
        parser.error(f"flags {' '.join(extra)} need exactly one bench name")
    failed = False
    for name in args.names:
        try:
            run = load(name)
            if extra and not inspect.signature(run).parameters:
                parser.error(f"bench {name} takes no flags: {' '.join(extra)}")
            figures = run(extra) if extra else run()
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
