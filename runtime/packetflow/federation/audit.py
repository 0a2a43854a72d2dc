"""The audit log's records and hash chain (pure): append, and verify what was stored.

Each record carries the previous record's hash, and its own hash covers that link and every
field (not the storage position, ``seq``): editing a record breaks its own hash, deleting one
leaves a gap or an unknown link, inserting one makes the next record skip it, reordering
makes a record link forward. A rewrite of everything from some record on is consistent in
itself; it shows only against a head hash published elsewhere (``verify(..., head=...)``;
the operator writes the head to the Federation's status).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import orjson

GENESIS = "0" * 64
INBOUND = "inbound"  # a peer called us
OUTBOUND = "outbound"  # we called a peer
ALLOW, DENY = "allow", "deny"


@dataclass(frozen=True)
class AuditRecord:
    """One federated call or policy decision. No payloads: sizes and hashes only."""

    at: float  # Unix time
    direction: str
    peer: str  # peer name ("" when the caller could not be identified)
    fingerprint: str  # the peer certificate's SHA-256, when one was seen
    capability: str
    decision: str  # allow | deny
    reason: str
    code: str  # outcome status code
    duration_ms: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    price: float = 0.0
    currency: str = ""
    trace_id: str = ""
    input_sha256: str = ""
    output_sha256: str = ""
    address: str = ""  # the remote address, for refusals before any identity
    notes: str = ""  # e.g. identity metadata a client sent, which was ignored

    def body(self) -> bytes:
        """The canonical bytes the hash covers."""
        # vars(), not asdict(): the same flat dict without a deep copy (a tenth of the cost).
        return orjson.dumps(vars(self), option=orjson.OPT_SORT_KEYS)

    def to_json(self) -> dict[str, Any]:
        """Plain data (``audit export``)."""
        return dict(vars(self))


FIELDS = tuple(f.name for f in fields(AuditRecord))


@dataclass(frozen=True)
class Chained:
    """A record as stored: its position, its link to the previous record, its hash."""

    seq: int
    record: AuditRecord
    prev_hash: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        """Plain data with the chain fields."""
        return {"seq": self.seq, **self.record.to_json(), "prevHash": self.prev_hash,
                "hash": self.hash}


def link_hash(record: AuditRecord, prev_hash: str) -> str:
    """SHA-256 over the previous hash and the record's canonical bytes."""
    return hashlib.sha256(prev_hash.encode() + b"\n" + record.body()).hexdigest()


def chain(records: Sequence[AuditRecord], prev_hash: str, first_seq: int) -> list[Chained]:
    """``records`` appended after a head ``prev_hash`` at position ``first_seq - 1``."""
    out = []
    for offset, record in enumerate(records):
        digest = link_hash(record, prev_hash)
        out.append(Chained(first_seq + offset, record, prev_hash, digest))
        prev_hash = digest
    return out


@dataclass(frozen=True)
class Finding:
    """One thing wrong with the stored log, naming the record."""

    seq: int
    kind: str  # edited, deleted, inserted, reordered, head
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Anchor:
    """Where the stored log starts: the last pruned record (retention), or the genesis."""

    seq: int = 0
    hash: str = GENESIS


def verify(rows: Sequence[Chained], anchor: Anchor = Anchor(),
           head: str | None = None) -> list[Finding]:
    """Every inconsistency of ``rows`` (in ``seq`` order) after ``anchor``; with ``head``,
    also whether that published head hash is still in the log."""
    findings: list[Finding] = []
    position = {row.hash: index for index, row in enumerate(rows)}
    expected_prev, expected_seq = anchor.hash, anchor.seq + 1
    quiet_until = -1  # rows whose broken links follow from a reordering already reported
    for index, row in enumerate(rows):
        if link_hash(row.record, row.prev_hash) != row.hash:
            findings.append(Finding(row.seq, "edited", f"record {row.seq} was edited: its "
                                    "content does not match its hash"))
        if row.seq > expected_seq:
            missing = (f"record {expected_seq}" if row.seq == expected_seq + 1 else
                       f"records {expected_seq}-{row.seq - 1}")
            findings.append(Finding(expected_seq, "deleted", f"{missing} deleted: the log "
                                    f"jumps from {expected_seq - 1} to {row.seq}"))
        elif row.prev_hash != expected_prev and index > quiet_until:
            findings.extend(_broken_link(rows, index, position.get(row.prev_hash)))
            target = position.get(row.prev_hash)
            if target is not None and target > index:
                quiet_until = target + 1
        expected_prev, expected_seq = row.hash, row.seq + 1
    if head is not None and head not in position and head != anchor.hash:
        findings.append(Finding(rows[-1].seq if rows else anchor.seq, "head",
                                f"the published head {head[:16]}... is not in the log: "
                                "records up to it were rewritten or removed"))
    return findings


def _broken_link(rows: Sequence[Chained], index: int, target: int | None) -> list[Finding]:
    """Why ``rows[index]`` does not link to the record stored before it."""
    row = rows[index]
    if target is not None and target > index:
        return [Finding(row.seq, "reordered", f"records {row.seq} and {rows[target].seq} are "
                        f"out of order: {row.seq} was written after {rows[target].seq}")]
    if target is not None and target < index - 1:
        return [Finding(inserted.seq, "inserted", f"record {inserted.seq} was inserted: "
                        f"record {row.seq} follows {rows[target].seq} directly")
                for inserted in rows[target + 1:index]]
    before = rows[index - 1].seq if index > 0 else row.seq - 1
    return [Finding(before, "edited", f"record {before} was edited and re-hashed, or a record "
                    f"after it deleted: record {row.seq} no longer links to it")]
