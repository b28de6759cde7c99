# -*- test-case-name: tests.test_openapi -*-
"""
The OpenAPI 3.1 document of every route of the contract, served at
C{GET /openapi.json}.

It is written by hand from CONTRACT.md and the code of each route, and the
tests keep it honest: it validates with C{openapi_spec_validator}, and a
C{schemathesis} run against the live daemon checks that the answers match it.
"""

from __future__ import annotations

from typing import Any

from twisted.web.resource import IResource
from twisted.web.server import Request

from twisted_rt import __version__
from twisted_rt.app import App
from twisted_rt.core.event import dumps
from twisted_rt.routes.api import (
    DEFAULT_HISTORY_LIMIT,
    MAX_BATCH,
    MAX_HISTORY_LIMIT,
    MAX_ID_LENGTH,
    MAX_OFFSET,
    MAX_TYPE_LENGTH,
)
from twisted_rt.web.resource import JsonResource, Reply, no_subpath

__all__ = ["OpenAPI", "document", "resource"]

_SEG = "[A-Za-z0-9_:@-]+"
CHANNEL_PATTERN = f"^{_SEG}(\\.{_SEG})*$"
SUBSCRIPTION_PATTERN = f"^({_SEG}|\\*)(\\.({_SEG}|\\*))*(\\.>)?$|^>$"

