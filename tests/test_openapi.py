"""
The OpenAPI document: it validates, names every route and status code of the
contract, and matches what the live daemon really answers (hand-picked
requests checked against it, then a bounded schemathesis run).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import jwt
import pytest
from conftest import API_KEY, BIN, DEFAULT_CONFIG, JWT_SECRET, Daemon, http
from openapi_spec_validator import validate

from twisted_rt.routes.openapi import document

HOOK_SECRET = "hook-secret-for-openapi"
CONFIG = DEFAULT_CONFIG + f"""
[[sources]]
name = "inhouse"
verify = "hmac-sha256"
secrets = ["{HOOK_SECRET}"]
channel = "inhouse.{{json:type}}"
"""

AUTH = {"Authorization": f"Bearer {API_KEY}"}

# The contract's HTTP table: every route, method and status code it names.
CONTRACT: dict[tuple[str, str], set[str]] = {
    ("/hooks/{source}", "get"): {"200", "405"},
    ("/hooks/{source}", "post"): {"200", "202", "400", "401", "404", "405", "413", "415", "429", "503"},
    ("/api/publish", "post"): {"202", "400", "401", "403", "413", "503"},
    ("/api/channels", "get"): {"200", "401"},
    ("/api/channels/{name}/history", "get"): {"200", "400", "401", "403"},
    ("/api/stats", "get"): {"200", "401"},
    ("/healthz", "get"): {"200"},
    ("/readyz", "get"): {"200", "503"},
    ("/metrics", "get"): {"200"},
    ("/openapi.json", "get"): {"200"},
    ("/", "get"): {"200"},
    ("/ws", "get"): {"101", "401", "403"},
    ("/sse", "get"): {"200"},
    ("/poll", "get"): {"200"},
}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return document()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon with a webhook source, shared by the read-mostly tests here."""
    d = Daemon(tmp_path_factory.mktemp("openapi"), textwrap.dedent(CONFIG))
    d.start()
    yield d
    d.stop()


def _response(doc: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any]:
    op = doc["paths"][path][method]
    responses = op["responses"]
    assert str(status) in responses, f"{method.upper()} {path} answered {status}, not documented"
    r = responses[str(status)]
    if "$ref" in r:
        r = doc["components"]["responses"][r["$ref"].rsplit("/", 1)[1]]
    return r  # type: ignore[no-any-return]


def check(doc: dict[str, Any], path: str, method: str, status: int, headers: dict[str, str], body: bytes) -> None:
    """Assert that a real answer is one the document describes (status, media type, JSON schema)."""
    r = _response(doc, path, method, status)
    content = r.get("content")
    if not content:
        return
    media = headers.get("content-type", "").split(";")[0].strip()
    assert media in content, f"{method.upper()} {path} {status}: {media} not in {list(content)}"
    if media == "application/json":
        schema = content[media]["schema"]
        jsonschema.Draft202012Validator({**doc, **schema}).validate(json.loads(body))


def test_document_validates(doc: dict[str, Any]) -> None:
    """The document is a valid OpenAPI 3.1 document."""
    assert doc["openapi"].startswith("3.1")
    validate(doc)


def test_every_contract_route_and_code_is_documented(doc: dict[str, Any]) -> None:
    """Every route of the contract's table is there with at least the status codes the contract names."""
    for (path, method), codes in CONTRACT.items():
        assert path in doc["paths"], path
        op = doc["paths"][path][method]
        assert codes <= set(op["responses"]), (path, method, codes - set(op["responses"]))
        assert op.get("operationId") and op.get("summary"), (path, method)


def test_every_error_uses_the_error_schema(doc: dict[str, Any]) -> None:
    """Every documented JSON 4xx/5xx answer is the {"error","message"} schema."""
    err = doc["components"]["schemas"]["Error"]
    assert err["required"] == ["error", "message"]
    count = 0
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            for code, r in op["responses"].items():
                if not code.startswith(("4", "5")):
                    continue
                r = _response(doc, path, method, int(code))
                json_content = r.get("content", {}).get("application/json")
                if json_content is not None:
                    assert json_content["schema"] == {"$ref": "#/components/schemas/Error"}, (path, method, code)
                    count += 1
    assert count > 30


def test_served_document(live: Daemon, doc: dict[str, Any]) -> None:
    """GET /openapi.json serves exactly this document as JSON, without a token."""
    status, headers, raw = http("GET", live.url + "/openapi.json")
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert json.loads(raw) == json.loads(json.dumps(doc))


