"""Organizations for the federation tests: certificates, gateway configs, a running exporter
runtime and both gateways (real grpc.aio servers, real TLS 1.3, real SQLite audit logs)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from packetflow.context import CallContext
from packetflow.engine import Engine
from packetflow.federation.audit import Chained
from packetflow.federation.gateway import Gateway
from packetflow.identity.certs import Issued, issue, new_authority
from packetflow.identity.spiffe import SpiffeId
from packetflow.identity.tls import channel_credentials, load_credentials
from packetflow.manifests import load_text, parse_document
from packetflow.serve import secure_engine
from packetflow.server import RuntimeServer
from packetflow.settings import RuntimeSettings
from packetflow.spec import Federation as FederationManifest
from packetflow.v1 import federation_pb2_grpc, runtime_pb2_grpc

# What the exporter's capabilities saw: one entry per call that reached them.
CALLS: list[dict[str, Any]] = []


def _seen(capability: str, ctx: CallContext, **extra: Any) -> None:
    CALLS.append({"capability": capability, "trace_id": ctx.trace_id, "caller": ctx.caller,
                  "remaining": ctx.time_remaining(), **extra})


async def translate(text: str, ctx: CallContext) -> dict[str, Any]:
    """Globex's exported capability."""
    _seen("translate", ctx, text=text)
    return {"text": f"[fr] {text}"}


async def payroll(ctx: CallContext) -> dict[str, Any]:
    """Globex's capability exported to nobody."""
    _seen("payroll", ctx)
    return {"total": 1_000_000}


async def slow(seconds: float, ctx: CallContext) -> dict[str, Any]:
    """Sleeps: for deadlines."""
    _seen("slow", ctx)
    await asyncio.sleep(seconds)
    return {"done": True}


async def sale(amount: float, ctx: CallContext) -> dict[str, Any]:
    """Reports revenue (for revenue-share pricing)."""
    _seen("sale", ctx)
    return {"revenue": amount}


EXPORTER_MANIFESTS = """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: translate}
spec:
  intent: Translate into French
  requires: {text: {type: string}}
  provides: {text: {type: string}}
  implementation: {python: {module: tests.support.federation, function: translate}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: payroll}
spec:
  intent: Never exported
  provides: {total: {type: number}}
  implementation: {python: {module: tests.support.federation, function: payroll}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: slow}
spec:
  intent: Take a while
  requires: {seconds: {type: number}}
  provides: {done: {type: boolean}}
  implementation: {python: {module: tests.support.federation, function: slow}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: sale}
spec:
  intent: Sell something
  requires: {amount: {type: number}}
  provides: {revenue: {type: number}}
  implementation: {python: {module: tests.support.federation, function: sale}}
"""

DEFAULT_EXPORTS = """
    - {capability: translate, to: [acme], pricing: {perExecution: 0.5, currency: EUR},
       sla: {latencyP99Ms: 5000, availability: 50, probe: {input: {text: probe}, every: 1s}}}
    - {capability: slow, to: [acme]}
    - {capability: sale, to: [acme], pricing: {revenueShare: {percent: 10, field: revenue}}}
    - {capability: payroll, to: [initech]}
"""
DEFAULT_TRUST = "{minimumScore: 0.5, priorWeight: 10}"


@dataclass
class Org:
    """One organization: its trust domain's authority and its gateway's files."""

    name: str
    directory: Path
    authority: Issued

    @property
    def domain(self) -> str:
        """Its trust domain."""
        return f"{self.name}.example"

    @property
    def ca(self) -> Path:
        """Its trust bundle file (what peers configure)."""
        return self.directory / "ca.crt"

    @property
    def cert(self) -> Path:
        """Its gateway's certificate file."""
        return self.directory / "tls.crt"

    @property
    def key(self) -> Path:
        """Its gateway's key file."""
        return self.directory / "tls.key"

    def leaf(self, **options: Any) -> Issued:
        """A new gateway certificate of this organization (options go to ``issue``)."""
        spiffe_id = options.pop("spiffe_id", SpiffeId.of(self.domain, "federation",
                                                          "gateway"))
        return issue(self.authority, spiffe_id, dns_names=["localhost"],
                     ip_addresses=["127.0.0.1"], **options)

    def install(self, leaf: Issued) -> None:
        """Make ``leaf`` the gateway's certificate (key first, each file atomically)."""
        write_atomically(self.key, leaf.key_pem)
        write_atomically(self.cert, leaf.certificate_pem)