_BEARER: list[dict[str, list[str]]] = [{"bearerAuth": []}]
_BEARER_OR_ANON: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"tokenQuery": []}, {}]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _resp(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def _json(schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        r["headers"] = headers
    return r


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return _json(_ref("Error"), description, headers)


def _schemas() -> dict[str, Any]:
    return {
        "Error": {
            "type": "object",
            "description": "Every error body.",
            "required": ["error", "message"],
            "properties": {
                "error": {"type": "string", "description": "A stable machine code, e.g. `invalid_token`."},
                "message": {"type": "string", "description": "A human sentence."},
            },
        },
        "Channel": {
            "type": "string",
            "minLength": 1,
            "maxLength": 200,
            "pattern": CHANNEL_PATTERN,
            "description": "1-200 characters of `A-Z a-z 0-9 _ - . : @`; segments separated by `.`.",
            "examples": ["github.push"],
        },
        "Pattern": {
            "type": "string",
            "minLength": 1,
            "maxLength": 200,
            "pattern": SUBSCRIPTION_PATTERN,
            "description": "A channel, or a pattern with `*` (one segment) and a final `>` (one or more).",
            "examples": ["github.*", "billing.>"],
        },
        "Offset": {"type": "integer", "minimum": 1, "maximum": MAX_OFFSET},
        "Event": {
            "type": "object",
            "required": ["id", "channel", "offset", "time", "source", "type", "data"],
            "properties": {
                "id": {"type": "string"},
                "channel": _ref("Channel"),
                "offset": _ref("Offset"),
                "time": {"type": "string", "description": "RFC 3339 UTC with milliseconds."},
                "source": {"type": "string", "description": "`api` or the webhook source's name."},
                "type": {"type": "string"},
                "data": {"description": "The JSON body (or a string for text bodies)."},
            },
        },
        "PublishEvent": {
            "type": "object",
            "required": ["channel", "data"],
            "additionalProperties": False,
            "properties": {
                "channel": _ref("Channel"),
                "data": {"description": "Any JSON value."},
                "id": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_ID_LENGTH,
                    "description": "Idempotency key: the same id again answers the original event.",
                },
                "type": {"type": "string", "maxLength": MAX_TYPE_LENGTH},
            },
        },
        "PublishBatch": {
            "type": "object",
            "required": ["events"],
            "additionalProperties": False,
            "properties": {
                "events": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_BATCH,
                    "items": _ref("PublishEvent"),
                    "description": "Journaled in one commit: all or none.",
                }
            },
        },
        "Receipt": {
            "type": "object",
            "required": ["id", "channel", "offset"],
            "properties": {
                "id": {"type": "string"},
                "channel": _ref("Channel"),
                "offset": _ref("Offset"),
                "duplicate": {
                    "type": "boolean",
                    "const": True,
                    "description": "Present when the id was already journaled: the original offset.",
                },
            },
        },
        "BatchReceipt": {
            "type": "object",
            "required": ["events"],
            "properties": {"events": {"type": "array", "items": _ref("Receipt")}},
        },
        "ChannelInfo": {
            "type": "object",
            "required": ["name", "subscribers", "last_offset"],
            "properties": {
                "name": _ref("Channel"),
                "subscribers": {"type": "integer", "minimum": 0},
                "last_offset": {"type": "integer", "minimum": 0},
                "members": {"type": "integer", "minimum": 0,
                            "description": "Presence members, cluster-wide (presence channels only)."},
            },
        },
        "Member": {
            "type": "object",
            "required": ["user"],
            "properties": {
                "user": {"type": "string", "description": "The JWT `sub`."},
                "info": {"type": "object", "description": "The JWT `info` claim (at most 1 KiB)."},
            },
        },
        "ChannelList": {
            "type": "object",
            "required": ["channels"],
            "properties": {"channels": {"type": "array", "items": _ref("ChannelInfo")}},
        },
        "History": {
            "type": "object",
            "required": ["events", "last_offset", "more"],
            "properties": {
                "events": {
                    "type": "array",
                    "items": _ref("Event"),
                    "description": "Oldest first: at most `limit` events and at most 4 MiB of event JSON "
                    "(always at least one event when there is one).",
                },
                "last_offset": {"type": "integer", "minimum": 0},
                "more": {
                    "type": "boolean",
                    "description": "More events follow: ask again with `since` = the last offset of this page.",
                },
                "truncated": {
                    "type": "boolean",
                    "const": True,
                    "description": "Present when events after `since` were already trimmed: the page starts at "
                    "the oldest kept event.",
                },
            },
        },
        "RawEvent": {
            "type": "object",
            "required": ["id", "channel", "offset", "source", "type", "headers", "body_base64"],
            "properties": {
                "id": {"type": "string"},
                "channel": _ref("Channel"),
                "offset": {"type": "integer", "minimum": 1},
                "source": {"type": "string"},
                "type": {"type": "string"},
                "headers": {
                    "type": ["object", "null"],
                    "additionalProperties": {"type": "string"},
                    "description": "The provider's request headers (webhooks only).",
                },
                "body_base64": {
                    "type": ["string", "null"],
                    "description": "The request body exactly as received, base64 (webhooks only).",
                },
            },
        },
        "Poll": {
            "type": "object",
            "required": ["events"],
            "properties": {
                "events": {"type": "array", "items": _ref("Event")},
                "last_offset": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "The offset to poll from next.",
                },
                "more": {
                    "type": "boolean",
                    "description": "Present and true when the answer was cut (by `limit` or 4 MiB): poll again at once.",
                },
            },
        },
        "Stats": {
            "type": "object",
            "required": ["connections", "subscriptions", "events_in", "events_out", "dropped"],
            "properties": {
                "uptime_seconds": {"type": "number", "minimum": 0},
                "connections": {"type": "integer", "minimum": 0},
                "connections_by_transport": _counts(),
                "subscriptions": {"type": "integer", "minimum": 0},
                "events_in": {"type": "integer", "minimum": 0},
                "events_in_by_source": _counts(),
                "events_out": {"type": "integer", "minimum": 0},
                "events_out_by_transport": _counts(),
                "dropped": {"type": "integer", "minimum": 0},
                "dropped_by_reason": _counts(),
                "webhooks": {
                    "type": "object",
                    "description": "Outcomes by source: `accepted`, `duplicate` or a rejection reason.",
                    "additionalProperties": _counts(),
                },
                "webhooks_rejected": {"type": "integer", "minimum": 0},
            },
        },
        "Status": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"type": "string"}},
        },
    }


def _counts() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": {"type": "integer"}}


def _responses() -> dict[str, Any]:
    www = {
        "WWW-Authenticate": {
            "description": "`Bearer error=\"invalid_token\"`",
            "schema": {"type": "string"},
        }
    }
    return {
        "BadRequest": _error("Malformed request: bad JSON, bad channel name, missing field or bad parameter."),
        "Unauthorized": _error(
            "No token, or a token that is not an API key nor a valid JWT (bad signature, expired, "
            "not yet valid, wrong algorithm).",
            www,
        ),
        "Forbidden": _error(
            "A valid token without the right for this channel (`forbidden`), or on the streaming routes "
            "a forbidden Origin (`forbidden_origin`)."
        ),
        "NotFound": _error("No such route or resource."),
        "MethodNotAllowed": _error(
            "The method is not served here.",
            {"Allow": {"description": "The methods served.", "schema": {"type": "string"}}},
        ),
        "TooLarge": _error("The body is over `[server] max_body_bytes`."),
        "UnsupportedMediaType": _error("The body's content type is not accepted."),
        "TooManyRequests": _error(
            "Over the source's `rate_limit_per_second` (`rate_limited`), or this address has used up "
            "`[server] signature_failures_per_ip_per_minute` with badly signed deliveries.",
            {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}}},
        ),
        "InternalError": _error("An unexpected failure; it was logged, no details are given."),
        "RequestTimeout": _error(
            "The request head (or body) did not arrive within `[server] request_head_timeout_seconds` "
            "(`request_timeout`); the connection is closed."
        ),
        "Unavailable": _error(
            "The journal (or broker) is down: nothing was accepted (`journal_unavailable`); or the daemon "
            "is over `[server] max_connections` / `max_connections_per_ip` (`too_many_connections`).",
            {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}}},
        ),
    }


