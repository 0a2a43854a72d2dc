"""``packetflow federation`` (the gateway, ``certs``, ``usage``) and ``packetflow audit``
(``verify``, ``export``): registered through the ``packetflow.commands`` entry points."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from packetflow.spec import DURATION_PATTERN, duration_seconds

T = TypeVar("T")
GATEWAY_PATH = "/federation/gateway"


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``federation`` with its ``certs`` and ``usage`` subcommands."""
    parser = sub.add_parser(
        "federation", help="run a federation gateway; make certificates; show usage",
        description="Without a subcommand: run the federation gateway described by --config "
                    "(settings may also come from PACKETFLOW_FEDERATION_* variables).")
    parser.add_argument("--config", type=Path, help="the gateway's config file (YAML)")
    parser.set_defaults(func=cmd_gateway)
    actions = parser.add_subparsers(dest="federation_command", metavar="ACTION")

    certs = actions.add_parser(
        "certs", help="a CA per organization and SPIFFE leaf certificates",
        description="Create OUT/ca.crt and OUT/ca.key for the trust domain unless they exist "
                    "(--new-ca replaces them), then issue OUT/tls.crt and OUT/tls.key for "
                    "the SPIFFE ID spiffe://TRUST_DOMAIN/federation/gateway. Run it again to "
                    "rotate the leaf; give peers OUT/ca.crt as their trust bundle.")
    certs.add_argument("--trust-domain", required=True, help="e.g. acme.example")
    certs.add_argument("--organization", help="the CA's organization (default: the trust "
                                              "domain's first label)")
    certs.add_argument("--out", type=Path, required=True, help="directory to write")
    certs.add_argument("--path", default=GATEWAY_PATH,
                       help=f"the SPIFFE ID's path (default {GATEWAY_PATH})")
    certs.add_argument("--dns", action="append", default=[],
                       help="a host name peers dial this gateway by (repeatable; default "
                            "localhost)")
    certs.add_argument("--ip", action="append", default=[],
                       help="an IP address peers dial (repeatable; default 127.0.0.1)")
    certs.add_argument("--days", type=float, default=90.0, help="leaf validity (default 90)")
    certs.add_argument("--ca-days", type=float, default=365.0,
                       help="CA validity (default 365)")
    certs.add_argument("--new-ca", action="store_true", help="replace an existing CA")
    certs.set_defaults(func=cmd_certs)

    usage = actions.add_parser("usage", help="metered usage and charges per peer and export")
    usage.add_argument("--config", type=Path, required=True, dest="usage_config")
    _period_flags(usage)
    usage.add_argument("--format", choices=("table", "json"), default="table")
    usage.set_defaults(func=cmd_usage)