def write_atomically(path: Path, data: bytes) -> None:
    """Write a file by rename, as `packetflow federation certs` and kubelet do."""
    temporary = path.with_name(f".{path.name}.new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def make_org(base: Path, name: str) -> Org:
    """An organization with a fresh authority and a gateway certificate."""
    directory = base / name
    directory.mkdir(parents=True)
    org = Org(name, directory, new_authority(f"{name}.example", name))
    write_atomically(org.ca, org.authority.certificate_pem)
    org.install(org.leaf())
    return org


def config_text(org: Org, peers: list[tuple[Org, str]], *, exports: str = "",
                imports: str = "", trust: str = DEFAULT_TRUST, runtime: str | None = None,
                listen: str = "127.0.0.1:0", local: str = "127.0.0.1:0", http: str = "",
                extra: str = "") -> str:
    """A gateway config (a Federation manifest with a gateway section)."""
    peer_lines = "".join(
        f"    - {{name: {peer.name}, organization: {peer.name}, trustDomain: {peer.domain}, "
        f"endpoint: '{endpoint}', trustBundle: {{file: {peer.ca}}}}}\n"
        for peer, endpoint in peers)
    return (
        "apiVersion: packetflow.io/v1alpha1\nkind: Federation\nmetadata: {name: partners}\n"
        f"spec:\n  organization: {org.name}\n  trustDomain: {org.domain}\n"
        f"  identity: {{certFile: {org.cert}, keyFile: {org.key}}}\n"
        f"  peers:\n{peer_lines}"
        + (f"  exports:{exports}" if exports else "")
        + (f"  imports:{imports}" if imports else "")
        + f"  trust: {trust}\n"
        f"gateway:\n  listen: '{listen}'\n  local: '{local}'\n  metrics_address: '{http}'\n"
        f"  state_dir: {org.directory / 'state'}\n  catalog_refresh_seconds: 0.2\n"
        f"  reload_seconds: 0.1\n"
        + (f"  runtime: '{runtime}'\n" if runtime else "") + extra)


@dataclass
class Federation:
    """acme imports globex's translate; globex also trusts initech (which has no gateway)."""

    acme: Org
    globex: Org
    initech: Org
    runtime: RuntimeServer
    exporter: Gateway  # globex's gateway
    importer: Gateway  # acme's gateway
    configs: dict[str, Path]
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    exporter_extra: str = ""  # more of globex's gateway section, kept by every rewrite

    def write_exporter_config(self, *, peers: list[tuple[Org, str]] | None = None,
                              exports: str = DEFAULT_EXPORTS, trust: str = DEFAULT_TRUST,
                              extra: str = "") -> None:
        """Rewrite globex's config (its gateway reloads it)."""
        http = f"127.0.0.1:{self.exporter.http_port}" if self.exporter.http_port else ""
        write_atomically(self.configs["globex"], config_text(
            self.globex, peers if peers is not None else self.exporter_peers(),
            exports=exports, trust=trust, runtime=f"127.0.0.1:{self.runtime.port}",
            http=http, extra=self.exporter_extra + extra).encode())

    def exporter_peers(self) -> list[tuple[Org, str]]:
        """globex's peers: acme (at its gateway) and initech (nowhere)."""
        return [(self.acme, f"127.0.0.1:{self.importer.peer_port}"),
                (self.initech, "127.0.0.1:1")]

    def local_stub(self) -> runtime_pb2_grpc.CapabilityRuntimeStub:
        """A client of acme's gateway's local port (imports as capabilities)."""
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.importer.local_port}")
        self.channels.append(channel)
        return runtime_pb2_grpc.CapabilityRuntimeStub(channel)

    def peer_stub(self, cert: bytes, key: bytes, port: int | None = None,
                  trust: bytes | None = None) -> federation_pb2_grpc.FederationStub:
        """A raw peer client presenting ``cert``/``key`` to globex's gateway (or ``port``)."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=trust or self.globex.ca.read_bytes(), private_key=key,
            certificate_chain=cert)
        channel = grpc.aio.secure_channel(f"127.0.0.1:{port or self.exporter.peer_port}",
                                          credentials)
        self.channels.append(channel)
        return federation_pb2_grpc.FederationStub(channel)

    def acme_stub(self) -> federation_pb2_grpc.FederationStub:
        """A raw peer client with acme's current gateway certificate."""
        credentials = load_credentials(self.acme.cert, self.acme.key)
        channel = grpc.aio.secure_channel(
            f"127.0.0.1:{self.exporter.peer_port}",
            channel_credentials(credentials, self.globex.ca.read_bytes()))
        self.channels.append(channel)
        return federation_pb2_grpc.FederationStub(channel)


async def audit_of(gateway: Gateway) -> list[Chained]:
    """Every record of a gateway's audit log."""
    assert gateway.store is not None
    return await gateway.store.read()


