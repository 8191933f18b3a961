"""The public API as an OpenAPI 3.1 document: every path, status code and body.

Served on the admin port as /openapi.json, and fuzzed against the running BFF
by the tests (schemathesis): an answer the document does not describe fails them.
"""

from __future__ import annotations

from typing import Any

ID = {"type": "integer", "format": "int64", "minimum": 1, "maximum": 2**63 - 1}
TIME = {"type": ["string", "null"], "format": "date-time"}
MS = {"type": ["integer", "null"]}


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


def _status(*values: str, **more: Any) -> dict[str, Any]:
    return _obj(["status", *more], status={"enum": list(values)}, **more)


ERROR = _obj(["error"], error={"type": "string"})
SCHEMAS: dict[str, Any] = {
    "Error": ERROR,
    "Accepted": _status("accepted", stream_id={"type": "string"}, slot={"type": "integer"}),
    "Duplicate": _status("duplicate"),
    # gate_wait_replicas: recorded by the master, not acknowledged by a replica in time
    "Unreplicated": _status("unreplicated", stream_id={"type": "string"},
                            slot={"type": "integer"}, message={"type": "string"}),
    "Gone": _status("sold_out", "ended"),
    "NoSale": _status("no_sale"),
    "NotStarted": _status("not_started", start={"type": "string", "format": "date-time"},
                          start_ms={"type": "integer"}),
    "RateLimited": _status("rate_limited", limit={"enum": ["user", "ip"]},
                           retry_after_ms={"type": "integer"}),
    "Sale": _obj(["product_id", "state", "start", "start_ms", "end", "end_ms", "server_time",
                  "server_time_ms"], product_id=ID,
                 state={"enum": ["closed", "scheduled", "open", "sold_out", "ended"]},
                 start=TIME, start_ms=MS, end=TIME, end_ms=MS,
                 server_time={"type": "string", "format": "date-time"},
                 server_time_ms={"type": "integer"}),
    # WAITLISTED (with position and handed_out) and ENDED: waiting, never a row
    "Order": _obj(["state"], state={"enum": ["PENDING", "PROCESSING", "RUNNING", "FAILED",
                                             "RELEASING", "RELEASED", "WAITLISTED",
                                             "ENDED"]},
                  instance_id={"type": "string"}, endpoint={"type": "string"},
                  reason={"type": "string"}, position={"type": "integer", "minimum": 1},
                  handed_out={"type": "integer", "minimum": 0}),
    "Waiting": _status("joined", "waiting", state={"const": "WAITLISTED"},
                       position={"type": "integer", "minimum": 1}),
    "NotWaiting": _status("buyer", "stock_left", "full", message={"type": "string"}),
    # DELETE .../order: LEFT the waitlist, or the release asked for, under way or done
    "GivenBack": _obj(["state"], state={"enum": ["LEFT", "RELEASING", "RELEASED"]}),
    "Health": _obj(["status", "auth"], status={"const": "ok"}, auth={"enum": ["jwt", "none"]},
                   warning={"type": "string"}),
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema}}, **extra}


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return _json(_ref("Error"), description, **extra)


UNAUTHORIZED = _error("no token, or a malformed, expired, wrongly signed or foreign one",
                      headers={"WWW-Authenticate": {"schema": {"type": "string"}}})
RETRY = {"Retry-After": {"schema": {"type": "string"}}}
PID = {"name": "product_id", "in": "path", "required": True, "schema": ID}
UID = {"name": "user_id", "in": "path", "required": True, "schema": ID}
COMMON = {"400": _error("bad input"), "503": _error("a service is down; try again")}


