"""The committed protobuf/gRPC stubs are exactly what `python scripts/gen_proto.py` makes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "proto" / "packetflow" / "v1"


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out",
                    str(tmp_path)], check=True, capture_output=True, timeout=120)
    fresh = {p.name: p.read_text() for p in (tmp_path / "packetflow" / "v1").iterdir()}
    assert set(fresh) == {f"{proto}{suffix}" for proto in ("runtime", "actors", "federation")
                          for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")}
    stale = [name for name, text in fresh.items() if (GENERATED / name).read_text() != text]
    assert not stale, f"stale stubs {stale}: run `python scripts/gen_proto.py`"