async def wait_ready(gateway: Gateway, name: str, timeout: float = 30.0) -> None:
    """Until ``gateway`` serves the import ``name``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while gateway.imports[name].problem is not None:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"import {name}: {gateway.imports[name].problem}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_federation(base: Path, *, exports: str = DEFAULT_EXPORTS,
                             trust: str = DEFAULT_TRUST, importer_trust: str = DEFAULT_TRUST,
                             http: bool = False, runtime_settings: RuntimeSettings | None = None,
                             exporter_extra: str = "", ready: bool = True
                             ) -> AsyncIterator[Federation]:
    """globex's runtime and gateway, acme's gateway, running; stopped afterwards. With
    ``http``, globex's gateway serves /metrics and /status (``exporter.http_port``); with
    ``runtime_settings``, the runtime is secured by them (zero trust: its TLS files);
    ``exporter_extra`` adds to globex's gateway section; ``ready``: wait until acme's
    import of translate can be called."""
    CALLS.clear()
    acme, globex, initech = (make_org(base, name) for name in ("acme", "globex", "initech"))
    loaded = load_text(EXPORTER_MANIFESTS, "tests/support/federation.py")
    assert not loaded.errors, loaded.errors
    # Each part is stopped (last started, first stopped) whatever fails after it started,
    # setup included: a grpc.aio server left running holds the test's event loop at exit.
    async with contextlib.AsyncExitStack() as stack:
        engine = Engine(loaded.capabilities)
        stack.push_async_callback(engine.aclose)
        if runtime_settings is not None:
            assert secure_engine(engine, runtime_settings) is not None
        runtime = await RuntimeServer.start(engine, "127.0.0.1:0")
        stack.push_async_callback(runtime.stop, 0)
        configs = {"globex": globex.directory / "federation.yaml",
                   "acme": acme.directory / "federation.yaml"}
        # globex starts first (acme's endpoint is unknown until acme listens; globex reloads).
        write_atomically(configs["globex"], config_text(
            globex, [(acme, "127.0.0.1:1"), (initech, "127.0.0.1:1")], exports=exports,
            trust=trust, runtime=f"127.0.0.1:{runtime.port}",
            http="127.0.0.1:0" if http else "", extra=exporter_extra).encode())
        exporter = Gateway(configs["globex"])
        stack.push_async_callback(exporter.stop, 0)  # before start: it may fail half way
        await exporter.start()
        write_atomically(configs["acme"], config_text(
            acme, [(globex, f"127.0.0.1:{exporter.peer_port}")], trust=importer_trust,
            imports="\n    - {peer: globex, capability: translate, as: globex-translate}\n"
                    "    - {peer: globex, capability: slow, as: globex-slow}\n"
                    "    - {peer: globex, capability: sale, as: globex-sale}\n").encode())
        importer = Gateway(configs["acme"])
        stack.push_async_callback(importer.stop, 0)
        await importer.start()
        federation = Federation(acme, globex, initech, runtime, exporter, importer, configs,
                                exporter_extra=exporter_extra)
        stack.push_async_callback(close_channels, federation)
        federation.write_exporter_config(exports=exports, trust=trust)
        if ready:
            await wait_ready(importer, "globex-translate")
        yield federation


async def close_channels(federation: Federation) -> None:
    """Close the channels the test opened to the gateways."""
    for channel in federation.channels:
        await channel.close()


def expired(org: Org) -> Issued:
    """A certificate of ``org`` that expired yesterday."""
    now = datetime.datetime.now(datetime.UTC)
    return org.leaf(not_before=now - datetime.timedelta(days=10),
                    valid_for=datetime.timedelta(days=9))


def not_yet_valid(org: Org) -> Issued:
    """A certificate of ``org`` valid from tomorrow."""
    now = datetime.datetime.now(datetime.UTC)
    return org.leaf(not_before=now + datetime.timedelta(days=1),
                    valid_for=datetime.timedelta(days=9))


# The issue's Federation (plus a second peer, initech, with an export of its own).
ISSUE_MANIFEST = """
apiVersion: packetflow.io/v1alpha1
kind: Federation
metadata: {name: partners}
spec:
  organization: acme
  trustDomain: acme.example
  identity: {secretName: pf-federation-tls}
  endpoint: {port: 8443, service: {type: LoadBalancer}}
  peers:
    - name: globex
      organization: globex
      trustDomain: globex.example
      endpoint: federation.globex.example:8443
      trustBundle: {configMapRef: {name: globex-ca, key: ca.crt}}
    - name: initech
      organization: initech
      trustDomain: initech.example
      endpoint: 10.0.0.7:8443
      trustBundle: {configMapRef: {name: initech-ca}}
  exports:
    - capability: sentiment
      to: [globex]
      rateLimit: {perMinute: 600}
      pricing: {perExecution: 0.002, currency: USD}
      sla: {latencyP99Ms: 200, availability: 99.5, probe: {input: {text: "good"}}}
    - {capability: payroll, to: [initech]}
  imports:
    - {peer: globex, capability: translate, as: globex-translate}
  trust: {minimumScore: 0.8, halfLife: 72h}
"""


def issue_body(**spec: Any) -> dict[str, Any]:
    """The issue's Federation as plain data, with ``spec`` fields replaced."""
    data: dict[str, Any] = yaml.safe_load(ISSUE_MANIFEST)
    data["spec"].update(spec)
    return data


def issue_federation(**spec: Any) -> FederationManifest:
    """The issue's Federation, validated."""
    parsed = parse_document(issue_body(**spec))
    assert isinstance(parsed, FederationManifest), parsed
    return parsed