def register_audit(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``audit verify`` and ``audit export``."""
    parser = sub.add_parser("audit", help="verify or export the federation audit log")
    actions = parser.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = actions.add_parser(
        "verify", help="check the hash chain: edited, deleted, inserted, reordered records",
        description="Exit 0 when the chain is intact, 1 naming every record at fault.")
    verify.add_argument("--config", type=Path, required=True)
    verify.add_argument("--head", help="a head hash published earlier (e.g. the Federation's "
                                       "status.audit.headHash): it must still be in the log")
    verify.set_defaults(func=cmd_audit_verify)
    export = actions.add_parser("export", help="records as JSON lines (no payloads)")
    export.add_argument("--config", type=Path, required=True)
    _period_flags(export)
    export.set_defaults(func=cmd_audit_export)


def _period_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", default="30d",
                        help="a duration back from now (30d, 12h) or an ISO time "
                             "(default 30d)")
    parser.add_argument("--until", help="an ISO time (default now)")
    parser.add_argument("--peer", help="only this peer")


def parse_time(text: str, now: float) -> float:
    """``30d`` (that long before ``now``) or an ISO-8601 time -> Unix time."""
    import re

    if re.fullmatch(DURATION_PATTERN.strip("^$"), text):
        return now - duration_seconds(text)
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (30d) nor an ISO time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


# ---------------------------------------------------------------------- the gateway

def cmd_gateway(args: argparse.Namespace) -> int:
    """Run the gateway until SIGINT/SIGTERM."""
    from packetflow.federation.settings import ConfigError
    from packetflow.identity.x509 import BundleError

    if args.federation_command is None and args.config is None:
        return _fail("packetflow federation needs --config FILE (or an ACTION)")
    try:
        return asyncio.run(run_gateway(args.config))
    except ConfigError as exc:
        for error in exc.errors:
            print(f"error: {error}", file=sys.stderr)
        return 1
    except BundleError as exc:
        return _fail(f"gateway.workload (PACKETFLOW_TLS_*): {exc}", 1)


async def run_gateway(config: Path) -> int:
    """Start a gateway, announce it on stderr, serve until a signal."""
    from packetflow.federation.gateway import Gateway
    from packetflow.logs import configure_logging

    gateway = Gateway(config)
    settings = gateway.watch.value.settings
    configure_logging(settings.log_level, settings.log_format)
    await gateway.start()
    http = f", status on :{gateway.http_port}/status" if gateway.http_port else ""
    print(f"packetflow: federation gateway {settings.federation.organization} "
          f"({settings.federation.trust_domain}): peers on :{gateway.peer_port}, local "
          f"callers on :{gateway.local_port}{http}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await gateway.stop()
    return 0


# ---------------------------------------------------------------------- certificates

def cmd_certs(args: argparse.Namespace) -> int:
    """Make (or keep) the CA, issue the gateway's leaf."""
    from packetflow.identity.certs import Issued, authority_trust_domain, issue, new_authority
    from packetflow.identity.files import write_atomically as _write
    from packetflow.identity.spiffe import SpiffeId, SpiffeIdError
    from packetflow.identity.x509 import BundleError

    try:
        spiffe_id = SpiffeId.parse(f"spiffe://{args.trust_domain}{args.path}")
    except SpiffeIdError as exc:
        return _fail(f"--trust-domain/--path: {exc}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    ca_crt, ca_key = out / "ca.crt", out / "ca.key"
    days = datetime.timedelta(days=args.days)
    if ca_crt.exists() and ca_key.exists() and not args.new_ca:
        authority = Issued(ca_crt.read_bytes(), ca_key.read_bytes())
        if authority_trust_domain(authority.certificate) != args.trust_domain:
            return _fail(f"{ca_crt} is the CA of another trust domain; use another --out or "
                         "--new-ca")
        print(f"kept the CA in {ca_crt}", file=sys.stderr)
    else:
        authority = new_authority(args.trust_domain,
                                  args.organization or args.trust_domain.split(".")[0],
                                  valid_for=datetime.timedelta(days=args.ca_days))
        _write(ca_key, authority.key_pem, private=True)
        _write(ca_crt, authority.certificate_pem)
        print(f"wrote the CA of {args.trust_domain}: {ca_crt}, {ca_key}", file=sys.stderr)
    try:
        leaf = issue(authority, spiffe_id, dns_names=args.dns or ["localhost"],
                     ip_addresses=args.ip or ["127.0.0.1"], valid_for=days)
    except (BundleError, ValueError) as exc:
        return _fail(str(exc))
    # The key first: a watcher seeing the new certificate then finds its key already there.
    _write(out / "tls.key", leaf.key_pem, private=True)
    _write(out / "tls.crt", leaf.certificate_pem)
    print(f"issued {spiffe_id}: {out / 'tls.crt'}, {out / 'tls.key'}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- store commands

def _with_store(config: Path, work: Callable[[Any, Any], Awaitable[T]]) -> T:
    """Open the audit store a gateway config names and run ``work(store, settings)``."""
    from packetflow.federation.settings import load_settings, resolve
    from packetflow.federation.store import FederationStore

    settings = load_settings(config)

    async def run() -> T:
        store = await FederationStore.open(settings.federation.audit,
                                           resolve(config.parent, settings.state_dir),
                                           settings.audit_dsn)
        try:
            return await work(store, settings)
        finally:
            await store.aclose()

    return asyncio.run(run())


def _store_command(action: Callable[[], int]) -> int:
    from packetflow.federation.settings import ConfigError

    try:
        return action()
    except ConfigError as exc:
        for error in exc.errors:
            print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as exc:
        return _fail(str(exc))


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Verify the chain; every finding on stderr, exit 1 if any."""
    from packetflow.federation.audit import verify

    async def work(store: Any, _: Any) -> int:
        rows = await store.read()
        findings = verify(rows, await store.anchor(), head=args.head)
        for finding in findings:
            print(f"audit: {finding}", file=sys.stderr)
        if findings:
            return 1
        head = rows[-1].hash if rows else "(empty)"
        print(f"ok: {len(rows)} records, chain intact, head {head}")
        return 0

    return _store_command(lambda: _with_store(args.config, work))


def cmd_audit_export(args: argparse.Namespace) -> int:
    """Print records as JSON lines."""
    import time

    def action() -> int:
        now = time.time()
        since = parse_time(args.since, now)
        until = parse_time(args.until, now) if args.until else None

        async def work(store: Any, _: Any) -> int:
            for row in await store.read(since=since, until=until, peer=args.peer):
                sys.stdout.write(orjson.dumps(row.to_json()).decode() + "\n")
            return 0

        return _with_store(args.config, work)

    return _store_command(action)


def cmd_usage(args: argparse.Namespace) -> int:
    """Print usage and charges: a table or JSON."""
    import time

    from packetflow.federation.pricing import InvoiceLine, Usage, invoice

    def action() -> int:
        now = time.time()
        since = parse_time(args.since, now)
        until = parse_time(args.until, now) if args.until else now

        async def work(store: Any, settings: Any) -> list[InvoiceLine]:
            exports = {e.capability: e.pricing for e in settings.federation.exports}
            catalogs = await store.get_state("catalogs") or {}

            def pricing_of(usage: Usage) -> Any:
                if usage.direction == "inbound":
                    return exports.get(usage.capability)
                from packetflow.spec import Pricing

                found = (catalogs.get(usage.peer) or {}).get(usage.capability)
                return Pricing.model_validate(found) if found else None

            usages = await store.usage(since, until, args.peer)
            return invoice(usages, pricing_of, until - since)

        lines = _with_store(args.usage_config, work)
        if args.format == "json":
            print(orjson.dumps({"since": since, "until": until,
                                "lines": [line.to_json() for line in lines]},
                               option=orjson.OPT_INDENT_2).decode())
            return 0
        print(f"usage {_iso(since)} .. {_iso(until)}")
        header = ("direction", "peer", "capability", "calls", "ok", "errors", "denied",
                  "model", "amount")
        rows = [(ln.usage.direction, ln.usage.peer, ln.usage.capability, str(ln.usage.calls),
                 str(ln.usage.ok), str(ln.usage.errors), str(ln.usage.denied), ln.model,
                 f"{ln.amount:.6f} {ln.usage.currency}".strip()) for ln in lines]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths,
                                                                           strict=True)))
        totals: dict[tuple[str, str], float] = {}
        for line in lines:
            key = (line.usage.direction, line.usage.currency)
            totals[key] = totals.get(key, 0.0) + line.amount
        for (direction, currency), amount in sorted(totals.items()):
            label = "receivable" if direction == "inbound" else "payable"
            print(f"total {label}: {amount:.6f} {currency}".rstrip())
        return 0

    return _store_command(action)


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(
        timespec="seconds")
