"""The builtin capabilities: echo, transform, template, http (against a real local server)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jmespath
import pytest
from pydantic import ValidationError

from packetflow.builtins import HttpHandler, builtin_handler
from packetflow.context import CallContext, Handler, suspends
from packetflow.errors import DeadlineExceeded, FieldViolation, InvalidInput, Unavailable
from packetflow.spec import BuiltinImplementation


def make(name: str, **config: Any) -> Handler:
    return builtin_handler(BuiltinImplementation.model_validate({"name": name, "config": config}))


def ctx(deadline: float | None = None) -> CallContext:
    return CallContext(capability="t", trace_id="x", deadline=deadline)


async def test_only_the_http_builtin_needs_a_deadline_armed() -> None:
    # The engine skips the timeout for handlers that never await; a wrong mark would let an
    # http call outlive its deadline.
    pure = [make("echo"), make("transform", expression="a"), make("template", template="x")]
    assert not any(suspends(handler) for handler in pure)
    http = make("http", url="http://127.0.0.1:1/x", allowedHosts=["127.0.0.1"])
    assert suspends(http)
    await http.aclose()  # type: ignore[attr-defined]


# --- echo -------------------------------------------------------------------------------------


async def test_echo_returns_a_copy_of_its_input() -> None:
    value = {"a": 1, "b": {"c": [1, 2]}}
    out = await make("echo")(value, ctx())
    assert out == value
    assert out is not value


# --- transform --------------------------------------------------------------------------------


async def test_transform_nested_expression() -> None:
    handler = make("transform",
                   expression="{name: user.name, tags: items[].tag, count: length(items)}")
    out = await handler({"user": {"name": "ada"}, "items": [{"tag": "a"}, {"tag": "b"}]}, ctx())
    assert out == {"name": "ada", "tags": ["a", "b"], "count": 2}
    assert type(out) is dict  # not jmespath's default OrderedDict


async def test_transform_returns_non_objects_as_they_are() -> None:
    # The engine's provides check rejects a non-object; the builtin does not duplicate it.
    out: Any = await make("transform", expression="n")({"n": 3}, ctx())
    assert out == 3


async def test_transform_type_error_is_invalid_input() -> None:
    with pytest.raises(InvalidInput) as info:
        await make("transform", expression="length(n)")({"n": 3}, ctx())
    assert info.value.violations[0].field == "input"


async def test_transform_compiles_once(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = 0
    real = jmespath.compile

    def counting(expression: str) -> Any:
        nonlocal compiled
        compiled += 1
        return real(expression)

    monkeypatch.setattr(jmespath, "compile", counting)
    handler = make("transform", expression="{a: a}")
    built = compiled
    for i in range(3):
        assert await handler({"a": i}, ctx()) == {"a": i}
    assert compiled == built


# --- template ---------------------------------------------------------------------------------


async def test_template_walks_into_objects_and_renders_json_values() -> None:
    handler = make("template", template="${user.name} has ${n} ${items.0}, ok=$ok, $meta")
    out = await handler({"user": {"name": "Ada"}, "n": 3, "items": ["cats"], "ok": True,
                         "meta": {"a": [1, "x"]}}, ctx())
    assert out == {"text": 'Ada has 3 cats, ok=true, {"a":[1,"x"]}'}


async def test_template_output_field_and_dollar_escape() -> None:
    handler = make("template", template="costs $$${price}", output="label")
    assert await handler({"price": 5}, ctx()) == {"label": "costs $5"}


async def test_template_missing_fields_are_named() -> None:
    handler = make("template", template="Hello ${user.name} from ${city} (${user.age})")
    with pytest.raises(InvalidInput) as info:
        await handler({"user": {"age": None}}, ctx())
    assert info.value.violations == [
        FieldViolation("input.user.name", "required by the template but missing"),
        FieldViolation("input.city", "required by the template but missing"),
        FieldViolation("input.user.age", "required by the template but null"),
    ]


async def test_template_path_through_a_non_object_is_missing() -> None:
    with pytest.raises(InvalidInput) as info:
        await make("template", template="${user.name}")({"user": "ada"}, ctx())
    assert [v.field for v in info.value.violations] == ["input.user.name"]


# --- http: a real server on 127.0.0.1 ---------------------------------------------------------


@dataclass
class Upstream:
    """A local HTTP server; ``release`` lets the /slow requests answer."""

    base: str
    port: int
    release: threading.Event
    requests: list[dict[str, Any]] = field(default_factory=list)


def _request_handler(upstream: Upstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean

        def _reply(self, status: int, content_type: str, body: bytes,
                   extra: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass  # the client gave up (deadline tests)

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            seen = {"method": self.command, "path": self.path,
                    "body": json.loads(raw) if raw else None,
                    "contentType": self.headers.get("Content-Type"),
                    "token": self.headers.get("X-Token")}
            upstream.requests.append(seen)
            if self.path.startswith("/slow"):
                upstream.release.wait(timeout=30)
                self._reply(200, "text/plain", b"late")
            elif self.path.startswith("/text"):
                self._reply(200, "text/plain; charset=utf-8", "héllo".encode())
            elif self.path.startswith("/problem"):
                self._reply(404, "application/problem+json", b'{"title": "nope"}')
            elif self.path.startswith("/badjson"):
                self._reply(200, "application/json", b"not json")
            elif self.path.startswith("/redirect"):
                self._reply(302, "text/plain", b"", {"Location": "http://evil.invalid/"})
            else:
                self._reply(200, "application/json", json.dumps(seen).encode(),
                            {"X-Upstream": "yes"})

        do_GET = do_POST = do_PUT = do_DELETE = _handle

    return Handler


@pytest.fixture(scope="module")
def server() -> Iterator[Upstream]:
    # One server per module: shutting one down takes a poll interval (0.5 s).
    upstream = Upstream("", 0, threading.Event())
    server = ThreadingHTTPServer(("127.0.0.1", 0), _request_handler(upstream))
    server.daemon_threads = True
    upstream.port = server.server_address[1]
    upstream.base = f"http://127.0.0.1:{upstream.port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield upstream
    upstream.release.set()
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def upstream(server: Upstream) -> Iterator[Upstream]:
    server.requests.clear()
    yield server
    server.release.set()  # lets this test's /slow requests finish
    server.release = threading.Event()


@pytest.fixture
async def make_http() -> AsyncIterator[Callable[..., HttpHandler]]:
    made: list[HttpHandler] = []

    def build(**config: Any) -> HttpHandler:
        config.setdefault("allowedHosts", ["127.0.0.1"])
        handler = make("http", **config)
        assert isinstance(handler, HttpHandler)
        made.append(handler)
        return handler

    yield build
    for handler in made:
        await handler.aclose()


async def test_http_get_fills_and_quotes_url_placeholders(
        upstream: Upstream, make_http: Callable[..., HttpHandler]) -> None:
    handler = make_http(url=upstream.base + "/users/${user.id}?q=${q}",
                        headers={"X-Token": "t0k"})
    out = await handler({"user": {"id": 7}, "q": "a b/../x?y=1#z&w"}, ctx())
    assert out["status"] == 200
    assert out["headers"]["content-type"] == "application/json"
    assert out["headers"]["x-upstream"] == "yes"
    body = out["body"]
    assert body["method"] == "GET"
    assert body["path"] == "/users/7?q=a%20b%2F..%2Fx%3Fy%3D1%23z%26w"
    assert body["token"] == "t0k"
    assert body["body"] is None  # sendInput is off


async def test_http_post_sends_input_as_json(
        upstream: Upstream, make_http: Callable[..., HttpHandler]) -> None:
    handler = make_http(url=upstream.base + "/items", method="POST", sendInput=True)
    out = await handler({"name": "x", "n": [1, 2]}, ctx())
    assert out["body"]["method"] == "POST"
    assert out["body"]["body"] == {"name": "x", "n": [1, 2]}
    assert out["body"]["contentType"] == "application/json"


async def test_http_body_is_json_only_when_the_response_says_so(
        upstream: Upstream, make_http: Callable[..., HttpHandler]) -> None:
    text = await make_http(url=upstream.base + "/text")({}, ctx())
    assert text["body"] == "héllo"
    problem = await make_http(url=upstream.base + "/problem")({}, ctx())
    assert (problem["status"], problem["body"]) == (404, {"title": "nope"})
    bad = await make_http(url=upstream.base + "/badjson")({}, ctx())
    assert bad["body"] == "not json"


async def test_http_does_not_follow_redirects(
        upstream: Upstream, make_http: Callable[..., HttpHandler]) -> None:
    out = await make_http(url=upstream.base + "/redirect")({}, ctx())
    assert out["status"] == 302
    assert out["headers"]["location"] == "http://evil.invalid/"


async def test_http_reuses_its_client_and_survives_aclose(
        upstream: Upstream, make_http: Callable[..., HttpHandler]) -> None:
    handler = make_http(url=upstream.base + "/echo")
    await asyncio.gather(*(handler({}, ctx()) for _ in range(5)))
    await handler.aclose()
    assert (await handler({}, ctx()))["status"] == 200
    assert len(upstream.requests) == 6


async def test_http_upstream_down_is_unavailable(make_http: Callable[..., HttpHandler]) -> None:
    # Bound but not listening: connecting is refused, and no other test can take the port.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        handler = make_http(url=f"http://127.0.0.1:{port}/x")
        with pytest.raises(Unavailable, match=rf"http: cannot reach 127\.0\.0\.1:{port}: "):
            await handler({}, ctx())


@pytest.mark.parametrize("host", ["localhost", "evil.invalid/@127.0.0.1", "127.0.0.1:1"])
async def test_http_templated_host_must_be_allowed(
        upstream: Upstream, make_http: Callable[..., HttpHandler], host: str) -> None:
    handler = make_http(url="http://${host}:" + f"{upstream.port}/echo/${{path}}")
    with pytest.raises(InvalidInput) as info:
        await handler({"host": host, "path": "p"}, ctx())
    assert [v.field for v in info.value.violations] == ["input.host"]
    assert upstream.requests == []
    # The same template reaches an allowed host.
    out = await handler({"host": "127.0.0.1", "path": "p"}, ctx())
    assert out["body"]["path"] == "/echo/p"


async def test_http_missing_url_field_is_invalid_input(
        upstream: Upstream, make_http: Callable[..., HttpHandler]) -> None:
    handler = make_http(url=upstream.base + "/users/${id}")
    with pytest.raises(InvalidInput) as info:
        await handler({}, ctx())
    assert info.value.violations == [
        FieldViolation("input.id", "required by the template but missing")]


async def test_http_slow_upstream_past_the_callers_deadline(
        upstream: Upstream, make_http: Callable[..., HttpHandler]) -> None:
    handler = make_http(url=upstream.base + "/slow", timeoutSeconds=30)
    deadline = asyncio.get_running_loop().time() + 0.2
    with pytest.raises(DeadlineExceeded):
        await handler({}, ctx(deadline))


async def test_http_slow_upstream_past_its_own_timeout_is_unavailable(
        upstream: Upstream, make_http: Callable[..., HttpHandler]) -> None:
    handler = make_http(url=upstream.base + "/slow", timeoutSeconds=0.2)
    deadline = asyncio.get_running_loop().time() + 30
    with pytest.raises(Unavailable, match=r"no answer within 0\.2s"):
        await handler({}, ctx(deadline))


async def test_http_no_time_left_makes_no_request(
        upstream: Upstream, make_http: Callable[..., HttpHandler]) -> None:
    handler = make_http(url=upstream.base + "/echo")
    with pytest.raises(DeadlineExceeded):
        await handler({}, ctx(asyncio.get_running_loop().time() - 1))
    assert upstream.requests == []


# --- config errors when the manifest loads ----------------------------------------------------


@pytest.mark.parametrize(("name", "config", "message"), [
    ("transform", {"expression": "foo["}, "config.expression: invalid JMESPath expression"),
    ("transform", {}, "config.expression: Field required"),
    ("template", {"template": "${"}, "config.template: invalid template"),
    ("template", {"template": "x", "output": "no-dash"}, "config.output"),
    ("echo", {"bogus": 1}, "config.bogus: Extra inputs are not permitted"),
    ("http", {"url": "http://a.test/", "allowedHosts": ["a.test"], "verb": "GET"},
     "config.verb: Extra inputs are not permitted"),
    ("http", {"url": "http://evil.test/x", "allowedHosts": ["a.test"]},
     "url host 'evil.test:80' is not in allowedHosts"),
    # The authority ends at "?" and "#" too: the host here is evil.test, not a.test.
    ("http", {"url": "http://evil.test?@a.test/", "allowedHosts": ["a.test"]},
     "url host 'evil.test:80' is not in allowedHosts"),
    ("http", {"url": "http://evil.test#@a.test/", "allowedHosts": ["a.test"]},
     "url host 'evil.test:80' is not in allowedHosts"),
    ("http", {"url": "http://a.test:8080/", "allowedHosts": ["a.test:9090"]},
     "url host 'a.test:8080' is not in allowedHosts"),
    ("http", {"url": "ftp://a.test/", "allowedHosts": ["a.test"]}, "config.url"),
    ("http", {"url": "http://a.test/", "allowedHosts": []}, "config.allowedHosts"),
    ("http", {"url": "http://a.test/", "allowedHosts": ["a.test"], "method": "TRACE"},
     "config.method"),
])
def test_bad_config_fails_manifest_validation(
        name: str, config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("?", r"\?")):
        BuiltinImplementation.model_validate({"name": name, "config": config})


@pytest.mark.parametrize(("url", "allowed"), [
    ("http://a.test:8080/x", ["a.test"]),  # a bare host allows every port
    ("https://a.test/x", ["a.test:443"]),  # the default port is filled in
    ("http://user@A.TEST/x", ["a.test"]),
    ("http://[::1]:8080/x", ["[::1]"]),
    ("http://${host}/x", ["a.test"]),  # templated: checked per call instead
])
def test_allowed_urls_pass_manifest_validation(url: str, allowed: list[str]) -> None:
    BuiltinImplementation.model_validate(
        {"name": "http", "config": {"url": url, "allowedHosts": allowed}})