def _sign(body: bytes) -> str:
    return hmac.new(HOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()


def test_live_answers_match_the_document(live: Daemon, doc: dict[str, Any]) -> None:
    """A request for each route and outcome gets an answer the document describes."""
    limited = jwt.encode({"sub": "x", "exp": time.time() + 600, "subscribe": ["public.>"]}, JWT_SECRET,
                         algorithm="HS256")
    hook = json.dumps({"type": "created", "n": 1}).encode()
    hook_headers = {"Content-Type": "application/json", "X-Signature": _sign(hook), "webhook-id": "d-1"}
    cases: list[tuple[str, str, str, Any, dict[str, str]]] = [
        ("/api/publish", "post", "/api/publish", {"channel": "public.a", "data": 1, "id": "o1"}, AUTH),
        ("/api/publish", "post", "/api/publish", {"channel": "public.a", "data": 1, "id": "o1"}, AUTH),
        ("/api/publish", "post", "/api/publish", {"events": [{"channel": "public.a", "data": 2}]}, AUTH),
        ("/api/publish", "post", "/api/publish", {"channel": "a b", "data": 1}, AUTH),
        ("/api/publish", "post", "/api/publish", {"channel": "a", "data": 1}, {}),
        ("/api/publish", "post", "/api/publish", {"channel": "a", "data": 1}, {"Authorization": f"Bearer {limited}"}),
        ("/api/channels", "get", "/api/channels", None, AUTH),
        ("/api/channels", "get", "/api/channels", None, {}),
        ("/api/channels/{name}/history", "get", "/api/channels/public.a/history?since=0&limit=5", None, AUTH),
        ("/api/channels/{name}/history", "get", "/api/channels/public.a/history?since=-1", None, AUTH),
        ("/api/channels/{name}/history", "get", "/api/channels/secret.a/history", None, {}),
        ("/api/channels/{name}/history", "get", "/api/channels/secret.a/history", None,
         {"Authorization": f"Bearer {limited}"}),
        ("/api/stats", "get", "/api/stats", None, AUTH),
        ("/api/stats", "get", "/api/stats", None, {}),
        ("/healthz", "get", "/healthz", None, {}),
        ("/readyz", "get", "/readyz", None, {}),
        ("/metrics", "get", "/metrics", None, {}),
        ("/", "get", "/", None, {}),
        ("/hooks/{source}", "post", "/hooks/inhouse", hook, hook_headers),
        ("/hooks/{source}", "post", "/hooks/inhouse", hook, hook_headers),
        ("/hooks/{source}", "post", "/hooks/inhouse", hook, {**hook_headers, "X-Signature": "0" * 64}),
        ("/hooks/{source}", "post", "/hooks/nope", hook, hook_headers),
        ("/hooks/{source}", "post", "/hooks/inhouse", b"\x89PNG", {"Content-Type": "image/png",
                                                                   "X-Signature": _sign(b"\x89PNG")}),
        ("/hooks/{source}", "get", "/hooks/inhouse", None, {}),
        ("/ws", "get", "/ws", None, {}),
        ("/sse", "get", "/sse", None, {}),
        ("/sse", "get", "/sse?channel=secret.x", None, {}),
        ("/poll", "get", "/poll?channel=public.a&since=0&timeout=0", None, {}),
        ("/poll", "get", "/poll?channel=a..b", None, {}),
        ("/poll", "get", "/poll?channel=secret.a&timeout=0", None, {}),
    ]
    seen: set[tuple[str, str, int]] = set()
    for path, method, url, body, headers in cases:
        status, hdrs, raw = http(method.upper(), live.url + url, body, headers)
        check(doc, path, method, status, hdrs, raw)
        seen.add((path, method, status))
    for query, want in (("?token=bad", 401), ("", 101)):
        status = _upgrade(live, "/ws" + query)
        assert status == want
        _response(doc, "/ws", "get", status)
        seen.add(("/ws", "get", status))
    expected = {
        ("/api/publish", "post", 202), ("/api/publish", "post", 400), ("/api/publish", "post", 401),
        ("/api/publish", "post", 403), ("/api/channels/{name}/history", "get", 403),
        ("/hooks/{source}", "post", 202), ("/hooks/{source}", "post", 200), ("/hooks/{source}", "post", 401),
        ("/hooks/{source}", "post", 404), ("/hooks/{source}", "post", 415), ("/ws", "get", 401),
        ("/poll", "get", 200), ("/poll", "get", 400), ("/poll", "get", 403),
    }
    assert expected <= seen, expected - seen


def _upgrade(live: Daemon, target: str) -> int:
    """The status of a WebSocket upgrade request (urllib would add Connection: close)."""
    import socket

    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
        s.sendall(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n" not in head:
            chunk = s.recv(1024)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])


def _schemathesis(live: Daemon, tmp_path: Path, token: str, examples: int, seed: int,
                  phases: str = "examples,coverage,fuzzing,stateful") -> None:
    cmd = [
        str(BIN / "schemathesis"), "run", live.url + "/openapi.json",
        "-H", f"Authorization: Bearer {token}",
        "--checks", "all",
        "--max-examples", str(examples),
        "--seed", str(seed),
        "--no-shrink",
        "--phases", phases,
        "--request-timeout", "10",
        # the streams hold connections open and webhooks need signatures: checked above by hand
        "--include-path-regex", r"^/(api/.*|healthz|readyz|metrics|openapi\.json)$",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert "No issues found" in proc.stdout or " passed" in proc.stdout, proc.stdout[-4000:]


@pytest.mark.slow
def test_schemathesis_api_key(live: Daemon, tmp_path: Path) -> None:
    """A property-based schemathesis run with an API key finds no 500s and no answer outside the document."""
    _schemathesis(live, tmp_path, API_KEY, examples=15, seed=20261121)


@pytest.mark.slow
def test_schemathesis_limited_jwt(live: Daemon, tmp_path: Path) -> None:
    """The same run with a JWT of narrow rights (403s, filtered channel lists) finds nothing either."""
    t = jwt.encode({"sub": "fuzz", "exp": time.time() + 600, "subscribe": ["a.*"], "publish": ["b.>"]},
                   JWT_SECRET, algorithm="HS256")
    _schemathesis(live, tmp_path, t, examples=8, seed=7, phases="fuzzing")
