"""The transport-neutral core: resolve, check input, run with a deadline, check output, count.

gRPC (and later MCP) servicers only translate their wire format to and from ``Engine`` calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from packetflow.access import AccessDenied
from packetflow.caching import RecentInputs, ResultCache
from packetflow.composition.check import check_compositions
from packetflow.composition.executor import Invoke, Remote
from packetflow.composition.metrics import StepMetrics
from packetflow.composition.remote import RemoteCaller
from packetflow.composition.triggers import IdempotencyStore, TriggerRunner
from packetflow.context import CallContext, Handler, suspends
from packetflow.contracts import CompiledContract
from packetflow.errors import (
    CapabilityNotFound,
    Code,
    ContractViolation,
    DeadlineExceeded,
    FieldViolation,
    HandlerFailed,
    InvalidInput,
    Overloaded,
    PacketFlowError,
    PayloadTooLarge,
    code_of,
)
from packetflow.feedback import RecentTraces
from packetflow.implementations import build_handler
from packetflow.manifests import ManifestError
from packetflow.metrics import RuntimeMetrics
from packetflow.spec import Capability, duration_seconds
from packetflow.validation import ImplementationError

if TYPE_CHECKING:
    from packetflow.security import CallGuard

log = logging.getLogger("packetflow.engine")

DEFAULT_MAX_PAYLOAD_BYTES = 4 * 1024 * 1024

T = TypeVar("T")
# Strong references to fire-and-forget close tasks, so they are not garbage-collected mid-way.
_background: set[asyncio.Task[None]] = set()


class _Unarmed(contextlib.nullcontext[None]):
    """Stands in for ``asyncio.Timeout`` around a handler that never suspends."""

    @staticmethod
    def expired() -> bool:
        return False


_NO_TIMEOUT = _Unarmed()


@dataclass
class ServedCapability:
    """A capability ready to serve: contracts compiled, handler built, counters bound."""

    capability: Capability
    requires: CompiledContract
    provides: CompiledContract
    handler: Handler
    metrics: RuntimeMetrics
    in_flight: int = 0
    retired: bool = False
    _calls_by_code: dict[Code, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        name = self.capability.name
        # Bind label children once: a labels() lookup per call is measurable on the hot path.
        self.duration = self.metrics.duration.labels(name)
        # Read at scrape time: the engine counts in_flight anyway, no per-call gauge update.
        self.metrics.in_flight.labels(name).set_function(lambda: self.in_flight)
        self.violations = self.metrics.contract_violations.labels(name)
        self.count(Code.OK, 0)  # so the series exists before the first call
        spec = self.capability.spec
        # Only results without effects may be reused, so only their repeats are worth counting.
        self.recent = None if spec.effects else RecentInputs()
        self.repeated = self.metrics.repeated_inputs.labels(name)
        self.cache = None if spec.cache is None else ResultCache(
            duration_seconds(spec.cache.ttl), spec.cache.max_entries)
        self.cache_hits = self.metrics.cache_hits.labels(name)
        if self.recent is not None:
            self.repeated.inc(0)

    @property
    def name(self) -> str:
        """The capability's name."""
        return self.capability.name

    async def close(self) -> None:
        """Release what the handler holds (connection pools), if it holds anything."""
        aclose = getattr(self.handler, "aclose", None)
        if aclose is not None:
            await aclose()

    def close_if_idle(self) -> None:
        """Close a retired entry's handler once no call is running on it."""
        if self.retired and self.in_flight == 0:
            task = asyncio.get_running_loop().create_task(self.close())
            _background.add(task)
            task.add_done_callback(_background.discard)

    def count(self, code: Code, amount: float = 1) -> None:
        """Count one call that ended with ``code``."""
        child = self._calls_by_code.get(code)
        if child is None:
            child = self._calls_by_code[code] = self.metrics.calls.labels(self.name, code.value)
        child.inc(amount)


def serve_capabilities(
    capabilities: Iterable[Capability], metrics: RuntimeMetrics, invoke: Invoke | None = None,
    remote: Remote | None = None, step_metrics: StepMetrics | None = None, *,
    catalog: Callable[[], list[Capability]] | None = None,
    planning: Callable[[], Any] | None = None,
) -> tuple[dict[str, ServedCapability], list[ManifestError]]:
    """Build the registry; capabilities whose implementation cannot load become errors."""
    served: dict[str, ServedCapability] = {}
    errors: list[ManifestError] = []
    for cap in capabilities:
        try:
            handler = build_handler(cap, invoke, remote, step_metrics, catalog=catalog,
                                    planning=planning)
        except ImplementationError as exc:
            errors.append(ManifestError(f"capability {cap.name}", exc.path, exc.message))
            continue
        served[cap.name] = ServedCapability(
            cap,
            CompiledContract.compile(cap.spec.requires),
            CompiledContract.compile(cap.spec.provides),
            handler,
            metrics,
        )
    return served, errors