def _q(name: str, schema: dict[str, Any], description: str, required: bool = False, **kw: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description, **kw}


def _token_param() -> dict[str, Any]:
    return _q("token", {"type": "string"}, "A JWT (or API key) when no `Authorization` header can be sent.")


def _paths() -> dict[str, Any]:
    std_errors = {"401": _resp("Unauthorized"), "500": _resp("InternalError")}
    return {
        "/api/publish": {
            "post": {
                "operationId": "publish",
                "summary": "Publish one event or a batch",
                "description": (
                    "The events are journaled in one commit before the answer. Idempotent by `id` "
                    f"(source `api`): a repeated id answers the original offset with `duplicate: true`. "
                    f"A batch has at most {MAX_BATCH} events and is all or nothing."
                ),
                "tags": ["api"],
                "security": _BEARER,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"oneOf": [_ref("PublishEvent"), _ref("PublishBatch")]},
                        }
                    },
                },
                "responses": {
                    "202": _json(
                        {"oneOf": [_ref("Receipt"), _ref("BatchReceipt")]},
                        "Journaled: one receipt, or `{events: [receipts]}` for a batch, in order.",
                    ),
                    "400": _resp("BadRequest"),
                    "403": _resp("Forbidden"),
                    "413": _resp("TooLarge"),
                    "415": _resp("UnsupportedMediaType"),
                    "503": _resp("Unavailable"),
                    **std_errors,
                },
            }
        },
        "/api/channels": {
            "get": {
                "operationId": "listChannels",
                "summary": "The channels the caller may read",
                "description": "An API key sees every channel; a JWT those its `subscribe` rights cover.",
                "tags": ["api"],
                "security": _BEARER,
                "responses": {
                    "200": _json(_ref("ChannelList"), "The channels, by name."),
                    "503": _resp("Unavailable"),
                    **std_errors,
                },
            }
        },
        "/api/channels/{name}/history": {
            "get": {
                "operationId": "channelHistory",
                "summary": "A channel's journaled events after an offset",
                "description": (
                    "Oldest first, offsets > `since`. Without a token only `anonymous_subscribe` "
                    "channels are readable."
                ),
                "tags": ["api"],
                "security": _BEARER_OR_ANON,
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": _ref("Channel")},
                    _q(
                        "since",
                        {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0},
                        "The last offset already seen.",
                    ),
                    _q(
                        "limit",
                        {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_HISTORY_LIMIT,
                            "default": DEFAULT_HISTORY_LIMIT,
                        },
                        "At most this many events (and at most 4 MiB of them: see `more`).",
                    ),
                ],
                "responses": {
                    "200": _json(_ref("History"), "The events and the channel's last offset."),
                    "400": _resp("BadRequest"),
                    "403": _resp("Forbidden"),
                    "503": _resp("Unavailable"),
                    **std_errors,
                },
            }
        },
        "/api/raw/{channel}/{offset}": {
            "get": {
                "operationId": "rawEvent",
                "summary": "One event's original request body and headers",
                "description": (
                    "What `twisted-rt tail --forward` re-delivers byte for byte. Needs an API key or "
                    "a JWT whose `subscribe` rights cover the channel."
                ),
                "tags": ["api"],
                "security": _BEARER,
                "parameters": [
                    {"name": "channel", "in": "path", "required": True, "schema": _ref("Channel")},
                    {
                        "name": "offset",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_OFFSET},
                    },
                ],
                "responses": {
                    "200": _json(_ref("RawEvent"), "The event with its raw body and headers."),
                    "400": _resp("BadRequest"),
                    "403": _resp("Forbidden"),
                    "404": _resp("NotFound"),
                    "503": _resp("Unavailable"),
                    **std_errors,
                },
            }
        },
        "/api/stats": {
            "get": {
                "operationId": "stats",
                "summary": "Counters",
                "tags": ["api"],
                "security": _BEARER,
                "responses": {"200": _json(_ref("Stats"), "The daemon's counters."), **std_errors},
            }
        },
        "/hooks/{source}": {
            "parameters": [
                {
                    "name": "source",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                    "description": "A `[[sources]]` name of the config.",
                }
            ],
            "get": {
                "operationId": "webhookHandshake",
                "summary": "Provider handshakes only (Meta `hub.challenge`, X `crc_token`)",
                "tags": ["webhooks"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "The handshake's answer.",
                        "content": {
                            "text/plain": {"schema": {"type": "string"}},
                            "application/json": {"schema": {"type": "object"}},
                        },
                    },
                    "400": _resp("BadRequest"),
                    "401": _resp("Unauthorized"),
                    "403": _resp("Forbidden"),
                    "404": _resp("NotFound"),
                    "405": _resp("MethodNotAllowed"),
                    "500": _resp("InternalError"),
                },
            },
            "post": {
                "operationId": "webhook",
                "summary": "A signed webhook delivery",
                "description": (
                    "Verified with the source's scheme, then journaled. A JSON body becomes `data`; a "
                    "form body an object of its fields; a text body a string; binary bodies are refused."
                ),
                "tags": ["webhooks"],
                "security": [],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {}},
                        "application/x-www-form-urlencoded": {"schema": {"type": "object"}},
                        "text/plain": {"schema": {"type": "string"}},
                    },
                },
                "responses": {
                    "200": _json(_ref("Receipt"), "A repeated delivery id: the original event, `duplicate: true`."),
                    "202": _json(_ref("Receipt"), "Journaled."),
                    "400": _resp("BadRequest"),
                    "401": _error("Missing, invalid or stale signature."),
                    "404": _resp("NotFound"),
                    "405": _resp("MethodNotAllowed"),
                    "413": _resp("TooLarge"),
                    "415": _resp("UnsupportedMediaType"),
                    "429": _resp("TooManyRequests"),
                    "500": _resp("InternalError"),
                    "503": _resp("Unavailable"),
                },
            },
        },
        "/ws": {
            "get": {
                "operationId": "websocket",
                "summary": "WebSocket: subscribe, resume with `since`, publish, ping",
                "description": (
                    "Upgrade to WebSocket; JSON text frames as in the contract (`subscribe`, "
                    "`unsubscribe`, `publish`, `ping`, `auth`). Close codes: 1008 policy, 1009 too big, "
                    "1013 slow consumer, 4001 token expired."
                ),
                "tags": ["streams"],
                "security": _BEARER_OR_ANON,
                "parameters": [_token_param()],
                "responses": {
                    "101": {"description": "Switching protocols."},
                    "200": {
                        "description": "Not an upgrade request: Autobahn's status page.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    "400": {"description": "Not a valid WebSocket upgrade request."},
                    "401": _resp("Unauthorized"),
                    "403": _error("The Origin is not allowed."),
                    "426": {"description": "Upgrade required."},
                    "500": _resp("InternalError"),
                },
            }
        },
        "/sse": {
            "get": {
                "operationId": "serverSentEvents",
                "summary": "Server-Sent Events of one or more channels",
                "description": (
                    "Each event has `id:` (resumable with `Last-Event-ID`), `event: <channel>` and "
                    "`data: <event JSON>`; comment lines are heartbeats."
                ),
                "tags": ["streams"],
                "security": _BEARER_OR_ANON,
                "parameters": [
                    _q(
                        "channel",
                        {"type": "array", "items": _ref("Channel")},
                        "An exact channel; repeat for several (`channel` and `pattern` together: at least one).",
                        style="form",
                        explode=True,
                    ),
                    _q(
                        "pattern",
                        {"type": "array", "items": _ref("Pattern")},
                        "A wildcard pattern (`github.*`, `billing.>`); repeat for several.",
                        style="form",
                        explode=True,
                    ),
                    _q(
                        "since",
                        {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
                        "The last offset seen, for every listed channel (0: from the start).",
                    ),
                    _token_param(),
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "maxLength": 256},
                        "description": (
                            "Resume every channel and pattern of the stream after this cursor: the opaque "
                            "`id:` of the last event seen (`v1:<seq>`, at most 256 bytes; the `chan=offset,...` "
                            "ids of 0.1 are still read). An id the server cannot read is 400 "
                            "`invalid_last_event_id`."
                        ),
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The stream.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "400": _resp("BadRequest"),
                    "401": _resp("Unauthorized"),
                    "403": _resp("Forbidden"),
                    "500": _resp("InternalError"),
                    "503": _resp("Unavailable"),
                },
            }
        },
        "/poll": {
            "get": {
                "operationId": "longPoll",
                "summary": "Long-poll one or more channels",
                "description": "Answers as soon as there is an event after `since`, or `{events: []}` at the timeout.",
                "tags": ["streams"],
                "security": _BEARER_OR_ANON,
                "parameters": [
                    _q("channel", _ref("Channel"), "One exact channel.", required=True),
                    _q("since", {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET}, "The last offset seen."),
                    _q("limit", {"type": "integer", "minimum": 0}, "At most this many events (0: the default)."),
                    _q(
                        "timeout",
                        {"type": "integer", "minimum": 0},
                        "Seconds to wait (default 30, capped by `[sse] max_poll_timeout_seconds`).",
                    ),
                    _token_param(),
                ],
                "responses": {
                    "200": _json(_ref("Poll"), "The events after `since` (maybe none)."),
                    "400": _resp("BadRequest"),
                    "401": _resp("Unauthorized"),
                    "403": _resp("Forbidden"),
                    "500": _resp("InternalError"),
                    "503": _resp("Unavailable"),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Liveness: the process answers",
                "tags": ["operations"],
                "security": [],
                "responses": {
                    "200": _json(_ref("Status"), "`{status: ok}`."),
                    "503": _error("Not serving."),
                },
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Readiness: events can be accepted",
                "tags": ["operations"],
                "security": [],
                "responses": {
                    "200": _json(_ref("Status"), "`{status: ready}`."),
                    "503": _error("The journal or broker is down, or the daemon is stopping."),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "description": (
                    "`rt_connections`, `rt_subscriptions`, `rt_events_in_total{source}`, "
                    "`rt_events_out_total{transport}`, `rt_journal_commit_seconds`, "
                    "`rt_journal_batch_events`, `rt_dropped_total{reason}`, `rt_webhooks_total`, "
                    "`rt_webhooks_rejected_total{source,reason}`, `rt_ready`, process metrics."
                ),
                "tags": ["operations"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "The text exposition format 0.0.4 (OpenMetrics when `Accept` asks for it).",
                        "content": {
                            "text/plain": {"schema": {"type": "string"}},
                            "application/openmetrics-text": {"schema": {"type": "string"}},
                        },
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "tags": ["operations"],
                "security": [],
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
            }
        },
        "/": {
            "get": {
                "operationId": "inspector",
                "summary": "The live inspector page: channels, live tail, history",
                "tags": ["operations"],
                "security": [],
                "responses": {
                    "200": {"description": "HTML.", "content": {"text/html": {"schema": {"type": "string"}}}}
                },
            }
        },
    }


def _destination_paths() -> dict[str, Any]:
    """C{/api/destinations} (issue 17: L{twisted_rt.routes.destinations}), API key only."""
    errors = {"401": _resp("Unauthorized"), "403": _resp("Forbidden"), "404": _resp("NotFound")}
    name = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "A `[[destinations]]` name."}]
    obj = {"type": "object"}
    body = {"content": {"application/json": {"schema": obj}}, "required": False}
    paths: dict[str, Any] = {
        "/api/destinations": {
            "get": {
                "operationId": "destinations",
                "summary": "Every destination with its state and counters (API key only)",
                "tags": ["api"],
                "security": _BEARER,
                "responses": {"200": _json(obj, "`{destinations: [{name, url, state, pending, retrying, dead, "
                                                "delivered, failed, last_success, last_error}]}`"), **errors},
            }
        },
        "/api/destinations/{name}/dead": {
            "parameters": name,
            "get": {
                "operationId": "destinationDead",
                "summary": "Dead-lettered events with their last error, the most recent first",
                "tags": ["api"],
                "security": _BEARER,
                "parameters": [{"name": "limit", "in": "query", "required": False,
                                "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}],
                "responses": {"200": _json(obj, "`{destination, dead: [...]}`"), "400": _resp("BadRequest"),
                              **errors},
            },
        },
    }
    for action, summary, answer in (
        ("retry", "Send dead letters again: `{}` (all) or `{\"ids\": [...]}`", "`{destination, retried}`"),
        ("replay", "Send the journaled events after `{\"since\": {channel: offset}}` again",
         "`{destination, queued, more}`"),
        ("pause", "Pause deliveries", "`{destination, state}`"),
        ("resume", "Resume deliveries", "`{destination, state}`"),
    ):
        paths[f"/api/destinations/{{name}}/{action}"] = {
            "parameters": name,
            "post": {
                "operationId": f"destination{action.title()}",
                "summary": summary,
                "tags": ["api"],
                "security": _BEARER,
                "requestBody": body,
                "responses": {"200": _json(obj, answer), "400": _resp("BadRequest"),
                              "415": _resp("UnsupportedMediaType"), **errors},
            },
        }
    return paths


def _presence_paths() -> dict[str, Any]:
    """Presence members and connection control (issue 16)."""
    errors = {"401": _resp("Unauthorized"), "403": _resp("Forbidden")}
    members = {"type": "object", "required": ["channel", "members", "count"], "properties": {
        "channel": _ref("Channel"), "members": {"type": "array", "items": _ref("Member")},
        "count": {"type": "integer", "minimum": 0}}}
    disconnected = {"type": "object", "required": ["user", "disconnected"], "properties": {
        "user": {"type": "string"}, "disconnected": {"type": "integer", "minimum": 0,
                                                     "description": "Connections closed on this node."}}}
    return {
        "/api/channels/{name}/presence": {
            "get": {
                "operationId": "channelPresence",
                "summary": "The members of a presence channel, cluster-wide",
                "description": "Needs the subscribe right; 404 `presence_off` when no `[[channels]]` rule "
                               "with `presence = true` matches the channel.",
                "tags": ["api"],
                "security": _BEARER,
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": _ref("Channel")}],
                "responses": {"200": _json(members, "The members, by user."), "400": _resp("BadRequest"),
                              "404": _resp("NotFound"), **errors},
            }
        },
        "/api/users/{user}/disconnect": {
            "post": {
                "operationId": "disconnectUser",
                "summary": "Close every WebSocket (4003) and SSE stream of a user, on every node (API key only)",
                "tags": ["api"],
                "security": _BEARER,
                "parameters": [{"name": "user", "in": "path", "required": True,
                                "schema": {"type": "string", "minLength": 1, "maxLength": 1024},
                                "description": "A JWT `sub`."}],
                "responses": {"200": _json(disconnected, "How many connections were closed here."),
                              "400": _resp("BadRequest"), **errors},
            }
        },
    }


def _every_route_can(paths: dict[str, Any]) -> dict[str, Any]:
    """Add what any request can be answered: 408 (slow head), 503 (connection caps), 500."""
    for item in paths.values():
        for method, op in item.items():
            if method == "parameters":
                continue
            responses = op["responses"]
            responses.setdefault("408", _resp("RequestTimeout"))
            responses.setdefault("503", _resp("Unavailable"))
            responses.setdefault("500", _resp("InternalError"))
    return paths


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh dict each call)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "twisted_rt",
            "version": __version__,
            "description": (
                "A Twisted real-time event daemon: signed webhooks and the publish API in, a durable "
                "journal, WebSocket / SSE / long-poll out with resume. Every error body is "
                '`{"error": "<code>", "message": "<sentence>"}`.'
            ),
        },
        "tags": [
            {"name": "api", "description": "The JSON API (`Authorization: Bearer <api key or JWT>`)."},
            {"name": "webhooks", "description": "Signed webhooks in."},
            {"name": "streams", "description": "Subscribers out."},
            {"name": "operations", "description": "Health, metrics, this document, the inspector."},
        ],
        "paths": _every_route_can({**_paths(), **_destination_paths(), **_presence_paths()}),
        "components": {
            "schemas": _schemas(),
            "responses": _responses(),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        "An API key (may do everything) or a JWT (HS256 with `jwt_secret`, RS256/ES256 "
                        "with `jwt_public_key_file`) with `sub`, `exp` and the rights `subscribe` and "
                        "`publish` (lists of channel patterns)."
                    ),
                },
                "tokenQuery": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "token",
                    "description": "The same token as a query argument (streams, history).",
                },
            },
        },
        "security": _BEARER,
    }


class OpenAPI(JsonResource):
    """C{GET /openapi.json}: the document, encoded once."""

    def __init__(self) -> None:
        super().__init__()
        self._body = dumps(document())

    async def handle_GET(self, request: Request) -> Reply:
        no_subpath(request)
        return Reply(200, self._body, headers={"Cache-Control": "no-cache"})


def resource(app: App) -> IResource:
    """The C{/openapi.json} resource."""
    return OpenAPI()