def document() -> dict[str, Any]:
    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    given_back = {
        "200": _json(_ref("GivenBack"), "left the waitlist, or the release was asked for "
                     "before (RELEASING) or is done (RELEASED)"),
        "202": _json(_ref("GivenBack"), "the release of the RUNNING instance is asked for"),
        "401": UNAUTHORIZED, "404": _error("no order, and not waiting"),
        "409": _error("the order cannot be released yet (PENDING, PROCESSING: release it "
                      "after it runs) or failed"),
        "429": _error("shed, or too many failed authentications from this address",
                      headers=RETRY), **COMMON}
    order_answers = {"200": _json(_ref("Order"), "the order's state"),
                     "401": UNAUTHORIZED, "404": _error("no order"),
                     "429": _error("shed, or too many failed authentications from this "
                                   "address", headers=RETRY), **COMMON}
    return {
        "openapi": "3.1.0",
        "info": {"title": "seckill gate", "version": "1",
                 "description": "Flash-sale purchases: one attempt per request, judged "
                                "atomically in Redis."},
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "bearerFormat": "JWT"}},
        },
        "paths": {
            "/api/v1/seckill/{product_id}": {
                "parameters": [PID],
                "post": {
                    "summary": "one purchase attempt by the token's user",
                    "security": secured,
                    "requestBody": {"required": False, "content": {"application/json": {
                        "schema": {"type": "object", "properties": {"user_id": ID}}}}},
                    "responses": {
                        "202": _json(_ref("Accepted"), "accepted: the order is in the stream"),
                        "401": UNAUTHORIZED,
                        "403": _error("user_id is not the token's user"),
                        "404": _json(_ref("NoSale"), "no open sale"),
                        "408": _error("the body did not arrive in time"),
                        "409": _json(_ref("Duplicate"), "this user already bought"),
                        "410": _json(_ref("Gone"), "sold out, or the sale has ended"),
                        "425": _json(_ref("NotStarted"), "the sale has not started"),
                        "429": _json({"oneOf": [_ref("RateLimited"), ERROR]},
                                     "over a rate limit, shed, or too many failed "
                                     "authentications from this address", headers=RETRY),
                        **COMMON,
                        "503": _json({"oneOf": [_ref("Unreplicated"), ERROR]},
                                     "a service is down (try again), or the order is "
                                     "recorded but no replica acknowledged it in time "
                                     "(look the order up; do not buy again)"),
                    },
                },
                "get": {
                    "summary": "the sale: state, window and server time (no token needed)",
                    "responses": {"200": _json(_ref("Sale"), "the sale, cacheable 1 s"),
                                  **COMMON},
                },
            },
            "/api/v1/seckill/{product_id}/waitlist": {
                "parameters": [PID],
                "post": {
                    "summary": "wait for a returned unit of the sold-out sale (first come, "
                               "first served)",
                    "security": secured,
                    "requestBody": {"required": False, "content": {"application/json": {
                        "schema": {"type": "object", "properties": {"user_id": ID}}}}},
                    "responses": {
                        "200": _json(_ref("Waiting"), "already waiting: the position"),
                        "202": _json(_ref("Waiting"), "joined: the position"),
                        "401": UNAUTHORIZED,
                        "403": _error("user_id is not the token's user"),
                        "404": _json(_ref("NoSale"), "no open sale"),
                        "408": _error("the body did not arrive in time"),
                        "409": _json(_ref("NotWaiting"), "the caller holds a live order, "
                                     "or units are still for sale (buy instead)"),
                        "410": _json({"oneOf": [_ref("NotWaiting"), _ref("Gone")]},
                                     "the waitlist is full, or the sale has ended"),
                        "425": _json(_ref("NotStarted"), "the sale has not started"),
                        "429": _json({"oneOf": [_ref("RateLimited"), ERROR]},
                                     "over a rate limit (the purchase's), shed, or too many "
                                     "failed authentications from this address",
                                     headers=RETRY),
                        **COMMON,
                    },
                },
            },
            "/api/v1/seckill/{product_id}/order": {
                "parameters": [PID],
                "get": {"summary": "the caller's order, or place in the waitlist",
                        "security": secured, "responses": order_answers},
                "delete": {"summary": "leave the waitlist, or release the RUNNING instance",
                           "security": secured, "responses": given_back},
            },
            "/api/v1/seckill/{product_id}/users/{user_id}": {
                "parameters": [PID, UID],
                "get": {"summary": "an order, only the caller's own", "security": secured,
                        "responses": {**order_answers,
                                      "403": _error("another user's order")}},
                "delete": {"summary": "leave or release, only the caller's own",
                           "security": secured,
                           "responses": {**given_back, "403": _error("another user's order")}},
            },
            "/healthz": {"get": {"summary": "liveness",
                                 "responses": {"200": _json(_ref("Health"), "alive")}}},
        },
    }