class Engine:
    """Runs calls against a registry of served capabilities."""

    def __init__(
        self,
        capabilities: Iterable[Capability] = (),
        *,
        metrics: RuntimeMetrics | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        idempotency: IdempotencyStore | None = None,
        remote: RemoteCaller | None = None,
        undeclared_as_services: bool = False,
    ) -> None:
        self.metrics = metrics or RuntimeMetrics()
        self.max_payload_bytes = max_payload_bytes
        self.remote = remote or RemoteCaller()
        # On Kubernetes a pod serves one capability: a step naming another one calls the
        # Service of that name (the operator names each Capability's Service after it).
        self.undeclared_as_services = undeclared_as_services
        self.step_metrics = StepMetrics(self.metrics.registry)
        self.served: dict[str, ServedCapability] = {}
        # Which capability served each recent trace id: feedback names only the trace.
        self.traces = RecentTraces()
        # The planner's shared services (store, feedback), set by whoever serves the engine.
        self.planning: Any = None
        # Zero trust: who calls over the wire, and their access policies; None: off.
        self.guard: CallGuard | None = None
        self._verified: set[str] = set()  # capabilities whose remote checks passed
        # Event-driven compositions; schedules fire once ``start_triggers`` is called.
        self.triggers = TriggerRunner(self.invoke, {}, idempotency)
        self.load_errors = self.replace(capabilities)

    def replace(self, capabilities: Iterable[Capability]) -> list[ManifestError]:
        """Swap in a new set of capabilities (reload); calls in flight finish on the old ones.

        Unchanged capabilities keep their entry (and handler, e.g. an HTTP connection pool);
        the handlers of changed or removed ones are closed once their last call ends.
        """
        capabilities = list(capabilities)
        errors = [
            ManifestError(f"capability {name}", error.path, error.message)
            for name, found in check_compositions(
                capabilities, undeclared_remote=self.undeclared_as_services).items()
            for error in found
        ]
        rejected = {error.source.removeprefix("capability ") for error in errors}
        capabilities = [c for c in capabilities if c.name not in rejected]
        unchanged = [c for c in capabilities if (old := self.served.get(c.name)) is not None
                     and old.capability == c]
        changed = [c for c in capabilities if c not in unchanged]
        self._verified &= {c.name for c in unchanged}
        served, build_errors = serve_capabilities(changed, self.metrics, self.invoke_routed,
                                                  self.remote, self.step_metrics,
                                                  catalog=self.capabilities,
                                                  planning=lambda: self.planning)
        errors += build_errors
        served.update({c.name: self.served[c.name] for c in unchanged})
        for name, old in self.served.items():
            if served.get(name) is not old:
                old.retired = True
                old.close_if_idle()
        self.served = dict(sorted(served.items()))
        self.triggers.update({
            name: list(entry.capability.spec.implementation.composition.triggers)
            for name, entry in self.served.items()
            if entry.capability.spec.implementation.composition is not None
            and entry.capability.spec.implementation.composition.triggers})
        return errors

    async def verify_remotes(self, timeout: float = 5.0) -> list[ManifestError]:
        """Check what only a remote can tell (an MCP tool exists, and its schemas), for every
        handler that can (``verify``) and has not yet; errors name the manifest field."""
        checks = {name: verify for name, entry in self.served.items()
                  if (verify := getattr(entry.handler, "verify", None)) is not None
                  and name not in self._verified}
        results = await asyncio.gather(*(verify(timeout) for verify in checks.values()),
                                       return_exceptions=True)
        errors: list[ManifestError] = []
        for name, result in zip(checks, results, strict=True):
            if isinstance(result, ImplementationError):
                errors.append(ManifestError(f"capability {name}", result.path, result.message))
            elif isinstance(result, BaseException):
                raise result
            else:
                self._verified.add(name)
        return errors

    def start_triggers(self) -> None:
        """Start firing scheduled compositions (completion triggers need no start)."""
        self.triggers.start()

    async def aclose(self) -> None:
        """Close every handler that holds resources (on shutdown)."""
        await self.triggers.close()
        for entry in self.served.values():
            entry.retired = True
            await entry.close()
        await self.remote.close()

    def capabilities(self) -> list[Capability]:
        """The capabilities served now (what a planner plans over)."""
        return [entry.capability for entry in self.served.values()]

    def get(self, name: str) -> ServedCapability:
        """The served capability called ``name``, or CapabilityNotFound."""
        entry = self.served.get(name)
        if entry is None:
            raise CapabilityNotFound(name)
        return entry

    def decode_input(self, payload: bytes) -> Any:
        """Parse a JSON payload, enforcing the size limit."""
        if len(payload) > self.max_payload_bytes:
            raise PayloadTooLarge(
                f"input is {len(payload)} bytes; the limit is {self.max_payload_bytes}")
        try:
            return orjson.loads(payload) if payload else {}
        except orjson.JSONDecodeError as exc:
            raise InvalidInput([FieldViolation("input", f"not valid JSON: {exc}")]) from None

    async def invoke_json(self, name: str, payload: bytes, ctx: CallContext) -> bytes:
        """``invoke`` with JSON bytes in and out, as the wire carries them."""
        entry = self.get(name)
        self.traces.served(ctx.trace_id, name)
        if entry.recent is not None:
            if entry.recent.seen(hash(payload)):
                entry.repeated.inc()
            if entry.cache is not None and (cached := entry.cache.get(payload)) is not None:
                entry.cache_hits.inc()
                entry.count(Code.OK)
                entry.duration.observe(0.0)
                return cached
        try:
            value = self.decode_input(payload)
        except PacketFlowError as exc:
            entry.count(code_of(exc))
            raise
        output = await self._run(entry, value, ctx, lambda output: self._encode(entry, output))
        if entry.cache is not None:
            entry.cache.put(payload, output)
        return output

    async def invoke_routed(self, name: str, value: Any, ctx: CallContext) -> dict[str, Any]:
        """A call made from inside the runtime (a composition step, an actor's ``ctx.call``):
        here, or (``undeclared_as_services``) at the Service named after a capability this
        runtime does not serve."""
        if self.undeclared_as_services and name not in self.served:
            return await self.remote(name, name, value, ctx)
        return await self.invoke(name, value, ctx)

    async def invoke(self, name: str, value: Any, ctx: CallContext) -> dict[str, Any]:
        """Run one call: check input, run the handler within the deadline, check output."""
        return await self._run(self.get(name), value, ctx, lambda output: output)

    def authorize(self, entry: ServedCapability, ctx: CallContext) -> None:
        """Refuse (:class:`AccessDenied`) a proven caller the capability's access policy does
        not admit; calls made inside the process (no principal) were authorized at the edge."""
        if ctx.principal is not None and self.guard is not None:
            self.guard.authorize("capability", entry.name, entry.capability.spec.access,
                                 ctx.principal)

    async def _run(self, entry: ServedCapability, value: Any, ctx: CallContext,
                   finish: Callable[[dict[str, Any]], T]) -> T:
        """Admission, metrics and the checked call; ``finish`` shapes the output (e.g. encodes)."""
        if ctx.principal is not None:
            try:
                self.authorize(entry, ctx)
            except AccessDenied:
                entry.count(Code.PERMISSION_DENIED)
                raise
        spec = entry.capability.spec
        if entry.in_flight >= spec.concurrency:
            entry.count(Code.RESOURCE_EXHAUSTED)
            raise Overloaded(f"capability {entry.name!r} is at its concurrency limit "
                             f"({spec.concurrency} calls in flight)")
        entry.in_flight += 1
        started = time.perf_counter()
        code = Code.INTERNAL
        output: dict[str, Any] | None = None
        try:
            output = await self._checked_call(entry, value, ctx)
            result = finish(output)
            code = Code.OK
            return result
        except PacketFlowError as exc:
            code = code_of(exc)
            raise
        except asyncio.CancelledError:
            code = Code.CANCELLED
            raise
        finally:
            entry.in_flight -= 1
            entry.count(code)
            entry.duration.observe(time.perf_counter() - started)
            if entry.retired:
                entry.close_if_idle()
            if entry.name in self.triggers.watched:
                self.triggers.completed(entry.name, value, code, output if code == Code.OK
                                        else None, ctx.trace_id, uuid.uuid4().hex)

    async def _checked_call(self, entry: ServedCapability, value: Any,
                            ctx: CallContext) -> dict[str, Any]:
        value, violations = entry.requires.check(value, "input")
        if violations:
            raise InvalidInput(violations)
        spec = entry.capability.spec
        loop = asyncio.get_running_loop()
        limit = loop.time() + spec.timeout_seconds
        ctx.deadline = limit if ctx.deadline is None else min(ctx.deadline, limit)
        ctx.effects = tuple(spec.effects)
        handler = entry.handler
        timeout = asyncio.timeout_at(ctx.deadline) if suspends(handler) else _NO_TIMEOUT
        try:
            async with timeout:
                output = await handler(value, ctx)
        except PacketFlowError:
            raise
        except TimeoutError:
            if timeout.expired():
                raise DeadlineExceeded(
                    f"capability {entry.name!r} did not finish before the deadline") from None
            raise self._handler_failed(entry, ctx) from None
        except Exception:
            raise self._handler_failed(entry, ctx) from None
        output, violations = entry.provides.check(output, "output")
        if violations:
            entry.violations.inc()
            raise ContractViolation(entry.name, violations)
        return output

    def _encode(self, entry: ServedCapability, output: dict[str, Any]) -> bytes:
        try:
            return orjson.dumps(output)
        except TypeError as exc:
            entry.violations.inc()
            raise ContractViolation(
                entry.name, [FieldViolation("output", f"not JSON-serializable: {exc}")]) from None

    @staticmethod
    def _handler_failed(entry: ServedCapability, ctx: CallContext) -> HandlerFailed:
        # The traceback goes to the server log only; the caller gets the trace id to quote.
        log.exception("handler of %s raised (trace_id=%s)", entry.name, ctx.trace_id)
        return HandlerFailed(f"capability {entry.name!r} failed; see the runtime log for "
                             f"trace id {ctx.trace_id}")
