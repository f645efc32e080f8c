#!/usr/bin/env python3
"""llm_proxy: share one local LLM server safely, with a token bucket per API key.

What it is
    A small HTTP daemon that sits in front of an OpenAI-compatible server (Ollama, llama.cpp
    server, vLLM, LM Studio, ...) and forwards /v1 requests to it. Every client key (the bearer
    token) gets its own refillable token bucket. When a key's bucket is empty the proxy answers
    by itself: with an OpenAI-shaped assistant message ("limit reached, wait 5 min") that chat
    UIs simply display, or, with LIMIT_RESPONSE=429, with the 429 error that OpenAI SDKs raise as
    RateLimitError. Otherwise clients must not notice the proxy: same bodies, same statuses, same
    streaming cadence as the upstream. A key the keys file marks as a trusted front end (Open
    WebUI, with "users") has each of the users it names charged a bucket of their own as well
    (keys: the users of a trusted front end).

How to run
    python3 llm_proxy.py                 # defaults: listen on :8899, upstream Ollama on :11434
    python3 llm_proxy.py --help          # every setting, its environment variable and default
    python3 llm_proxy.py keys add NAME   # manage KEYS_FILE in place (also list, set, disable,
                                         # enable, delete, rotate); `audit`: who changed what

    Configuration comes from environment variables, each with a matching --flag (the flag wins).
    `Config.from_env` is the only place that reads them (config: one row per setting). Bind to
    127.0.0.1 unless you mean to share the proxy, and set PROXY_API_KEYS when you do: without
    it any bearer token is accepted and simply gets its own bucket. Run as a script, the file
    starts again at once as the module imported, in the same process (start_as_module, CLI):
    CPython keeps a script's parse tree for as long as it runs, two thirds of its memory.

The life of a request (in the order it happens; the sections that hold each step are named
in brackets, and the index below says where they sit)
    The sections come in dependency order, each after what it uses (as bottle's do): what a
    request needs around it first (constants, errors, config, keys, buckets, state, pricing,
    metering, API shapes, HTTP messages), then the pipeline from the inside out (routes,
    exchange, charge, forwarder, relay, local answers), and the handler that drives it after
    them. To follow a request, start at the handler and read the steps below.

    A request, as it happens:
    1. http.server's ThreadingHTTPServer runs one thread per client connection; ProxyHandler
       (handler) reads the request line and headers within the client deadlines.
    2. The path is normalised once and looked up in the route table (routes): what the route
       is (forwarded and charged, forwarded and free, answered here, admin only) and which API
       it speaks. Nothing else compares paths; what is charged is what is forwarded.
    3. An Exchange (exchange) holds the request from here to its access-log line: who it is
       from (identify), its body, its payload.
    4. Admission takes the cost from the key's bucket (charge): a Charge is held, or declined
       and the limit is answered in the route's API shape. From here on money moves in one
       place: Charge.close(ending), once, in one finally.
    5. The Forwarder (forwarder) waits for the request's turn in the fair queue, sends it
       through a keep-alive pool of upstream connections (one retry on a stale one) and reads
       the answer's head. With several model servers (UPSTREAMS_FILE), the Router (model
       servers) picks the server of the request's model, and another when the first provably
       did not run it; the charge is the same whichever runs it.
    6. The relay (relay) sends the head and the body as they arrive, never buffered whole;
       server-sent events reach the client when the upstream writes them, and a client that
       goes away closes the upstream connection at once (which stops generation). A stream's
       body is handed to the stream relay (StreamRelay), one thread that moves every stream's
       events with epoll, while the request's thread waits for it to end. The usage
       meter rewrites nothing the client asked for; it reads usage on the way. The relay
       reports how it ended; the charge closes (refund if the model never answered, else
       charged, in usage mode settled with the upstream's numbers) before the bytes that
       complete the answer are written.
    7. The access line and metrics are written from the Exchange (server parts).
    Local answers (health, metrics, admin) are functions of the server and the exchange; so
    are the two pages (the operator's dashboard at /admin, a key holder's usage at /usage),
    whose HTML, style and scripts are constants in the last section (page assets).
    ProxyServer (server) is assembled from parts: the access log, the connection cap, the
    client deadlines, the keys-file watcher, metrics, the store, the forwarder.

    Buckets refill in discrete steps (REFILL_TOKENS every REFILL_INTERVAL_SECONDS) on each bucket's
    own grid, which starts when a full bucket is first spent. A full bucket is therefore the same
    as a new one and is dropped from memory: the store only holds keys that have spent something
    recently. Buckets live in this process's memory, or, with REDIS_URL, in Redis/Valkey shared
    by several instances (the redis package is imported only then; the proxy stays
    standard-library only).

Sections (`grep -n '^# ####' llm_proxy.py` gives their lines)
    constants       fixed limits, header sets, the route kinds
    errors          ConfigError, ProxyError (the error boundary's one exception)
    config          SETTINGS (one row per setting), Config, the --flags
    keys            KeyPolicy, KeyRing, the keys file (read and written in place), the
                    users of a trusted front end: who may ask, with which limits
    buckets         Quota, the memory and Redis bucket stores, calendar quotas
    state           the SQLite state file, its writer, the usage ledger, the audit trail
    pricing         what a request takes at admission (estimate, reserve)
    metering        the meters that read what an answer really cost
    API shapes      one class per API: what a request asks for, errors, the limit answer
    HTTP messages   header parsing, path normalising, the CORS policy
    routes          Route, DEFAULT_ROUTES, RouteTable: the only place that knows a path
    exchange        Exchange: one request from its head to its access-log line
    charge          admission and Charge.close, the one place money moves
    forwarder       the fair queue (priority classes), the upstream pool, the answer's head
    model servers   several upstreams (UPSTREAMS_FILE): routing by model, health, failover
    relay           framing, BodyReader, the body relays (threads, the epoll StreamRelay)
    local answers   health, models, metrics, admin (keys managed, audit), usage, pages
    handler         ProxyHandler: steps 1 to 7 above, in the order they run
    server parts    access log, connection cap, deadlines, keys-file watcher, metrics
    server          ProxyServer, assembled from the parts
    CLI             main(): settings, binding, signals
    page assets     the dashboard's and usage page's HTML, style and scripts
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import csv
import dataclasses
import datetime
import functools
import hashlib
import hmac
import http.client
import io
import ipaddress
import json
import math
import operator
import os
import re
import secrets
import select
import sqlite3
import signal
import socket
import ssl
import stat
import struct
import sys
import tempfile
import threading
import time
import typing
import urllib.parse
import uuid
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence

_T = typing.TypeVar("_T")

__version__ = "0.1.0"
__all__ = [
    "Config", "ConfigError", "ProxyError", "KeyPolicy", "KeyRing", "load_key_ring",
    "BucketPolicy", "Quota", "MemoryBucketStore", "RedisBucketStore", "estimate_cost",
    "prompt_estimate", "request_cost", "Meter", "UsageMeter", "read_headers", "normalize_path",
    "Route", "DEFAULT_ROUTES", "RouteTable", "Exchange", "Charge", "Forwarder", "FairGate", "choose_framing", "relay",
    "Router", "ModelServer", "read_upstreams_file",
    "Metrics", "ProxyHandler", "ProxyServer", "main",
]


# ####################################################################### constants ####

COST_MODES = ("request", "estimate", "usage")

#: What a route is (the `kind` of a row of the route table).
GENERATE = "generate"   # forwarded; charged in every cost mode
EMBED = "embed"         # forwarded; charged by input size in the estimate and usage modes
FREE = "free"           # forwarded; never charged
MANAGE = "manage"       # forwarded for the admin only (model management); never charged
LOCAL = "local"         # answered by the proxy itself
ADMIN = "admin"         # answered by the proxy itself, to the admin only

#: Hop-by-hop headers (RFC 9110 section 7.6.1) are never forwarded, in either direction. The
#: others are ours to set: Host and Content-Length describe the upstream request, Authorization
#: carries the upstream key (never the client's), Expect is answered here.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
NOT_FORWARDED_UP = HOP_BY_HOP | {
    "host", "content-length", "authorization", "x-api-key", "expect", "accept-encoding",
    "x-forwarded-for",
    # llama.cpp keeps a stream running past its client's hang-up and lets others read it
    # (/v1/stream) when a request names a conversation: generation must stop with its client
    "x-conversation-id",
    "via",  # the proxy's own is appended (RFC 9110 section 7.6.3)
}
RATE_LIMIT_HEADERS = (
    "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
    "X-RateLimit-Refill-Tokens", "X-RateLimit-Refill-Seconds", "X-RateLimit-Reset-Seconds",
)
LIMIT_HEADERS = ("Retry-After", "retry-after-ms", "x-should-retry")
#: On every answer that depends on the caller's key (a private route's): nothing that keeps
#: answers (a shared cache, a browser's history) may show one caller's data to another
#: (RFC 9111 section 5.2.2.5).
NO_STORE = ("Cache-Control", "no-store")
#: Upstream headers the proxy always replaces with its own.
NOT_FORWARDED_DOWN = HOP_BY_HOP | {"content-length"} | {
    "access-control-allow-origin", "access-control-expose-headers",
    "access-control-allow-credentials", "access-control-allow-headers",
    "access-control-allow-methods", "access-control-max-age",
}
CORS_EXPOSED = ", ".join(RATE_LIMIT_HEADERS + LIMIT_HEADERS)
#: openai-python waits exactly what Retry-After says up to this many seconds; longer, it backs off
#: on its own schedule, so the proxy also says x-should-retry: false to make it fail fast. The
#: anthropic SDKs (before 2.x) and Claude Code honour at most 60 s.
SDK_MAX_RETRY_AFTER = 120
ANTHROPIC_MAX_RETRY_AFTER = 60

READ_CHUNK = 64 * 1024
READ_BUFFER = 16 * 1024             # an upstream connection's read buffer
CLIENT_READ_BUFFER = 16 * 1024
MAX_CHUNK_LINE = 1024
MAX_UPSTREAM_HEAD_BYTES = 64 * 1024  # upstream answer heads (the setting MAX_HEADER_BYTES: clients)
MAX_HEADER_LINES = 200
POOL_MAX_IDLE = 128
LISTEN_BACKLOG = 1024
DEADLINE_CHECK_SECONDS = 0.25       # how often slow clients are looked for
SHUTDOWN_CUT_SECONDS = 5.0          # after the drain, for cut answers to end
WAIT_FOR_WRITER = 10.0              # at shutdown, for the state writer's last flush
MAX_FLUSH_SECONDS = 86400.0         # STATE_FLUSH_SECONDS at most (a timer takes no more)
#: The largest token or request count a setting may name: exact in the pages' JavaScript, and
#: far inside SQLite's 64-bit integers, so that counters summing many stay storable.
MAX_COUNT = 2 ** 53 - 1
SWEEP_EVERY_SECONDS = 60.0
MAX_TRACKED_KEYS = 65536            # per-key usage counters kept (least recently used dropped)
MAX_LEDGER_ROWS = 100_000           # usage ledger rows held in memory at most (oldest hour goes)
MAX_METERED_BODY = 16 * 1024 * 1024  # a longer non-stream body is settled by estimate
MAX_PENDING_EVENT = 1024 * 1024      # a longer unterminated SSE event is passed on as it is
MAX_KEYS_FILE_BYTES = 32 * 1024 * 1024  # about 200,000 keys
AUDIT_MEMORY_ROWS = 10_000  # audit rows kept in memory when there is no state file
KEYS_SETTLE_SECONDS = 2.0           # a changed keys file is loaded once unchanged this long


# ########################################################################## errors ####

class ConfigError(ValueError):
    """A setting is invalid; the message names it and is shown as one line at start-up."""


class ProxyError(Exception):
    """An error the client gets as OpenAI-shaped JSON: {"error": {message, type, param, code}}.

    Raised anywhere below the handler; the handler's one error boundary sends it, or, once
    response headers are out, closes the connection instead.
    """

    def __init__(self, status: HTTPStatus, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: Sequence[tuple[str, str]] = (), close: bool = False,
                 wait: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = tuple(headers)
        self.close = close
        self.wait = wait  # a limit's 429: seconds until the request could be admitted

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


class NeverAdmitted(ProxyError):
    """A request that costs more than its key's bucket (or a token quota) can ever hold: a 400
    naming the figures, or in message mode the limit said as an answer (`text`)."""

    def __init__(self, cost: int, ceiling: int, holder: str,
                 tools: tuple[int, int] = (0, 0)) -> None:
        count, tokens = tools
        if tokens and (tokens * 2 >= cost or cost - tokens <= ceiling):
            # (a chat client's built-in tools: its user cannot send less, its operator can)
            cause = (f"{tokens} of them are the definitions of the {count} tools it carries; "
                     "turn tools off for this model in the client, raise the limit, or use "
                     "TOKEN_COST_MODE=usage with max_reserve_tokens")
            super().__init__(HTTPStatus.BAD_REQUEST,
                             f"This request would cost {cost} tokens, but {holder} at most "
                             f"{ceiling}, so it can never be admitted: {cause}.",
                             code="request_exceeds_bucket")
            self.text = (f"limit reached: this request needs {cost} tokens but {holder} at most "
                         f"{ceiling}; {cause}")
            return
        super().__init__(HTTPStatus.BAD_REQUEST,
                         f"This request would cost {cost} tokens, but {holder} at most "
                         f"{ceiling}, so it can never be admitted. Send a shorter request or a "
                         "smaller max_tokens.", code="request_exceeds_bucket")
        self.text = (f"limit reached: this request needs {cost} tokens but {holder} at most "
                     f"{ceiling}; start a new conversation or ask for a shorter answer")


class UpstreamUnreachable(ProxyError):
    """The upstream could not be reached (refused, no route, TLS refused): nothing was sent."""

    def __init__(self, status: HTTPStatus, message: str, code: str) -> None:
        super().__init__(status, message, type="server_error", code=code)


class StoreUnavailable(ProxyError):
    """The shared bucket store cannot be reached and REDIS_FAILURE_MODE=closed: a 503."""

    def __init__(self, retry_after: float) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(HTTPStatus.SERVICE_UNAVAILABLE, "The rate-limit store is unreachable; "
                         "requests are refused until it is back. Please try again shortly.",
                         type="server_error", code="store_unavailable",
                         headers=[("Retry-After", str(seconds))])


class ClientGone(Exception):
    """The client closed its connection; nothing more can be sent to it."""


class UpstreamTimeout(Exception):
    """The upstream sent nothing for READ_TIMEOUT seconds."""


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": param,
                                 "code": code}}).encode()


# ########################################################################## config ####

# Each setting is one row of SETTINGS: its environment variable, the default as one would type
# it, the parser that checks it, the help line, and any older names. Config's fields, their
# defaults, the --flags, --help and from_env are all made from these rows.

#: Numbers in settings are written in ASCII digits: int() and float() also read other
#: scripts' digits (PORT=\u0668\u0668\u0669\u0669 is 8899 to them), which no one types on purpose.
_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+")
_DECIMAL_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _integer(minimum: int = 1, maximum: int | None = None) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        if not _WHOLE_NUMBER.fullmatch(raw.strip()):
            raise ConfigError(f"{name} must be a whole number, got {raw!r}")
        value = int(raw.strip())
        if value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{name} must be at most {maximum}, got {value}")
        return value
    return parse


def _seconds(name: str, raw: str) -> float:
    if not _DECIMAL_NUMBER.fullmatch(raw.strip()):
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}")
    value = float(raw.strip())
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def _flush_seconds(name: str, raw: str) -> float:
    value = _seconds(name, raw)
    if value > MAX_FLUSH_SECONDS:
        raise ConfigError(f"{name} must be at most {_number(MAX_FLUSH_SECONDS)} seconds, got "
                          f"{raw!r}")
    return value


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
        return value
    return parse


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 0 or 1, got {raw!r}")


def _url(name: str, raw: str) -> str:
    url = raw.strip()
    # urlsplit() drops tabs, CR and LF without a word (bpo-43882), but the URL's path goes
    # into every upstream request line as written: a line break there would split the request
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ConfigError(f"{name} must not contain spaces or control characters, got {raw!r}")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"{name} is not a valid URL: {raw!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http:// or https:// URL, got {raw!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{name} must not have a query or fragment, got {raw!r}")
    return url.rstrip("/")


def _redis_url(name: str, raw: str) -> str:
    url = raw.strip()
    if url and urllib.parse.urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{name} must be a redis://, rediss:// or unix:// URL")
    return url


def _key(name: str, raw: str) -> str:
    key = raw.strip()
    if any(not "!" <= ch <= "~" for ch in key):  # it goes into a header line as it is
        raise ConfigError(f"{name} must be printable ASCII without spaces")
    return key


def _state_db(name: str, raw: str) -> str:
    return raw.strip()


def _optional_count(name: str, raw: str) -> int | None:
    return _integer(1, MAX_COUNT)(name, raw) if raw.strip() else None


def _zone(name: str, raw: str) -> str:
    zone = raw.strip() or "UTC"
    if zone.upper() != "UTC":  # (the default is checked at import, before time_zone exists)
        time_zone(zone)  # ConfigError for an unknown zone
    return zone


def _optional_url(name: str, raw: str) -> str:
    return _url(name, raw) if raw.strip() else ""


_ROUTE_KINDS = ("generate", "embed", "free", "manage")
_ROUTE_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+=:@/-]*")


def _extra_routes(name: str, raw: str) -> tuple[tuple[str, str, str], ...]:
    """'METHOD /path kind, ...' -> ((METHOD, path, kind), ...)."""
    rows = []
    for item in (i.strip() for i in raw.split(",")):
        if not item:
            continue
        words = item.split()
        if len(words) != 3:
            raise ConfigError(f"{name}: {item!r} must be 'METHOD /path kind'")
        method, path, kind = words[0].upper(), words[1], words[2].lower()
        if method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            raise ConfigError(f"{name}: {item!r}: the method must be GET, POST, PUT, PATCH or "
                              "DELETE")
        if not _ROUTE_PATH.fullmatch(path) or "//" in path or "/./" in path or "/../" in path \
                or ("*" in path and not path.endswith("/*")) or path.count("*") > 1:
            raise ConfigError(f"{name}: {item!r}: the path must be a plain absolute path "
                              "(a trailing /* covers what is below it)")
        if kind not in _ROUTE_KINDS:
            raise ConfigError(f"{name}: {item!r}: the kind must be one of "
                              f"{', '.join(_ROUTE_KINDS)}")
        taken = BUILT_IN_ROUTES.overlap(method, path.rstrip("*"))
        if taken is not None:  # (or a row could make chat free, or forward /metrics)
            shown = taken.path + ("*" if taken.path.endswith("/") else "")
            raise ConfigError(f"{name}: {item!r}: {method} {shown} is the proxy's own route; "
                              "a row adds routes and never replaces one")
        rows.append((method, path, kind))
    return tuple(rows)


def _origins(name: str, raw: str) -> tuple[str, ...]:
    """'' (the default for the mode), ('*',), ('none',) or origins like 'https://chat.lan'."""
    origins = tuple(o.strip().rstrip("/").lower() for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin not in ("*", "none") and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ConfigError(f"{name}: {origin!r} is not an origin (scheme://host[:port]), "
                              "* or none")
    if len(origins) > 1 and ({"*", "none"} & set(origins)):
        raise ConfigError(f"{name}: * and none stand alone")
    return origins


def _keys(name: str, raw: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in raw.split(",") if k.strip())


def _text(name: str, raw: str) -> str:
    return raw.strip()


def _verbatim(name: str, raw: str) -> str:
    return raw


#: A DNS name (underscores allowed: container names have them) whose last label starts with a
#: letter (RFC 3696 section 2), so that 999.1.1.1 is a bad address rather than a name.
_HOST_NAME = re.compile(r"(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                        r"[A-Za-z]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?")


def _host(name: str, raw: str) -> str:
    """An IPv4 or IPv6 address, or a host name (_HOST_NAME). Whether the name resolves to an
    address of this machine is known only when binding (main says so in one line)."""
    host = raw.strip() or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.fullmatch(host):
            raise ConfigError(f"{name} must be an IP address or a host name, got {raw!r}") \
                from None
    return host


@dataclass(frozen=True)
class Setting:
    """One setting: its environment variable (and older names), default, parser and help."""
    env: str
    default: str
    parse: Callable[[str, str], object]
    help: str
    aliases: tuple[str, ...] = ()

    @property
    def field(self) -> str:
        return self.env.lower()

    @property
    def flag(self) -> str:
        return "--" + self.env.lower().replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("HOST", "0.0.0.0", _host,
            "address to listen on (127.0.0.1 keeps it to this machine)"),
    Setting("PORT", "8899", _integer(0, 65535), "port to listen on (0 picks a free one)"),
    Setting("BASE_API_URL", "http://127.0.0.1:11434/v1", _url,
            "upstream base URL including /v1 (http or https)", ("UPSTREAM_BASE_URL",)),
    Setting("BASE_API_KEY", "", _key,
            "key sent upstream as 'Authorization: Bearer ...' (the client's is never forwarded)",
            ("UPSTREAM_API_KEY",)),
    Setting("BASE_MODEL", "", _text,
            "when set, the model of every charged request is rewritten to it and /v1/models "
            "lists only it", ("UPSTREAM_MODEL",)),
    Setting("MAX_TOKENS", "10", _integer(1, MAX_COUNT), "bucket size (tokens)"),
    Setting("REFILL_TOKENS", "2", _integer(1, MAX_COUNT), "tokens added at each refill"),
    Setting("REFILL_INTERVAL_SECONDS", "300", _seconds, "seconds between refills"),
    Setting("REQUEST_TOKEN_COST", "1", _integer(1, MAX_COUNT),
            "cost of one completion request in request mode"),
    Setting("TOKEN_COST_MODE", "request", _choice(*COST_MODES),
            "request (flat cost), estimate (UTF-8 bytes of the text plus the response reserve) or "
            "usage (reserve the estimate, then settle with the upstream's reported usage)"),
    Setting("RESPONSE_TOKEN_RESERVE", "256", _integer(0, MAX_COUNT),
            "estimate mode: tokens reserved for the answer when the request sets no max_tokens"),
    Setting("MAX_OUTPUT_TOKENS", "4096", _integer(1, MAX_COUNT),
            "usage mode: a request that sets no output limit is forwarded with one, at most "
            "this, and never more than its key's bucket and token quotas still hold (held "
            "with its reservation, so a burst cannot overshoot them)"),
    Setting("MAX_RESERVE_TOKENS", "0", _integer(0, MAX_COUNT),
            "usage mode: the most one request reserves at admission (0: all it may cost); "
            "what it costs beyond is settled as debt when it ends (for agents that ask for "
            "large max_tokens)"),
    Setting("PROXY_API_KEYS", "", _keys,
            "comma-separated client keys; when set, any other or missing key gets 401"),
    Setting("LIMIT_RESPONSE", "message", _choice("message", "429"),
            "what an empty bucket answers: message (200, an assistant message) or 429"),
    Setting("OPEN_TIMEOUT", "10", _seconds, "seconds to connect to the upstream"),
    Setting("READ_TIMEOUT", "120", _seconds,
            "seconds the upstream may stay silent before a response or between two reads"),
    Setting("MAX_BODY_BYTES", str(32 * 1024 * 1024), _integer(), "largest request body"),
    Setting("TRUST_FORWARDED_FOR", "0", _flag,
            "1: bucket keyless clients by the last X-Forwarded-For address (behind a proxy you run)"),
    Setting("CLIENT_HEADER_TIMEOUT", "10", _seconds,
            "seconds a client has to send its request line and headers"),
    Setting("CLIENT_BODY_TIMEOUT", "30", _seconds,
            "seconds a client has to send its request body"),
    Setting("KEEPALIVE_TIMEOUT", "75", _seconds,
            "seconds an idle kept-alive client connection stays open"),
    Setting("SEND_TIMEOUT", "60", _seconds,
            "seconds a client may take to accept one write of an answer (however it trickles)"),
    Setting("STREAM_RELAY", "loop", _choice("loop", "threads"),
            "how stream bodies are relayed: loop (one thread on epoll for all of them; Linux, "
            "plain-HTTP upstreams) or threads (each by the thread that read its request)"),
    Setting("DRAIN_TIMEOUT", "30", _seconds,
            "seconds requests in flight may take to finish after SIGTERM; streams still running "
            "then are ended with an error event"),
    Setting("MAX_HEADER_BYTES", str(32 * 1024), _integer(1024),
            "longest request line (else 414) and largest header block (else 431)"),
    Setting("MAX_CONNECTIONS", "1024", _integer(),
            "client connections at once; beyond it new ones get 503"),
    Setting("MAX_UPSTREAM_CONCURRENCY", "0", _integer(0),
            "requests in flight to the upstream at once (0: unlimited); the rest queue fairly"),
    Setting("UPSTREAM_QUEUE_TIMEOUT", "60", _seconds,
            "seconds a request may wait in that queue before a 503"),
    Setting("FAIR_QUEUE", "1", _flag,
            "1: a freed upstream slot goes to the key with the fewest in flight; 0: first come"),
    Setting("MAX_CONCURRENT_PER_KEY", "0", _integer(0),
            "requests one key may have in flight at once (0: unlimited)"),
    Setting("PRIORITY_MAX_WAIT_SECONDS", "30", _seconds,
            "seconds a low-priority request waits for an upstream slot before it is served as "
            "normal"),
    Setting("REDIS_URL", "", _redis_url,
            "redis://, rediss:// or unix:// URL: keep buckets in Redis/Valkey, shared by every "
            "instance (needs the redis package)"),
    Setting("REDIS_PREFIX", "llm_proxy:", _verbatim, "prefix of the proxy's Redis keys"),
    Setting("REDIS_TIMEOUT", "0.25", _seconds,
            "seconds a request may wait for Redis before the failure mode applies"),
    Setting("REDIS_FAILURE_MODE", "local", _choice("local", "closed"),
            "while Redis is unreachable: local (per-instance buckets) or closed (503)"),
    Setting("KEYS_FILE", "", _text,
            "JSON or TOML file of named keys with their own limits; reloaded on change and SIGHUP "
            f"once unchanged for {KEYS_SETTLE_SECONDS:g} s"),
    Setting("CORS_ORIGINS", "", _origins,
            "web origins whose pages may call the API routes: comma-separated, * for any, none "
            "(empty: * when keys are required, none in open mode); admin routes: never"),
    Setting("STATE_DB", "", _state_db,
            "SQLite file keeping balances, counters, quotas and the usage ledger across restarts "
            "(empty: $XDG_STATE_HOME/llm_proxy/state-PORT.db, else ~/.local/state/...; off: "
            "memory only)"),
    Setting("STATE_FLUSH_SECONDS", "1", _flush_seconds,
            "seconds between two writes of what changed to STATE_DB (at most this much is lost "
            "if the process is killed; at most 86400)"),
    Setting("LEDGER_RETENTION_DAYS", "400", _integer(1), "days of usage the ledger keeps"),
    Setting("TOKENS_PER_DAY", "", _optional_count,
            "tokens each key may be charged per day (empty: no such quota)"),
    Setting("TOKENS_PER_MONTH", "", _optional_count,
            "tokens each key may be charged per calendar month (empty: no such quota)"),
    Setting("REQUESTS_PER_DAY", "", _optional_count,
            "charged requests each key may make per day (empty: no such quota)"),
    Setting("QUOTA_TIMEZONE", "UTC", _zone,
            "IANA time zone in which days and months turn over, e.g. Europe/Berlin"),
    Setting("MAX_BUCKETS", "100000", _integer(0),
            "open mode: buckets held at most, the least recently used forgotten beyond it "
            "(0: no limit)"),
    Setting("ADMIN_API_KEY", "", _key,
            "bearer token for /metrics, the /admin routes and page and Ollama's model "
            "management (unset: loopback clients only)"),
    Setting("LOG_FORMAT", "text", _choice("text", "json"),
            "text, or json for one JSON object per line"),
    Setting("NATIVE_API_URL", "", _optional_url,
            "the upstream's root, where Ollama's native /api routes are forwarded (default: "
            "BASE_API_URL without its trailing /v1)"),
    Setting("UPSTREAMS_FILE", "", _text,
            "JSON or TOML file of several model servers (name, url, models, ...) and model "
            "aliases; requests go to a server of their model; reloaded on change and SIGHUP "
            "(empty: BASE_API_URL serves every model)"),
    Setting("MODELS_REFRESH_SECONDS", "60", _seconds,
            "seconds between two reads of the model list of an UPSTREAMS_FILE server that "
            "names no models of its own"),
    Setting("EXTRA_ROUTES", "", _extra_routes,
            "more routes to forward, comma-separated 'METHOD /path kind' (kind: generate, embed, "
            "free or manage; a path ending in /* covers what is below it)"),
)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, not usage + message
        raise ConfigError(message)


_SETTING_OF = {setting.env: setting for setting in SETTINGS}


def _default(env: str) -> typing.Any:
    """The default of a setting (its row's default, parsed): a Config field's default."""
    setting = _SETTING_OF[env]
    return setting.parse(env, setting.default)


def _setting_text(env: str, value: object) -> str:
    """A setting's value written back as its text, for its row's parser to check."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if isinstance(value, tuple) and all(isinstance(v, tuple) and len(v) == 3
                                        and all(isinstance(w, str) for w in v) for v in value):
        return ",".join(" ".join(row) for row in value)
    raise ConfigError(f"{env}: {value!r} is not a value of this setting")


@dataclass(frozen=True)
class Config:
    """Every setting, validated: one field per row of SETTINGS (HOST is `host`, MAX_TOKENS is
    `max_tokens`, ...), defaulting to the row's default. Built once by `from_env` in main();
    handlers read `server.config`; tests make one directly: Config(port=0, max_tokens=3).

    Each field is checked by its row's parser (__post_init__): a string is read as the
    setting's text (Config(proxy_api_keys="sk-a,sk-b") is two keys), any other value must be
    one the parser gives back unchanged (else ConfigError naming the setting). The rows say
    what a setting is; the fields here only give each a name and a type (a test and the
    import-time check below keep the two in step).
    """

    host: str = _default("HOST")
    port: int = _default("PORT")
    base_api_url: str = _default("BASE_API_URL")
    base_api_key: str = _default("BASE_API_KEY")
    base_model: str = _default("BASE_MODEL")
    max_tokens: int = _default("MAX_TOKENS")
    refill_tokens: int = _default("REFILL_TOKENS")
    refill_interval_seconds: float = _default("REFILL_INTERVAL_SECONDS")
    request_token_cost: int = _default("REQUEST_TOKEN_COST")
    token_cost_mode: str = _default("TOKEN_COST_MODE")
    response_token_reserve: int = _default("RESPONSE_TOKEN_RESERVE")
    max_output_tokens: int = _default("MAX_OUTPUT_TOKENS")
    max_reserve_tokens: int = _default("MAX_RESERVE_TOKENS")
    proxy_api_keys: tuple[str, ...] = _default("PROXY_API_KEYS")
    limit_response: str = _default("LIMIT_RESPONSE")
    open_timeout: float = _default("OPEN_TIMEOUT")
    read_timeout: float = _default("READ_TIMEOUT")
    max_body_bytes: int = _default("MAX_BODY_BYTES")
    trust_forwarded_for: bool = _default("TRUST_FORWARDED_FOR")
    client_header_timeout: float = _default("CLIENT_HEADER_TIMEOUT")
    client_body_timeout: float = _default("CLIENT_BODY_TIMEOUT")
    keepalive_timeout: float = _default("KEEPALIVE_TIMEOUT")
    send_timeout: float = _default("SEND_TIMEOUT")
    stream_relay: str = _default("STREAM_RELAY")
    drain_timeout: float = _default("DRAIN_TIMEOUT")
    max_header_bytes: int = _default("MAX_HEADER_BYTES")
    max_connections: int = _default("MAX_CONNECTIONS")
    max_upstream_concurrency: int = _default("MAX_UPSTREAM_CONCURRENCY")
    upstream_queue_timeout: float = _default("UPSTREAM_QUEUE_TIMEOUT")
    fair_queue: bool = _default("FAIR_QUEUE")
    max_concurrent_per_key: int = _default("MAX_CONCURRENT_PER_KEY")
    priority_max_wait_seconds: float = _default("PRIORITY_MAX_WAIT_SECONDS")
    redis_url: str = _default("REDIS_URL")
    redis_prefix: str = _default("REDIS_PREFIX")
    redis_timeout: float = _default("REDIS_TIMEOUT")
    redis_failure_mode: str = _default("REDIS_FAILURE_MODE")
    keys_file: str = _default("KEYS_FILE")
    cors_origins: tuple[str, ...] = _default("CORS_ORIGINS")
    state_db: str = _default("STATE_DB")
    state_flush_seconds: float = _default("STATE_FLUSH_SECONDS")
    ledger_retention_days: int = _default("LEDGER_RETENTION_DAYS")
    tokens_per_day: int | None = _default("TOKENS_PER_DAY")
    tokens_per_month: int | None = _default("TOKENS_PER_MONTH")
    requests_per_day: int | None = _default("REQUESTS_PER_DAY")
    quota_timezone: str = _default("QUOTA_TIMEZONE")
    max_buckets: int = _default("MAX_BUCKETS")
    admin_api_key: str = _default("ADMIN_API_KEY")
    log_format: str = _default("LOG_FORMAT")
    native_api_url: str = _default("NATIVE_API_URL")
    upstreams_file: str = _default("UPSTREAMS_FILE")
    models_refresh_seconds: float = _default("MODELS_REFRESH_SECONDS")
    extra_routes: tuple[tuple[str, str, str], ...] = _default("EXTRA_ROUTES")

    def __post_init__(self) -> None:
        for setting in SETTINGS:
            value = getattr(self, setting.field)
            if isinstance(value, str):
                checked = setting.parse(setting.env, value)
            else:
                checked = setting.parse(setting.env, _setting_text(setting.env, value))
                if checked != value or type(checked) is not type(value) and not (
                        isinstance(checked, float) and type(value) is int):
                    raise ConfigError(f"{setting.env}: {value!r} is not a value of this "
                                      f"setting (read as text it is {checked!r})")
            if checked is not value:
                object.__setattr__(self, setting.field, checked)
        if self.base_model and self.upstreams_file:  # (rows check one setting each)
            raise ConfigError("BASE_MODEL and UPSTREAMS_FILE cannot be used together: the "
                              "servers are chosen by each request's model; give a name to a "
                              "model with the file's aliases instead")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 argv: Sequence[str] | None = None) -> "Config":
        """Read the environment, let --flags override it, validate, and return the Config.

        The only place settings are read. Raises ConfigError naming the variable on the first
        invalid value.
        """
        environ = os.environ if environ is None else environ
        flags = vars(build_arg_parser().parse_args(argv))
        values: dict[str, typing.Any] = {}
        for setting in SETTINGS:
            raw = flags.get(setting.field)
            names = (setting.env, *setting.aliases)
            if raw is None:
                raw = next((environ[n] for n in names if n in environ), setting.default)
            values[setting.field] = setting.parse(setting.env, raw)
        return cls(**values)

    @property
    def bucket_policy(self) -> "BucketPolicy":
        return BucketPolicy(self.max_tokens, self.refill_tokens, self.refill_interval_seconds)

    @property
    def default_policy(self) -> "KeyPolicy":
        """The policy of every key that the keys file does not describe."""
        return KeyPolicy(None, self.bucket_policy, self.request_token_cost,
                         self.token_cost_mode, self.limit_response,
                         self.response_token_reserve,
                         calendar=CalendarLimits(self.tokens_per_day, self.tokens_per_month,
                                                 self.requests_per_day),
                         max_output_tokens=self.max_output_tokens,
                         max_reserve_tokens=self.max_reserve_tokens)

    def warnings(self) -> list[str]:
        """Settings that are valid but almost certainly not what the operator meant."""
        found = []
        if self.token_cost_mode != "request" and self.max_tokens < self.response_token_reserve:
            found.append(
                f"TOKEN_COST_MODE={self.token_cost_mode} with MAX_TOKENS={self.max_tokens} "
                f"below RESPONSE_TOKEN_RESERVE={self.response_token_reserve}: every request "
                "that does not set a small max_tokens costs more than a bucket holds and is "
                "refused")
        return found


if [f.name for f in dataclasses.fields(Config)] != [s.field for s in SETTINGS]:
    raise AssertionError("Config's fields and the rows of SETTINGS differ")  # (at import)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="llm_proxy.py",
        description="Share one OpenAI-compatible LLM server, with a token bucket per API key. "
                    "Every setting is an environment variable; its --flag overrides it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llm_proxy {__version__}")
    for s in SETTINGS:
        default = "(empty)" if not s.default else s.default
        names = " or ".join((s.env, *s.aliases))
        parser.add_argument(s.flag, dest=s.field, metavar=s.env, default=None,
                            help=f"{s.help} [env {names}; default {default}]")
    return parser


# ############################################################################ keys ####

@dataclass(frozen=True)
class KeyPolicy:
    """What one client key may do: its bucket, how its requests are charged, how its limit
    speaks, which models it may use. Keys outside the keys file get Config.default_policy."""
    name: str | None
    bucket: "BucketPolicy"
    request_token_cost: int
    token_cost_mode: str
    limit_response: str
    response_token_reserve: int
    models: frozenset[str] | None = None
    disabled: bool = False
    calendar: "CalendarLimits" = None  # type: ignore[assignment]  # (set by __post_init__)
    max_output_tokens: int = 4096   # usage mode: the most an answer without a limit may run to
    max_reserve_tokens: int = 0     # usage mode: the most a request reserves (0: all it may cost)
    expires_at: float | None = None  # (wall clock) from then on the key gets 401 key_expired
    expires_text: str = ""          # expires_at as the file says it, for the 401's message
    priority: str = "normal"        # its class in the upstream queue (PRIORITIES)
    max_concurrent: int | None = None  # its own MAX_CONCURRENT_PER_KEY; the rest queue
    previous_digest: str = ""       # a rotated-out key, still accepted until previous_until
    previous_until: float = 0.0
    bucket_digest: str = ""         # set by a rotation: the bucket stays the first key's

    def bucket_key(self, digest: str) -> str:
        """The key of its bucket in the store: the first digest it had, across rotations."""
        return "key:" + (self.bucket_digest or digest)
    users: "UserPolicy | None" = None  # a trusted front end: each of its users has limits too

    def __post_init__(self) -> None:
        if self.calendar is None:
            object.__setattr__(self, "calendar", CalendarLimits())


#: The upstream queue's classes, the first served first (FairGate).
PRIORITIES = ("high", "normal", "low")

#: Fields of a keys-file entry, with the check each value must pass.
_ENTRY_FIELDS: dict[str, Callable[[typing.Any], bool]] = {
    "name": lambda v: isinstance(v, str) and bool(v.strip()),
    "key": lambda v: isinstance(v, str) and bool(v) and all("!" <= c <= "~" for c in v),
    "key_sha256": lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-fA-F]{64}", v) is not None,
    "max_tokens": lambda v: type(v) is int and 1 <= v <= MAX_COUNT,
    "refill_tokens": lambda v: type(v) is int and 1 <= v <= MAX_COUNT,
    "refill_interval_seconds": lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0,
    "request_token_cost": lambda v: type(v) is int and 1 <= v <= MAX_COUNT,
    "token_cost_mode": lambda v: v in COST_MODES,
    "limit_response": lambda v: v in ("message", "429"),
    "models": lambda v: isinstance(v, list) and all(isinstance(m, str) and m for m in v),
    "disabled": lambda v: isinstance(v, bool),
    "max_output_tokens": lambda v: type(v) is int and 1 <= v <= MAX_COUNT,
    "max_reserve_tokens": lambda v: type(v) is int and 0 <= v <= MAX_COUNT,
    "tokens_per_day": lambda v: v is None or type(v) is int and 1 <= v <= MAX_COUNT,
    "tokens_per_month": lambda v: v is None or type(v) is int and 1 <= v <= MAX_COUNT,
    "requests_per_day": lambda v: v is None or type(v) is int and 1 <= v <= MAX_COUNT,
    "expires_at": lambda v: isinstance(v, str) and _moment_form(v),
    "priority": lambda v: v in PRIORITIES,
    "max_concurrent": lambda v: type(v) is int and 1 <= v <= MAX_COUNT,
    "note": lambda v: isinstance(v, str) and len(v) <= 1000,
    "created_at": lambda v: isinstance(v, str) and _moment_form(v),
    "previous_key_sha256": lambda v: isinstance(v, str)
    and re.fullmatch(r"[0-9a-fA-F]{64}", v) is not None,
    "previous_valid_until": lambda v: isinstance(v, str) and _moment_form(v),
    "bucket_sha256": lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
    "users": lambda v: isinstance(v, dict),
}
_COUNT_RULE = f"a whole number from 1 to {MAX_COUNT}"
_FIELD_RULES = {
    "name": "a non-empty string", "key": "printable ASCII without spaces",
    "key_sha256": "64 hex digits", "max_tokens": _COUNT_RULE, "refill_tokens": _COUNT_RULE,
    "refill_interval_seconds": "a positive number", "request_token_cost": _COUNT_RULE,
    "token_cost_mode": "one of " + ", ".join(COST_MODES),
    "limit_response": "message or 429", "models": "a list of model names",
    "disabled": "true or false", "tokens_per_day": _COUNT_RULE + ", or null",
    "tokens_per_month": _COUNT_RULE + ", or null", "requests_per_day": _COUNT_RULE + ", or null",
    "max_output_tokens": _COUNT_RULE,
    "max_reserve_tokens": f"a whole number from 0 (reserve all a request may cost) to {MAX_COUNT}",
    "expires_at": "a date (2027-01-31) or a date and time (2027-01-31T18:00), in QUOTA_TIMEZONE "
                  "unless it gives an offset",
    "priority": "high, normal or low", "max_concurrent": _COUNT_RULE,
    "note": "a string of at most 1000 characters", "created_at": "a date and time",
    "previous_key_sha256": "64 hex digits", "previous_valid_until": "a date and time",
    "bucket_sha256": "64 lower-case hex digits",
    "users": 'an object ({"from": "header:NAME" or "body:user", and the limits of each user})',
}


def from_iso(text: str) -> datetime.datetime:
    """datetime.fromisoformat, reading a trailing Z as UTC on Python 3.10 too (3.11 does)."""
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    return datetime.datetime.fromisoformat(text)


def _moment_form(text: str) -> bool:
    try:
        from_iso(text)
    except ValueError:
        return False
    return True


def parse_moment(text: str, tz: datetime.tzinfo) -> float:
    """A keys-file date ("2027-01-31": its first moment) or date and time as a wall-clock
    timestamp; without an offset it is in `tz` (QUOTA_TIMEZONE)."""
    moment = from_iso(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    return moment.timestamp()


def utc_text(moment: float) -> str:
    """A timestamp as the keys file and the audit trail write it: 2026-12-07T00:31:27Z."""
    return datetime.datetime.fromtimestamp(moment, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def read_keys_file(path: str) -> list[dict]:
    """The entries of a keys file: JSON {"keys": [...]}, or TOML ([[keys]] tables) when the
    name ends in .toml. Raises ConfigError naming the file. A file that does not exist yet, in
    a folder that does, holds no keys (the first run: every request is refused until the first
    key is made)."""
    if not os.path.lexists(path) and os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return []
    document = read_settings_file(path, "KEYS_FILE")
    if not isinstance(document.get("keys"), list) or set(document) != {"keys"}:
        raise ConfigError(f'KEYS_FILE {path}: the file must hold only a "keys" list')
    return document["keys"]


def read_settings_file(path: str, setting: str) -> dict:
    """The document of a file a setting names (KEYS_FILE, UPSTREAMS_FILE): a JSON object, or
    TOML when the name ends in .toml. Raises ConfigError naming the setting and the file. Only
    a regular file of at most MAX_KEYS_FILE_BYTES is read: /dev/zero would fill the memory,
    and opening a FIFO would wait for a writer (hence O_NONBLOCK, which does nothing to a
    regular file)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"{setting} {path}: not a regular file")
            data = f.read(MAX_KEYS_FILE_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{setting} {path}: cannot be read ({err.strerror or err})") from None
    if len(data) > MAX_KEYS_FILE_BYTES:
        raise ConfigError(f"{setting} {path}: larger than {MAX_KEYS_FILE_BYTES} bytes")
    try:
        if path.endswith(".toml"):
            import tomllib  # Python 3.11+; only needed for TOML files
            document = tomllib.loads(data.decode("utf-8"))
        else:
            document = json.loads(data)
    except ImportError:
        raise ConfigError(f"{setting} {path}: TOML needs Python 3.11 or newer; use JSON") \
            from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{setting} {path}: not valid "
                          f"{'TOML' if path.endswith('.toml') else 'JSON'}: {err}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{setting} {path}: the file must hold a table/object")
    return document


def key_policies(entries: Sequence[object], config: Config, path: str = "KEYS_FILE",
                 pause: Callable[[], None] | None = None) -> list[tuple[str, KeyPolicy]]:
    """(SHA-256 hex digest of the key, its policy) for each keys-file entry, validated: unknown
    fields, missing or duplicate names, both or neither of key / key_sha256 are errors. The
    ConfigError names the file, the entry and the field. `pause` is called every 256 entries:
    a reload in the background lets request threads have the GIL."""
    base = config.default_policy
    found: list[tuple[str, KeyPolicy]] = []
    names: set[str] = set()
    digests: set[str] = set()
    for index, entry in enumerate(entries):
        if pause is not None and index % 256 == 255:
            pause()
        where = f"{path}: keys[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: an entry must be a table/object")
        if isinstance(entry.get("name"), str):
            where += f" ({entry['name']})"
        for field, value in entry.items():
            if field not in _ENTRY_FIELDS:
                raise ConfigError(f"{where}: unknown field {field!r}")
            if not _ENTRY_FIELDS[field](value):
                raise ConfigError(f"{where}: {field} must be {_FIELD_RULES[field]}")
        if "name" not in entry:
            raise ConfigError(f"{where}: name is required")
        if ("key" in entry) == ("key_sha256" in entry):
            raise ConfigError(f"{where}: give exactly one of key and key_sha256")
        digest = key_digest(entry["key"]) if "key" in entry else entry["key_sha256"].lower()
        if entry["name"] in names:
            raise ConfigError(f"{where}: name is used by another entry")
        if digest in digests:
            raise ConfigError(f"{where}: key is the same as another entry's")
        names.add(entry["name"])
        digests.add(digest)
        bucket = BucketPolicy(entry.get("max_tokens", base.bucket.capacity),
                              entry.get("refill_tokens", base.bucket.refill_tokens),
                              float(entry.get("refill_interval_seconds",
                                              base.bucket.refill_interval)))
        models = frozenset(entry["models"]) if "models" in entry else None
        calendar = CalendarLimits(*(entry.get(name, getattr(base.calendar, name)) for name in (
            "tokens_per_day", "tokens_per_month", "requests_per_day")))
        found.append((digest, KeyPolicy(
            entry["name"], bucket, entry.get("request_token_cost", base.request_token_cost),
            entry.get("token_cost_mode", base.token_cost_mode),
            entry.get("limit_response", base.limit_response), base.response_token_reserve,
            models, entry.get("disabled", False), calendar,
            entry.get("max_output_tokens", base.max_output_tokens),
            entry.get("max_reserve_tokens", base.max_reserve_tokens),
            users=user_policy(entry["users"], where, bucket) if "users" in entry else None,
            **lifetime_fields(entry, time_zone(config.quota_timezone)))))
        if entry.get("previous_key_sha256", "").lower() in digests:
            raise ConfigError(f"{where}: previous_key_sha256 is another entry's key")
    return found


def lifetime_fields(entry: Mapping[str, object], tz: datetime.tzinfo) -> dict[str, typing.Any]:
    """The KeyPolicy fields of an entry's expiry, priority, concurrency and rotation."""
    fields: dict[str, typing.Any] = {"priority": entry.get("priority", "normal"),
                                 "max_concurrent": entry.get("max_concurrent")}
    if isinstance(entry.get("expires_at"), str):
        fields["expires_at"] = parse_moment(str(entry["expires_at"]), tz)
        fields["expires_text"] = str(entry["expires_at"])
    if isinstance(entry.get("bucket_sha256"), str):
        fields["bucket_digest"] = entry["bucket_sha256"]
    if isinstance(entry.get("previous_key_sha256"), str):
        fields["previous_digest"] = str(entry["previous_key_sha256"]).lower()
        fields["previous_until"] = parse_moment(str(entry.get("previous_valid_until") or
                                                    "1970-01-01T00:00:00+00:00"), tz)
    return fields


# -- the users of a trusted front end --------------------------------------------------------

# A front end (Open WebUI, LibreChat, a portal, a bot) holds one key for all of its people. Its
# keys-file entry may say where each request names its user ("users": {"from": ...}) and what
# every user may spend; then each user has a bucket and quotas of their own beside the key's,
# and a request must fit both (MemoryBucketStore.take_together). Only such a key's requests are
# read for a user: for any other key the header or field means nothing. Everything that reads
# or shows a user's name lives here: a name is an untrusted string from a trusted sender.

#: The longest user name accepted (an e-mail address is at most 254 characters).
MAX_USER_NAME = 256
#: Users a front end's key holds state for by default (the least recently active beyond are
#: forgotten: their next request starts them anew, inside the key's own limits).
DEFAULT_MAX_USERS = 10_000
#: How a user's bucket key is made from its key's: "key:<digest>" + USER_MARK + the name.
USER_MARK = "/user:"
#: What a user name may not hold: control characters (C0, DEL, C1), line and paragraph
#: separators, bidirectional overrides and other invisible format characters, lone surrogates.
_NOT_IN_NAMES = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e"
                           "\u2060-\u206f\ufeff\ud800-\udfff]")

_USER_FIELDS: dict[str, Callable[[object], bool]] = {
    "from": lambda v: isinstance(v, str) and (v == "body:user" or re.fullmatch(
        r"header:[!#$%&'*+.^_`|~0-9A-Za-z-]+", v) is not None),
    "required": lambda v: isinstance(v, bool),
    "max_users": lambda v: type(v) is int and 1 <= v <= 10_000_000,
    **{name: _ENTRY_FIELDS[name] for name in (
        "max_tokens", "refill_tokens", "refill_interval_seconds", "tokens_per_day",
        "tokens_per_month", "requests_per_day", "models", "priority")},
}
_USER_RULES = {"from": '"header:NAME" (a header name) or "body:user"', "required": "true or false",
               "max_users": "a whole number from 1 to 10000000", **_FIELD_RULES}


@dataclass(frozen=True)
class UserPolicy:
    """What each user of a trusted front end's key may do, and where a request names its
    user: `header` (a request header's name) or, when it is "", the body's `user` field."""
    header: str
    bucket: "BucketPolicy"
    calendar: "CalendarLimits"
    models: frozenset[str] | None = None
    required: bool = False
    max_users: int = DEFAULT_MAX_USERS
    priority: str | None = None     # its users' class in the upstream queue (None: the key's)

    @property
    def source(self) -> str:
        return f"the {self.header} header" if self.header else 'the body\'s "user" field'


def user_policy(value: dict, where: str, key_bucket: "BucketPolicy") -> UserPolicy:
    """The "users" object of a keys-file entry, validated (ConfigError naming the field). A
    user's bucket defaults to the key's own (each user may then spend what the key may)."""
    for field, item in value.items():
        if field not in _USER_FIELDS:
            raise ConfigError(f"{where}: users: unknown field {field!r}")
        if not _USER_FIELDS[field](item):
            raise ConfigError(f"{where}: users: {field} must be {_USER_RULES[field]}")
    if "from" not in value:
        raise ConfigError(f'{where}: users: from is required ("header:NAME" or "body:user")')
    source = value["from"]
    bucket = BucketPolicy(value.get("max_tokens", key_bucket.capacity),
                          value.get("refill_tokens", key_bucket.refill_tokens),
                          float(value.get("refill_interval_seconds", key_bucket.refill_interval)))
    return UserPolicy(
        "" if source == "body:user" else source.partition(":")[2], bucket,
        CalendarLimits(value.get("tokens_per_day"), value.get("tokens_per_month"),
                       value.get("requests_per_day")),
        frozenset(value["models"]) if "models" in value else None,
        value.get("required", False), value.get("max_users", DEFAULT_MAX_USERS),
        value.get("priority"))


def request_priority(ex: "Exchange") -> str:
    """The class a request waits in for an upstream slot: its user's (a trusted front end's
    users may have their own), else its key's."""
    policy = ex.policy
    if policy is None:
        return "normal"
    if ex.user and policy.users is not None and policy.users.priority is not None:
        return policy.users.priority
    return policy.priority


def user_name(raw: object, source: str) -> str:
    """A user's name as a front end sent it, checked: "" when none was sent; ProxyError(400)
    when it is not a string, too long, or holds control or invisible characters (a name is
    shown in pages, reports and logs, and must read there as what it is)."""
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raise ProxyError(HTTPStatus.BAD_REQUEST, f"The user named in {source} must be a "
                         "string.", code="invalid_user", param="user")
    name = raw.strip(" \t")
    if len(name) > MAX_USER_NAME or _NOT_IN_NAMES.search(name):
        raise ProxyError(HTTPStatus.BAD_REQUEST, f"The user named in {source} is not a "
                         f"usable name (at most {MAX_USER_NAME} characters, no control "
                         "characters).", code="invalid_user", param="user")
    return name


def read_user(users: UserPolicy, headers: "Headers", payload: object) -> str:
    """The user a trusted front end's request names ("" for none: the key's own work), or
    ProxyError(400) when the name is unusable or a user is required and none is named."""
    if users.header:
        values: list = headers.get_all(users.header) or []  # type: ignore[assignment]
        if len(values) > 1:
            raise ProxyError(HTTPStatus.BAD_REQUEST, f"{users.source} was sent more than "
                             "once.", code="invalid_user", param="user")
        name = user_name(values[0] if values else None, users.source)
    else:
        name = user_name(payload.get("user") if isinstance(payload, dict) else None,
                         users.source)
    if not name and users.required:
        raise ProxyError(HTTPStatus.BAD_REQUEST, f"This key makes requests for its users: "
                         f"{users.source} must name one.", code="user_required", param="user")
    return name


def user_bucket_key(bucket_key: str, user: str) -> str:
    return bucket_key + USER_MARK + user


def split_user(bucket_key: str) -> tuple[str, str]:
    """A bucket key as (its key's bucket key, the user's name); the name is "" for a key's own.
    (A key's bucket key has a fixed length, so a name holding USER_MARK reads back whole.)"""
    if bucket_key.startswith("key:") and bucket_key[68:68 + len(USER_MARK)] == USER_MARK:
        return bucket_key[:68], bucket_key[68 + len(USER_MARK):]
    return bucket_key, ""


def load_key_ring(config: Config, pause: Callable[[], None] | None = None,
                  raw: Sequence[object] | None = None) -> "KeyRing":
    """The accepted keys: the keys file's (or `raw`, its entries as already read), plus
    PROXY_API_KEYS with the global settings."""
    entries: list[tuple[str, KeyPolicy]] = []
    if config.keys_file:
        if raw is None:
            raw = read_keys_file(config.keys_file)
        entries = key_policies(raw, config, config.keys_file, pause)
    listed = {digest for digest, _ in entries}
    entries += [(key_digest(k), config.default_policy) for k in config.proxy_api_keys
                if key_digest(k) not in listed]
    return KeyRing(entries, required=bool(config.keys_file or config.proxy_api_keys), pause=pause)


def keygen(name: str) -> str:
    """A new random key and the keys-file entry for it, which holds only the key's digest."""
    key = "sk-" + secrets.token_urlsafe(32)
    digest = key_digest(key)
    return (f"key (give it to {name}; it is not stored anywhere): {key}\n\n"
            f"JSON entry:\n  {json.dumps({'name': name, 'key_sha256': digest})}\n\n"
            f"TOML entry:\n  [[keys]]\n  name = {json.dumps(name)}\n  key_sha256 = \"{digest}\"\n")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def short_hash(digest: str) -> str:
    """How a key without a name appears in logs and metrics: a short hash, never the key."""
    return digest[:10]


class KeyRing:
    """The accepted client keys and their policies, held only as SHA-256 digests.

    A lookup hashes the presented key, finds the candidates sharing the digest's first 16 hex
    digits in a dict, and compares whole digests with hmac.compare_digest. The cost does not grow
    with the number of keys, and timing reveals at most something about a hash of the key, never
    how much of the key itself was right. `required` is false when no keys are configured: then
    any key is accepted with the default policy.
    """

    _PREFIX = 16

    def __init__(self, entries: Iterable[tuple[str, KeyPolicy]], required: bool = True,
                 pause: Callable[[], None] | None = None) -> None:
        self.required = required
        self.entries = list(entries)
        #: digest prefix -> (digest, policy, the key's current digest: the same, but for a
        #: rotated-out key in its grace)
        self._by_prefix: dict[str, list[tuple[str, KeyPolicy, str]]] = {}
        for index, (digest, policy) in enumerate(self.entries):
            if pause is not None and index % 256 == 255:
                pause()
            self._by_prefix.setdefault(digest[:self._PREFIX], []).append(
                (digest, policy, digest))
            if policy.previous_digest:
                self._by_prefix.setdefault(policy.previous_digest[:self._PREFIX], []).append(
                    (policy.previous_digest, policy, digest))

    def __bool__(self) -> bool:
        return self.required

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, key: str, digest: str | None = None,
               now: float | None = None) -> KeyPolicy | None:
        """The policy of a key: its own, or, for a rotated-out key, the policy of the key that
        replaced it while `now` is before the end of its grace (None: no grace at all)."""
        found = self.find(digest or key_digest(key), now)
        return found[1] if found is not None else None

    def find(self, digest: str, now: float | None = None) -> tuple[str, KeyPolicy] | None:
        """(the current key's digest, its policy) for a digest (as lookup)."""
        found = None
        for candidate, policy, current in self._by_prefix.get(digest[:self._PREFIX], ()):
            if hmac.compare_digest(candidate, digest):
                if candidate == current:
                    found = (candidate, policy)
                elif now is not None and now < policy.previous_until:
                    found = (current, policy)
        return found


# -- changing the keys file (the API, the command line, the dashboard) ------------------------

#: Fields a change may set; the others (the digest, created_at, the rotation's) are the
#: proxy's to write.
_PROXYS_FIELDS = ("name", "key", "key_sha256", "created_at", "previous_key_sha256",
                  "previous_valid_until", "bucket_sha256")
SETTABLE_FIELDS = tuple(f for f in _ENTRY_FIELDS if f not in _PROXYS_FIELDS)
#: The order of an entry's fields in a file the proxy writes (then any other, sorted).
_FIELD_ORDER = ("name", "key_sha256", "key", "created_at", "note", "disabled", "expires_at",
                "priority", "max_concurrent") + tuple(_ENTRY_FIELDS)


class KeysFile:
    """KEYS_FILE as the one place every change to the keys is written.

    change(apply) reads the file, lets `apply` change its entries (a list of dicts), checks the
    result as a reload would (key_policies), and writes it whole: a temporary file in the same
    folder, fsync, rename (mode 0600), then the folder fsynced. Changes are serialized within
    the process (a lock) and between processes (flock on the folder), and a hand edit is never
    lost: if the file changed between the read and the rename, it is read again and `apply` is
    run again on what it holds now. The file keeps only digests: a plain "key" is written as
    its key_sha256. A TOML file is not written (the standard library reads TOML only): 409.
    Methods for the caller: read(), change(). Tunable (for tests): before_rename.
    """

    _locks: dict[str, threading.Lock] = {}

    def __init__(self, path: str, config: Config) -> None:
        self.path = path
        self.config = config
        self.before_rename: Callable[[], None] = lambda: None
        self._lock = self._locks.setdefault(os.path.realpath(path), threading.Lock())
        #: the file as this object last wrote it (_file_signature, taken under the folder's
        #: lock): what the proxy loaded itself, whatever another writer does after
        self.written: tuple[int, int, int] | None = None

    def read(self) -> list[dict]:
        return [dict(entry) for entry in read_keys_file(self.path)]

    def change(self, apply: Callable[[list[dict]], object]
               ) -> tuple[object, list[dict], list[dict]]:
        """(what apply returned, the entries as read, the entries as written). ProxyError:
        409 for a TOML file, 400 for a change that would make the file invalid; whatever
        `apply` raises, with nothing written."""
        if self.path.endswith(".toml"):
            raise ProxyError(HTTPStatus.CONFLICT, f"KEYS_FILE {self.path} is TOML, which "
                             "llm_proxy can read but not write; convert it to JSON ({\"keys\": "
                             "[...]}, the same fields), point KEYS_FILE at the .json file, and "
                             "try again; or edit the TOML file by hand.",
                             type="invalid_request_error", code="keys_file_read_only")
        real = os.path.realpath(self.path)
        with self._lock, _folder_lock(os.path.dirname(real)):
            while True:
                seen = _file_signature(real)
                try:
                    before = self.read()
                except ConfigError as err:
                    raise ProxyError(HTTPStatus.CONFLICT, f"{err}; fix the file by hand "
                                     "first.", code="keys_file_invalid") from None
                after = [dict(entry) for entry in before]
                result = apply(after)
                after = [stored_entry(entry) for entry in after]
                try:
                    key_policies(after, self.config, self.path)
                except ConfigError as err:
                    raise ProxyError(HTTPStatus.BAD_REQUEST, str(err),
                                     code="invalid_key_field") from None
                if self._write(real, after, seen):
                    return result, before, after

    def _write(self, real: str, entries: list[dict], seen: object) -> bool:
        """Write `entries` over the file unless it is no longer as `seen` (False: read it
        again)."""
        folder = os.path.dirname(real)
        text = keys_file_text(entries)
        fd, temporary = tempfile.mkstemp(prefix="." + os.path.basename(real) + ".",
                                         suffix=".tmp", dir=folder)  # (mode 0600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            self.before_rename()
            if _file_signature(real) != seen:
                os.unlink(temporary)
                return False
            os.replace(temporary, real)
            self.written = _file_signature(real)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        _fsync_folder(folder)
        return True


@contextlib.contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
    """An exclusive flock on a folder: one writer of the keys file at a time, whichever
    process (the proxy, `llm_proxy.py keys`)."""
    try:
        import fcntl
    except ImportError:  # (not POSIX: one writer is the operator's care)
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fsync_folder(folder: str) -> None:
    """Make a rename in `folder` durable (where the system allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


def stored_entry(entry: Mapping[str, object]) -> dict:
    """An entry as the proxy writes it: fields in a stable order, a plain key as its digest."""
    entry = dict(entry)
    if isinstance(entry.get("key"), str):
        entry["key_sha256"] = key_digest(str(entry.pop("key")))
    order: dict[str, int] = {}
    for index, field in enumerate(_FIELD_ORDER):
        order.setdefault(field, index)
    return {f: entry[f] for f in sorted(entry, key=lambda f: (order.get(f, len(order)), f))}


def keys_file_text(entries: Sequence[Mapping[str, object]]) -> str:
    """A keys file in a stable, readable form: one field per line, two-space indent."""
    return json.dumps({"keys": list(entries)}, indent=2, ensure_ascii=False) + "\n"


def new_secret() -> tuple[str, str]:
    """A new random key and its digest (only the digest is ever stored)."""
    key = "sk-" + secrets.token_urlsafe(32)
    return key, key_digest(key)


def _bad_field(field: str, rule: str) -> ProxyError:
    return ProxyError(HTTPStatus.BAD_REQUEST, f"{field} must be {rule}.",
                      code="invalid_key_field", param=field)


def checked_fields(fields: Mapping[str, object], tz: datetime.tzinfo,
                   removable: bool) -> dict[str, object]:
    """The fields of a create or change, each checked (400 naming the first bad one); with
    `removable`, null removes a field."""
    for field, value in fields.items():
        if field not in SETTABLE_FIELDS:
            raise _bad_field(field, "one of " + ", ".join(SETTABLE_FIELDS)) \
                if field not in _PROXYS_FIELDS else ProxyError(
                HTTPStatus.BAD_REQUEST, f"{field} is not set by hand here (rotate makes a new "
                "key).", code="invalid_key_field", param=field)
        if value is None and removable:
            continue
        if not _ENTRY_FIELDS[field](value):
            raise _bad_field(field, _FIELD_RULES[field])
    return dict(fields)


def _entry_named(entries: list[dict], name: str) -> dict:
    for entry in entries:
        if entry.get("name") == name:
            return entry
    raise ProxyError(HTTPStatus.NOT_FOUND, f"No key is named {name!r}.", code="unknown_key")


def add_entry(entries: list[dict], name: str, fields: Mapping[str, object],
              now: float) -> str:
    """Add a key named `name` with `fields`: its new secret (409 if the name is taken)."""
    if not isinstance(name, str) or not name.strip():
        raise _bad_field("name", _FIELD_RULES["name"])
    if any(entry.get("name") == name for entry in entries):
        raise ProxyError(HTTPStatus.CONFLICT, f"A key named {name!r} exists already.",
                         code="key_name_taken", param="name")
    secret, digest = new_secret()
    entry: dict[str, object] = {"name": name, "key_sha256": digest, "created_at": utc_text(now)}
    entry.update({f: v for f, v in fields.items() if v is not None})
    entries.append(entry)
    return secret


def change_entry(entries: list[dict], name: str, fields: Mapping[str, object]) -> None:
    """Set the fields of key `name`; a field set to None is removed (the default applies)."""
    entry = _entry_named(entries, name)
    for field, value in fields.items():
        if value is None or (field == "disabled" and value is False):
            entry.pop(field, None)
        else:
            entry[field] = value


def rotate_entry(entries: list[dict], name: str, grace: float, now: float) -> str:
    """Give key `name` a new secret (returned); the old one works `grace` seconds more."""
    entry = _entry_named(entries, name)
    old = entry.pop("key_sha256", None) or key_digest(str(entry.pop("key")))
    entry.pop("key", None)
    entry.setdefault("bucket_sha256", old.lower())  # (its balance and quotas carry over)
    secret, entry["key_sha256"] = new_secret()
    if grace > 0:
        entry["previous_key_sha256"] = old
        entry["previous_valid_until"] = utc_text(now + grace)
    else:
        entry.pop("previous_key_sha256", None)
        entry.pop("previous_valid_until", None)
    return secret


def delete_entry(entries: list[dict], name: str) -> None:
    entries.remove(_entry_named(entries, name))


def entry_changes(before: Sequence[Mapping[str, object]],
                  after: Sequence[Mapping[str, object]]) -> list[tuple[str, str, list[str]]]:
    """What changed between two lists of entries, by name: (action, name, fields) with action
    added, removed or changed. Secrets are compared, never shown: a new digest is the field
    "key" (and the rotation's own fields are part of it)."""
    old = {str(e.get("name")): e for e in before}
    new = {str(e.get("name")): e for e in after}
    found: list[tuple[str, str, list[str]]] = []
    for name in sorted(old.keys() - new.keys()):
        found.append(("removed", name, []))
    for name in sorted(new.keys() - old.keys()):
        found.append(("added", name, sorted(_shown(new[name]))))
    for name in sorted(old.keys() & new.keys()):
        a, b = old[name], new[name]
        fields = sorted({_shown_name(f) for f in a.keys() | b.keys() if a.get(f) != b.get(f)})
        if fields:
            found.append(("changed", name, fields))
    return found


def _shown_name(field: str) -> str:
    return "key" if field in ("key", "key_sha256", "previous_key_sha256", "bucket_sha256") \
        else field


def _shown(entry: Mapping[str, object]) -> set[str]:
    return {_shown_name(f) for f in entry if f != "name"}


# ######################################################################### buckets ####

@dataclass(frozen=True)
class BucketPolicy:
    """How large a bucket is and how it refills."""
    capacity: int
    refill_tokens: int
    refill_interval: float


@dataclass(frozen=True)
class CalendarLimits:
    """A key's calendar quotas, beside its bucket (None: no such quota). Days and months turn
    over at midnight in QUOTA_TIMEZONE."""
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    requests_per_day: int | None = None
    any: bool = dataclasses.field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:  # (tested on every request: worked out once)
        object.__setattr__(self, "any", self.tokens_per_day is not None
                           or self.tokens_per_month is not None
                           or self.requests_per_day is not None)

    def __bool__(self) -> bool:
        return self.any


class Periods(typing.NamedTuple):
    """The current day and month (in QUOTA_TIMEZONE) and the seconds until each ends."""
    day: str                # "2026-12-01"
    month: str              # "2026-12"
    day_left: float
    month_left: float


class CalendarQuota(typing.NamedTuple):
    """How one calendar quota of a key stands."""
    name: str               # "tokens_per_day", "tokens_per_month" or "requests_per_day"
    limit: int
    used: int
    reset_seconds: float    # until the day or month ends

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


def calendar_quotas(limits: CalendarLimits, periods: Periods, day: Sequence[int],
                    month: Sequence[int]) -> tuple[CalendarQuota, ...]:
    """How each of a key's calendar quotas stands, from its day's and month's counters
    ([tokens, requests])."""
    found = []
    if limits.tokens_per_day is not None:
        found.append(CalendarQuota("tokens_per_day", limits.tokens_per_day, day[0],
                                   periods.day_left))
    if limits.tokens_per_month is not None:
        found.append(CalendarQuota("tokens_per_month", limits.tokens_per_month, month[0],
                                   periods.month_left))
    if limits.requests_per_day is not None:
        found.append(CalendarQuota("requests_per_day", limits.requests_per_day, day[1],
                                   periods.day_left))
    return tuple(found)


class Calendar:
    """Days and months in QUOTA_TIMEZONE, on an injected wall clock (`wall`, time.time)."""

    def __init__(self, zone: str = "UTC", wall: Callable[[], float] = time.time) -> None:
        self.wall = wall
        self.zone = zone
        self.tz: datetime.tzinfo = time_zone(zone)
        self._today = (0.0, 0.0, "", "", 0.0)  # (day start, day end, day, month, month end)

    def periods(self, now: float | None = None) -> Periods:
        now = self.wall() if now is None else now
        start, end, day, month, month_end = self._today
        if start <= now < end:  # (the same day as last time: no time zone arithmetic)
            return Periods(day, month, end - now, month_end - now)
        found = self._periods(now)
        self._today = (self.start_of(found.day), now + found.day_left, found.day, found.month,
                       now + found.month_left)
        return found

    def _periods(self, now: float) -> Periods:
        local = datetime.datetime.fromtimestamp(now, self.tz)
        tomorrow = local.date() + datetime.timedelta(days=1)
        next_month = (local.replace(day=1) + datetime.timedelta(days=32)).date().replace(day=1)
        day_end = datetime.datetime.combine(tomorrow, datetime.time(), self.tz).timestamp()
        month_end = datetime.datetime.combine(next_month, datetime.time(), self.tz).timestamp()
        return Periods(local.strftime("%Y-%m-%d"), local.strftime("%Y-%m"),
                       day_end - now, month_end - now)

    def start_of(self, period: str) -> float:
        """When a day ("2026-12-01") or a month ("2026-12") began, on the wall clock."""
        date = datetime.date.fromisoformat(period if len(period) == 10 else period + "-01")
        return datetime.datetime.combine(date, datetime.time(), self.tz).timestamp()


def time_zone(name: str) -> datetime.tzinfo:
    """The IANA time zone `name` (UTC needs no time zone database), or ConfigError."""
    if name.upper() == "UTC":
        return datetime.timezone.utc
    try:
        import zoneinfo  # only needed for a zone other than UTC
        return zoneinfo.ZoneInfo(name)
    except (ImportError, ValueError, OSError, KeyError):  # (ZoneInfoNotFoundError: a KeyError)
        raise ConfigError(f"QUOTA_TIMEZONE: unknown time zone {name!r} (an IANA name such as "
                          "Europe/Berlin is needed, and the system's time zone data)") from None


class StoreChanges(typing.NamedTuple):
    """What changed in a bucket store since a state file last took it (see changes())."""
    buckets: dict[str, tuple | None]  # (tokens, anchor, capacity, refill tokens, interval)
    counters: dict[str, list[int]]
    periods: dict[tuple[str, str], list[int] | None]


class Quota(typing.NamedTuple):
    """What a bucket (and a key's calendar quotas) said about one request: admitted or not, and
    the numbers for the headers. `limited_by` names what refused it ("bucket", or a calendar
    quota's name) and `wait_seconds` is then the real wait."""
    admitted: bool
    limit: int
    remaining: int
    reset_seconds: float   # until the next refill; 0 when the bucket is full
    wait_seconds: float    # until this cost could be admitted; 0 when admitted; inf if never
    policy: BucketPolicy
    limited_by: str = ""
    calendar: tuple[CalendarQuota, ...] = ()


class Part(typing.NamedTuple):
    """One of the buckets a request must fit (take_together): a user's or a key's."""
    key: str                        # the bucket key
    bucket: BucketPolicy
    limits: CalendarLimits | None   # its calendar quotas (None: none)
    max_users: int = 0              # a user's part: how many users its key holds at most


class _Bucket:
    __slots__ = ("tokens", "anchor", "policy")

    def __init__(self, tokens: int, anchor: float, policy: BucketPolicy) -> None:
        self.tokens = tokens
        self.anchor = anchor      # the refill grid: refills land at anchor + k * interval
        self.policy = policy

    def refill(self, now: float) -> None:
        """Add every refill due by `now`. A full bucket's grid restarts at `now`, so a full
        bucket behaves exactly like a new one (which is why full buckets can be forgotten)."""
        p = self.policy
        if self.tokens < p.capacity:
            steps = int((now - self.anchor) // p.refill_interval)
            if steps > 0:
                self.tokens = min(p.capacity, self.tokens + steps * p.refill_tokens)
                self.anchor += steps * p.refill_interval
        if self.tokens >= p.capacity:
            self.tokens = p.capacity
            self.anchor = now

    def quota(self, admitted: bool, cost: int, now: float) -> Quota:
        p = self.policy
        reset = 0.0 if self.tokens >= p.capacity else max(0.0, self.anchor + p.refill_interval - now)
        if admitted or self.tokens >= cost:
            wait = 0.0
        elif cost > p.capacity:
            wait = math.inf
        else:
            steps = math.ceil((cost - self.tokens) / p.refill_tokens)
            wait = max(0.0, self.anchor + steps * p.refill_interval - now)
        return Quota(admitted, p.capacity, self.tokens, reset, wait, p)


class MemoryBucketStore:
    """Token buckets in a dict behind one lock; every operation is atomic.

    Methods for the caller: take(), settle(), peek(), usage(), len().
    Only buckets that are not full are
    held: a bucket refilled to full is the same as a new one, so it is dropped (on access, and by
    a sweep at most once a minute). Memory is bounded by the number of keys that spent tokens
    within one full refill period, and, with `max_buckets` (open mode, where anyone can invent
    keys), by that number: the least recently used bucket is forgotten beyond it, which costs
    nothing an attacker could not get anyway by inventing a new key.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_buckets: int = 0) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.max_buckets = max_buckets
        self._buckets: dict[str, _Bucket] = {}  # least recently used first
        #: calendar quota counters: (bucket key, "d:2026-12-01" or "m:2026-12") -> [tokens, requests]
        self._periods: dict[tuple[str, str], list[int]] = {}
        #: what changed since the state file last took it (changes()); only while `persistent`
        self.persistent = False
        self._changed: tuple[set[str], set[str], set[tuple[str, str]]] = (set(), set(), set())
        self._usage: dict[str, list[int]] = {}
        #: the users of each front end's key held now: key -> {user's bucket key: None}, the
        #: least recently active first
        self._users: dict[str, dict[str, None]] = {}
        self._last_sweep = clock()

    def __len__(self) -> int:
        return len(self._buckets)

    def status(self) -> dict[str, object]:
        return {"backend": "memory"}

    def _load(self, key: str, policy: BucketPolicy, now: float) -> _Bucket:
        """The key's bucket, taken out of the dict; _store() puts it back last (the most
        recently used)."""
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            return _Bucket(policy.capacity, now, policy)
        bucket.policy = policy
        bucket.refill(now)
        return bucket

    def _store(self, key: str, bucket: _Bucket) -> None:
        if bucket.tokens < bucket.policy.capacity:  # (a full one is the same as a new one)
            self._buckets[key] = bucket
            if self.max_buckets and len(self._buckets) > self.max_buckets:
                del self._buckets[next(iter(self._buckets))]  # the least recently used
        if self.persistent:
            self._changed[0].add(key)

    def take(self, key: str, cost: int, policy: BucketPolicy,
             limits: CalendarLimits | None = None, periods: Periods | None = None) -> Quota:
        """Spend `cost` tokens if the bucket holds them and every calendar quota allows them,
        in one step (no over-admission under concurrency); say how it stands either way. A
        refused request is charged nothing anywhere. The key's counters (requests, limited
        requests, tokens charged) move with it."""
        with self._lock:
            now = self._clock()
            if now - self._last_sweep >= SWEEP_EVERY_SECONDS:
                self._sweep(now, periods)
            return self._take(key, cost, policy, limits, periods, now)

    def take_together(self, parts: Sequence["Part"], cost: int,
                      periods: Periods | None = None) -> tuple[Quota, ...]:
        """take() on several buckets as one step: `cost` is spent from every part (a user's
        bucket and quotas, and their key's) only when every part can pay it; otherwise from
        none. Each part's Quota says how it stands (the first that could not pay is the one to
        answer with). A part that names a user is counted among its key's users, the least
        recently active forgotten beyond its max_users."""
        with self._lock:
            now = self._clock()
            if now - self._last_sweep >= SWEEP_EVERY_SECONDS:
                self._sweep(now, periods)
            fits = all(self._fits(p.key, cost, p.bucket, p.limits, periods, now) for p in parts)
            quotas = tuple(self._take(p.key, cost, p.bucket, p.limits, periods, now, fits)
                           for p in parts)
            for part in parts:
                if part.max_users:
                    self._seen_user(part.key, part.max_users)
            return quotas

    def _fits(self, key: str, cost: int, policy: BucketPolicy, limits: CalendarLimits | None,
              periods: Periods | None, now: float) -> bool:
        """Whether take() would admit `cost` now (nothing moves)."""
        held = self._buckets.get(key)
        tokens = policy.capacity
        if held is not None:
            bucket = _Bucket(held.tokens, held.anchor, policy)
            bucket.refill(now)
            tokens = bucket.tokens
        if tokens < cost:
            return False
        if limits is None or not limits.any or periods is None:
            return True
        day = self._periods.get((key, "d:" + periods.day)) or [0, 0]
        month = self._periods.get((key, "m:" + periods.month)) or [0, 0]
        return not ((limits.tokens_per_day is not None and day[0] + cost > limits.tokens_per_day)
                    or (limits.tokens_per_month is not None
                        and month[0] + cost > limits.tokens_per_month)
                    or (limits.requests_per_day is not None
                        and day[1] + 1 > limits.requests_per_day))

    def _seen_user(self, key: str, max_users: int) -> None:
        """A user of a key was active: the most recently active of the key's users are held,
        at most `max_users` (the least recently active beyond are forgotten)."""
        owner, _ = split_user(key)
        users = self._users.setdefault(owner, {})
        users.pop(key, None)
        users[key] = None
        while len(users) > max_users:
            self._forget(next(iter(users)))
            del users[next(iter(users))]

    def _forget(self, key: str) -> None:
        """Everything held for one bucket key: its bucket, counters and quota counters."""
        self._buckets.pop(key, None)
        self._usage.pop(key, None)
        for entry in [e for e in self._periods if e[0] == key]:
            del self._periods[entry]
            if self.persistent:
                self._changed[2].add(entry)
        if self.persistent:
            self._changed[0].add(key)
            self._changed[1].discard(key)  # (its counters row stays in a state file)

    def users_of(self, key: str) -> list[str]:
        """The users of a key held now, the most recently active last."""
        with self._lock:
            return list(self._users.get(key, ()))

    def _take(self, key: str, cost: int, policy: BucketPolicy,
              limits: CalendarLimits | None, periods: Periods | None, now: float,
              allowed: bool = True) -> Quota:
        """take() under the lock; `allowed` false refuses it whatever the bucket holds (another
        part of the same request could not pay)."""
        bucket = self._load(key, policy, now)
        if limits is None or not limits.any or periods is None:
            admitted = allowed and bucket.tokens >= cost
            if admitted:
                bucket.tokens -= cost
                self._count(key, 1, 0, 0, 0, cost)
            else:
                self._count(key, 1, 1, 0, 0, 0)
            self._store(key, bucket)
            quota = bucket.quota(admitted, cost, now)
            return quota if admitted or bucket.tokens >= cost else quota._replace(
                limited_by="bucket")
        day = self._period(key, "d:" + periods.day)
        month = self._period(key, "m:" + periods.month)
        exhausted = []
        if limits.tokens_per_day is not None and day[0] + cost > limits.tokens_per_day:
            exhausted.append((periods.day_left, "tokens_per_day"))
        if limits.tokens_per_month is not None and month[0] + cost > limits.tokens_per_month:
            exhausted.append((periods.month_left, "tokens_per_month"))
        if limits.requests_per_day is not None and day[1] + 1 > limits.requests_per_day:
            exhausted.append((periods.day_left, "requests_per_day"))
        admitted = allowed and bucket.tokens >= cost and not exhausted
        if admitted:
            bucket.tokens -= cost
            self._count(key, 1, 0, 0, 0, cost)
            day[0], day[1], month[0], month[1] = day[0] + cost, day[1] + 1, \
                month[0] + cost, month[1] + 1
            self._mark_periods(key, periods)
        else:
            self._count(key, 1, 1, 0, 0, 0)
        self._store(key, bucket)
        calendar = calendar_quotas(limits, periods, day, month)
        quota = bucket.quota(admitted, cost, now)
        wait, limited_by = quota.wait_seconds, ""
        causes = exhausted + ([] if bucket.tokens >= cost else [(quota.wait_seconds, "bucket")])
        if not admitted and causes:
            wait, limited_by = max(causes)
        return Quota(admitted, quota.limit, quota.remaining, quota.reset_seconds, wait,
                     quota.policy, limited_by, calendar)

    def _period(self, key: str, period: str) -> list[int]:
        counts = self._periods.get((key, period))
        if counts is None:
            counts = self._periods[(key, period)] = [0, 0]
        return counts

    def _mark_periods(self, key: str, periods: Periods) -> None:
        if self.persistent:
            self._changed[2].update(((key, "d:" + periods.day), (key, "m:" + periods.month)))

    def settle(self, key: str, delta: int, policy: BucketPolicy, *, prompt: int = 0,
               completion: int = 0, periods: Periods | None = None,
               refund: bool = False) -> Quota:
        """Charge `delta` more tokens once a request's real cost is known, or give back -delta
        (and count the prompt and completion tokens it used). The calendar quotas of the day
        and month it was admitted in (`periods`) settle the same way; a refund gives its
        request back too.

        Unlike take(), this may leave the balance below zero (a debt): the request was already
        served. Later refills pay the debt first. A refund never fills a bucket beyond full.
        """
        with self._lock:
            now = self._clock()
            bucket = self._load(key, policy, now)
            bucket.tokens = min(policy.capacity, bucket.tokens - delta)
            bucket.refill(now)
            self._store(key, bucket)
            self._count(key, 0, 0, prompt, completion, delta)
            if periods is not None:
                for name in ("d:" + periods.day, "m:" + periods.month):
                    counts = self._periods.get((key, name))
                    if counts is not None:
                        counts[0] = max(0, counts[0] + delta)
                        counts[1] = max(0, counts[1] - (1 if refund else 0))
                self._mark_periods(key, periods)
            return bucket.quota(True, 0, now)

    def calendar(self, key: str, limits: CalendarLimits,
                 periods: Periods) -> tuple[CalendarQuota, ...]:
        """How the key's calendar quotas stand now."""
        with self._lock:
            day = self._periods.get((key, "d:" + periods.day)) or [0, 0]
            month = self._periods.get((key, "m:" + periods.month)) or [0, 0]
            return calendar_quotas(limits, periods, day, month)

    def _count(self, key: str, requests: int, limited: int, prompt: int, completion: int,
               charged: int) -> None:
        """Add to the key's usage counters (the most recently used MAX_TRACKED_KEYS are kept)."""
        counters = self._usage.pop(key, None)
        if counters is None:
            counters = [requests, limited, prompt, completion, charged]
        else:
            counters[0] += requests
            counters[1] += limited
            counters[2] += prompt
            counters[3] += completion
            counters[4] += charged
        self._usage[key] = counters
        if len(self._usage) > MAX_TRACKED_KEYS:
            del self._usage[next(iter(self._usage))]
        if self.persistent:
            self._changed[1].add(key)

    def usage(self, key: str) -> dict[str, int]:
        with self._lock:
            counters = self._usage.get(key) or [0, 0, 0, 0, 0]
        return dict(zip(("requests", "limited_requests", "prompt_tokens", "completion_tokens",
                         "tokens_charged"), counters))

    def peek(self, key: str, policy: BucketPolicy) -> Quota:
        """How the bucket stands now, without creating it."""
        with self._lock:
            now = self._clock()
            held = key in self._buckets
            bucket = self._load(key, policy, now)
            if held:
                self._store(key, bucket)  # drops it if it has refilled to full
            return bucket.quota(True, 0, now)

    def _sweep(self, now: float, periods: Periods | None = None) -> None:
        full = []
        for key, bucket in self._buckets.items():
            bucket.refill(now)
            if bucket.tokens >= bucket.policy.capacity:
                full.append(key)
        for key in full:
            del self._buckets[key]
            if self.persistent:
                self._changed[0].add(key)
        if periods is not None:  # counters of days and months gone by are not needed
            current = {"d:" + periods.day, "m:" + periods.month}
            for entry in [e for e in self._periods if e[1] not in current]:
                del self._periods[entry]
                if self.persistent:
                    self._changed[2].add(entry)
        self._last_sweep = now

    # -- for the state file -----------------------------------------------------------------

    def changes(self, wall: float) -> "StoreChanges":
        """What changed since the last call (then forgotten): each changed bucket as (tokens,
        the anchor of its refill grid on the wall clock `wall`, its policy's capacity, refill
        tokens and interval), or None when it is full again (no longer held); each changed
        key's counters; each changed quota counter."""
        with self._lock:
            buckets_changed, counters_changed, periods_changed = self._changed
            self._changed = (set(), set(), set())
            offset = wall - self._clock()
            buckets: dict[str, tuple | None] = {}
            for key in buckets_changed:
                bucket = self._buckets.get(key)
                buckets[key] = None if bucket is None else (
                    bucket.tokens, bucket.anchor + offset, bucket.policy.capacity,
                    bucket.policy.refill_tokens, bucket.policy.refill_interval)
            counters = {k: list(self._usage[k]) for k in counters_changed if k in self._usage}
            periods = {e: list(self._periods[e]) if e in self._periods else None
                       for e in periods_changed}
        return StoreChanges(buckets, counters, periods)

    def pending(self) -> tuple[int, int, int]:
        """How many buckets, counters and quota counters changed since changes() last took
        them."""
        with self._lock:
            buckets, counters, periods = (len(changed) for changed in self._changed)
            return buckets, counters, periods

    def mark_changed(self, changes: "StoreChanges") -> None:
        """Changes that could not be written: to be taken again by the next changes()."""
        with self._lock:
            self._changed[0].update(changes.buckets)
            self._changed[1].update(changes.counters)
            self._changed[2].update(changes.periods)

    def restore(self, buckets: dict[str, tuple[int, float, BucketPolicy]],
                counters: dict[str, list[int]], periods: dict[tuple[str, str], list[int]],
                wall: float) -> None:
        """Take back the state a state file kept: each bucket's tokens and the anchor of its
        refill grid on the wall clock `wall` (a refill due meanwhile is applied as the grid
        says when the bucket is next used)."""
        with self._lock:
            offset = self._clock() - wall
            for key, (tokens, anchor, policy) in buckets.items():
                self._buckets[key] = _Bucket(tokens, anchor + offset, policy)
            self._usage.update(counters)
            self._periods.update(periods)
            for key in [*buckets, *(e[0] for e in periods)]:
                owner, user = split_user(key)
                if user:  # (bounded again by the user's next request)
                    self._users.setdefault(owner, {})[key] = None


#: One atomic step on a bucket held in a Redis hash {t: tokens, a: anchor}, on the Redis server's
#: clock (so instances with skewed clocks agree), with the same rules as _Bucket: refill on the
#: bucket's grid, a full bucket is deleted (it is the same as a new one), and the hash expires
#: when it would have refilled to full. The key's usage counters (a second hash) move in the same
#: step, so a request costs one round trip. So do the key's calendar quota counters (hashes
#: {t: tokens, r: requests} of its day and month, KEYS[3] and KEYS[4], when ARGV[9] is "1"):
#: take admits only when the bucket and every quota (ARGV[10..12], -1 for none) allow it, and
#: then moves them all. Returns {admitted, tokens, anchor, now, day tokens, day requests,
#: month tokens} as strings.
_BUCKET_SCRIPT = """
local op, amount = ARGV[1], tonumber(ARGV[2])
local cap, refill, interval = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local prompt, completion, usage_ttl = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local calendar = ARGV[9] == '1'
local day_tokens, day_requests, month_tokens = 0, 0, 0
if calendar then
  day_tokens = tonumber(redis.call('HGET', KEYS[3], 't') or '0')
  day_requests = tonumber(redis.call('HGET', KEYS[3], 'r') or '0')
  month_tokens = tonumber(redis.call('HGET', KEYS[4], 't') or '0')
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local tokens = tonumber(redis.call('HGET', KEYS[1], 't'))
local anchor = tonumber(redis.call('HGET', KEYS[1], 'a'))
local existed = tokens ~= nil
if not existed then tokens, anchor = cap, now end
if tokens < cap then
  local steps = math.floor((now - anchor) / interval)
  if steps > 0 then
    tokens = math.min(cap, tokens + steps * refill)
    anchor = anchor + steps * interval
  end
end
if tokens >= cap then tokens, anchor = cap, now end
local admitted = 1
if op == 'take' then
  local per_day, per_month, requests = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
  if tokens < amount or (calendar and ((per_day >= 0 and day_tokens + amount > per_day)
      or (per_month >= 0 and month_tokens + amount > per_month)
      or (requests >= 0 and day_requests + 1 > requests))) then
    admitted = 0
  else
    tokens = tokens - amount
    if calendar then
      day_tokens, day_requests = day_tokens + amount, day_requests + 1
      month_tokens = month_tokens + amount
      redis.call('HSET', KEYS[3], 't', day_tokens, 'r', day_requests)
      redis.call('HINCRBY', KEYS[4], 't', amount)
      redis.call('HINCRBY', KEYS[4], 'r', 1)
      redis.call('EXPIRE', KEYS[3], 172800)
      redis.call('EXPIRE', KEYS[4], 2764800)
    end
  end
elseif op == 'settle' then
  tokens = math.min(cap, tokens - amount)
  if tokens >= cap then tokens, anchor = cap, now end
  if calendar then  -- the day and month the request was admitted in
    local refunded = ARGV[13] == '1' and 1 or 0
    day_tokens = math.max(0, day_tokens + amount)
    day_requests = math.max(0, day_requests - refunded)
    month_tokens = math.max(0, month_tokens + amount)
    redis.call('HSET', KEYS[3], 't', day_tokens, 'r', day_requests)
    redis.call('HSET', KEYS[4], 't', month_tokens)
    if refunded == 1 then redis.call('HINCRBY', KEYS[4], 'r', -1) end
    redis.call('EXPIRE', KEYS[3], 172800)
    redis.call('EXPIRE', KEYS[4], 2764800)
  end
end
if tokens >= cap then
  redis.call('DEL', KEYS[1])
elseif op ~= 'peek' or existed then
  redis.call('HSET', KEYS[1], 't', tokens, 'a', string.format('%.6f', anchor))
  local full_at = anchor + math.ceil((cap - tokens) / refill) * interval
  redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil((full_at - now) * 1000)))
end
if op == 'take' then
  redis.call('HINCRBY', KEYS[2], 'requests', 1)
  if admitted == 1 then
    redis.call('HINCRBY', KEYS[2], 'tokens_charged', amount)
  else
    redis.call('HINCRBY', KEYS[2], 'limited_requests', 1)
  end
  redis.call('EXPIRE', KEYS[2], usage_ttl)
elseif op == 'settle' then
  redis.call('HINCRBY', KEYS[2], 'tokens_charged', amount)
  if prompt > 0 then redis.call('HINCRBY', KEYS[2], 'prompt_tokens', prompt) end
  if completion > 0 then redis.call('HINCRBY', KEYS[2], 'completion_tokens', completion) end
  redis.call('EXPIRE', KEYS[2], usage_ttl)
end
return {admitted, tostring(tokens), string.format('%.6f', anchor), string.format('%.6f', now),
        tostring(day_tokens), tostring(day_requests), tostring(month_tokens)}
"""
#: take() on several buckets in one atomic step (RedisBucketStore.take_together): KEYS are
#: four per part (bucket, usage counters, day, month), ARGV[1..3] the cost, the counters' TTL
#: and the number of parts, then seven per part (capacity, refill tokens, interval, "1" when
#: its calendar quotas count, tokens per day, tokens per month, requests per day; -1 for none).
#: Every part refills as in _BUCKET_SCRIPT; the cost is spent from all only when all can pay.
#: Returns {admitted, now, then per part: fits, tokens, anchor, day tokens, day requests,
#: month tokens} as strings.
_TOGETHER_SCRIPT = """
local amount, usage_ttl, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local parts, all = {}, 1
for i = 0, n - 1 do
  local k, a = i * 4, 3 + i * 7
  local p = {cap = tonumber(ARGV[a + 1]), refill = tonumber(ARGV[a + 2]),
             interval = tonumber(ARGV[a + 3]), calendar = ARGV[a + 4] == '1',
             per_day = tonumber(ARGV[a + 5]), per_month = tonumber(ARGV[a + 6]),
             requests = tonumber(ARGV[a + 7]), dt = 0, dr = 0, mt = 0, k = k}
  if p.calendar then
    p.dt = tonumber(redis.call('HGET', KEYS[k + 3], 't') or '0')
    p.dr = tonumber(redis.call('HGET', KEYS[k + 3], 'r') or '0')
    p.mt = tonumber(redis.call('HGET', KEYS[k + 4], 't') or '0')
  end
  p.tokens = tonumber(redis.call('HGET', KEYS[k + 1], 't'))
  p.anchor = tonumber(redis.call('HGET', KEYS[k + 1], 'a'))
  if p.tokens == nil then p.tokens, p.anchor = p.cap, now end
  if p.tokens < p.cap then
    local steps = math.floor((now - p.anchor) / p.interval)
    if steps > 0 then
      p.tokens = math.min(p.cap, p.tokens + steps * p.refill)
      p.anchor = p.anchor + steps * p.interval
    end
  end
  if p.tokens >= p.cap then p.tokens, p.anchor = p.cap, now end
  p.fits = 1
  if p.tokens < amount or (p.calendar and ((p.per_day >= 0 and p.dt + amount > p.per_day)
      or (p.per_month >= 0 and p.mt + amount > p.per_month)
      or (p.requests >= 0 and p.dr + 1 > p.requests))) then
    p.fits, all = 0, 0
  end
  parts[i + 1] = p
end
local result = {all, string.format('%.6f', now)}
for i = 1, n do
  local p = parts[i]
  local k = p.k
  if all == 1 then
    p.tokens = p.tokens - amount
    if p.calendar then
      p.dt, p.dr, p.mt = p.dt + amount, p.dr + 1, p.mt + amount
      redis.call('HSET', KEYS[k + 3], 't', p.dt, 'r', p.dr)
      redis.call('HINCRBY', KEYS[k + 4], 't', amount)
      redis.call('HINCRBY', KEYS[k + 4], 'r', 1)
      redis.call('EXPIRE', KEYS[k + 3], 172800)
      redis.call('EXPIRE', KEYS[k + 4], 2764800)
    end
  end
  if p.tokens >= p.cap then
    redis.call('DEL', KEYS[k + 1])
  else
    redis.call('HSET', KEYS[k + 1], 't', p.tokens, 'a', string.format('%.6f', p.anchor))
    local full_at = p.anchor + math.ceil((p.cap - p.tokens) / p.refill) * p.interval
    redis.call('PEXPIRE', KEYS[k + 1], math.max(1, math.ceil((full_at - now) * 1000)))
  end
  redis.call('HINCRBY', KEYS[k + 2], 'requests', 1)
  if all == 1 then
    redis.call('HINCRBY', KEYS[k + 2], 'tokens_charged', amount)
  else
    redis.call('HINCRBY', KEYS[k + 2], 'limited_requests', 1)
  end
  redis.call('EXPIRE', KEYS[k + 2], usage_ttl)
  for _, v in ipairs({p.fits, tostring(p.tokens), string.format('%.6f', p.anchor),
                      tostring(p.dt), tostring(p.dr), tostring(p.mt)}) do
    table.insert(result, v)
  end
end
return result
"""
USAGE_FIELDS = ("requests", "limited_requests", "prompt_tokens", "completion_tokens",
                "tokens_charged")
USAGE_TTL_SECONDS = 30 * 24 * 3600


class RedisBucketStore:
    """The buckets in Redis or Valkey, shared by every proxy instance that points at it.

    The same interface and semantics as MemoryBucketStore: take(), settle() and
    peek() are each one atomic Lua script (loaded once, run by its digest, reloaded by redis-py
    on NOSCRIPT) on the server's clock. Redis keys are REDIS_PREFIX plus a SHA-256 digest of
    the bucket key, never a client key. No request waits longer than REDIS_TIMEOUT: a failure
    marks Redis down and, with REDIS_FAILURE_MODE=local, this instance serves from its own
    in-memory buckets (`local`) until a probe after a growing pause (0.5 s doubling to 30 s)
    finds Redis again; with `closed`, requests get StoreUnavailable (503) meanwhile.
    """

    def __init__(self, config: Config, log: Callable[[str], None], metrics: "Metrics",
                 clock: Callable[[], float] = time.monotonic) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise ConfigError("REDIS_URL needs the redis package: "
                              "pip install 'llm-proxy[redis]'") from None
        timeout = config.redis_timeout
        try:
            self._redis = redis.Redis.from_url(
                config.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0)
        except ValueError:
            raise ConfigError("REDIS_URL is not a valid Redis URL") from None
        self._script = self._redis.register_script(_BUCKET_SCRIPT)
        self._together = self._redis.register_script(_TOGETHER_SCRIPT)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.local = MemoryBucketStore(clock, max_buckets_of(config))
        self.prefix = config.redis_prefix
        self.closed_mode = config.redis_failure_mode == "closed"
        self._log = log
        self._metrics = metrics
        self._lock = threading.Lock()
        self._down = False
        self._retry_at = 0.0
        self._pause = 0.0
        try:
            self._redis.ping()
        except self._errors:
            self._went_down("at start-up")

    # -- the store interface ----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.local)  # buckets in Redis are counted by Redis, not here

    def status(self) -> dict[str, object]:
        return {"backend": "redis", "reachable": not self._down,
                "failure_mode": "closed" if self.closed_mode else "local"}

    def take(self, key: str, cost: int, policy: BucketPolicy,
             limits: CalendarLimits | None = None, periods: Periods | None = None) -> Quota:
        return self._either(lambda: self._bucket("take", key, cost, policy, limits=limits,
                                                 periods=periods),
                            lambda: self.local.take(key, cost, policy, limits, periods))

    def take_together(self, parts: Sequence[Part], cost: int,
                      periods: Periods | None = None) -> tuple[Quota, ...]:
        """MemoryBucketStore.take_together, as one Lua script (every part's Redis keys share
        the hash tag of the key's digest, so they are on one Cluster slot); the users of a key
        are a sorted set by last activity, trimmed to max_users."""
        def remote() -> tuple[Quota, ...]:
            quotas = self._take_together(parts, cost, periods)
            try:
                for part in parts:
                    if part.max_users:
                        self._seen_user(part.key, part.max_users, periods)
            except self._errors:
                # The take stands in Redis (and is settled there): falling back to the local
                # store now would take the request twice. Only the users' activity order
                # missed this request; the next request that reaches Redis says if it is down.
                pass
            return quotas
        return self._either(remote, lambda: self.local.take_together(  # type: ignore[return-value]
            parts, cost, periods))

    def _take_together(self, parts: Sequence[Part], cost: int,
                       periods: Periods | None) -> tuple[Quota, ...]:
        keys: list[str] = []
        args: list[str | int | float] = [cost, USAGE_TTL_SECONDS, len(parts)]
        for part in parts:
            limits = part.limits if periods is not None else None
            name = self._name("b:", part.key)
            keys += [name, self._name("u:", part.key),
                     self._period_name(part.key, "d:" + periods.day) if periods and limits
                     else name,
                     self._period_name(part.key, "m:" + periods.month) if periods and limits
                     else name]
            args += [part.bucket.capacity, part.bucket.refill_tokens, part.bucket.refill_interval,
                     "1" if limits else "0", *([-1 if v is None else v for v in (
                         limits.tokens_per_day, limits.tokens_per_month,
                         limits.requests_per_day)] if limits else [-1, -1, -1])]
        found: list = self._together(keys=keys, args=args)  # type: ignore[arg-type]
        admitted, now = bool(int(found[0])), float(found[1])
        quotas = []
        for index, part in enumerate(parts):
            fits, tokens, anchor, day_t, day_r, month_t = found[2 + 6 * index:8 + 6 * index]
            bucket = _Bucket(int(float(tokens)), float(anchor), part.bucket)
            quota = bucket.quota(admitted, cost, now)
            counts: tuple[CalendarQuota, ...] = ()
            if periods is not None and part.limits:
                counts = calendar_quotas(part.limits, periods, [int(day_t), int(day_r)],
                                         [int(month_t), 0])
            if not admitted and not int(fits):
                waits = [(q.reset_seconds, q.name) for q in counts
                         if q.used + (1 if q.name == "requests_per_day" else cost) > q.limit]
                if bucket.tokens < cost:
                    waits.append((quota.wait_seconds, "bucket"))
                wait, limited_by = max(waits)
                quota = quota._replace(wait_seconds=wait, limited_by=limited_by)
            quotas.append(quota._replace(calendar=counts))
        return tuple(quotas)

    def _seen_user(self, key: str, max_users: int, periods: Periods | None) -> None:
        """The key's users by last activity (on this instance's clock); the least recently
        active beyond max_users are forgotten: their bucket, counters and quota counters."""
        owner, _ = split_user(key)
        users = self._name("users:", owner)
        pipe = self._redis.pipeline(transaction=False)
        pipe.zadd(users, {key: time.time()})
        pipe.zcard(users)
        pipe.expire(users, USAGE_TTL_SECONDS)
        held = int(pipe.execute()[1])
        if held <= max_users:
            return
        popped: list = self._redis.zpopmin(users, held - max_users)  # type: ignore[assignment]
        gone = [m.decode("utf-8", "surrogateescape") if isinstance(m, bytes) else str(m)
                for m, _ in popped]
        names = [self._name(kind, user) for user in gone for kind in ("b:", "u:")]
        if periods is not None:
            names += [self._period_name(user, period) for user in gone
                      for period in ("d:" + periods.day, "m:" + periods.month)]
        if names:
            self._redis.delete(*names)

    def users_of(self, key: str) -> list[str]:
        def remote() -> list[str]:
            found: list = self._redis.zrange(self._name("users:", key), 0, -1)  # type: ignore[assignment]
            return [m.decode("utf-8", "surrogateescape") if isinstance(m, bytes) else str(m)
                    for m in found]
        return self._either(remote, lambda: self.local.users_of(key))  # type: ignore[return-value]

    def settle(self, key: str, delta: int, policy: BucketPolicy, *, prompt: int = 0,
               completion: int = 0, periods: Periods | None = None,
               refund: bool = False) -> Quota:
        return self._either(lambda: self._bucket("settle", key, delta, policy, prompt,
                                                 completion, periods=periods, refund=refund),
                            lambda: self.local.settle(key, delta, policy, prompt=prompt,
                                                      completion=completion, periods=periods,
                                                      refund=refund))

    def calendar(self, key: str, limits: CalendarLimits,
                 periods: Periods) -> tuple[CalendarQuota, ...]:
        def remote() -> tuple[CalendarQuota, ...]:
            day = self._redis.hmget(self._period_name(key, "d:" + periods.day), "t", "r")
            month = self._redis.hmget(self._period_name(key, "m:" + periods.month), "t", "r")
            return calendar_quotas(limits, periods, [int(v or 0) for v in day],
                                   [int(v or 0) for v in month])
        return self._either(remote, lambda: self.local.calendar(key, limits, periods))

    def peek(self, key: str, policy: BucketPolicy) -> Quota:
        return self._either(lambda: self._bucket("peek", key, 0, policy),
                            lambda: self.local.peek(key, policy))

    def usage(self, key: str) -> dict[str, int]:
        def remote() -> dict[str, int]:
            found = self._redis.hgetall(self._name("u:", key))
            return {f: int(found.get(f.encode(), 0)) for f in USAGE_FIELDS}
        return self._either(remote, lambda: self.local.usage(key))

    # -- Redis, and what to do without it ---------------------------------------------------

    def _name(self, kind: str, key: str) -> str:
        # the digest in braces is a hash tag: both of a key's hashes land on one Cluster slot,
        # and so do its users' (tagged with their key's digest, named by their own)
        owner, user = split_user(key)
        return f"{self.prefix}{kind}{{{key_digest(owner)}}}" + (
            f":{key_digest(key)}" if user else "")

    def ledger(self, retention_days: int) -> "RedisLedger":
        """The usage ledger beside these buckets."""
        return RedisLedger(self._redis, self.prefix, retention_days, self._errors)

    def _period_name(self, key: str, period: str) -> str:
        owner, user = split_user(key)
        return f"{self.prefix}q:{{{key_digest(owner)}}}:" + (
            f"{key_digest(key)}:" if user else "") + period

    def _bucket(self, op: str, key: str, amount: int, policy: BucketPolicy, prompt: int = 0,
                completion: int = 0, *, limits: CalendarLimits | None = None,
                periods: Periods | None = None, refund: bool = False) -> Quota:
        calendar = periods is not None and (op == "settle" or bool(limits))
        day = self._period_name(key, "d:" + periods.day) if periods else self._name("b:", key)
        month = self._period_name(key, "m:" + periods.month) if periods else day
        limit = [-1 if v is None else v for v in (
            limits.tokens_per_day, limits.tokens_per_month, limits.requests_per_day)] \
            if limits else [-1, -1, -1]
        admitted, tokens, anchor, now, day_t, day_r, month_t = self._script(
            keys=[self._name("b:", key), self._name("u:", key), day, month],
            args=[op, amount, policy.capacity, policy.refill_tokens, policy.refill_interval,
                  prompt, completion, USAGE_TTL_SECONDS, "1" if calendar else "0", *limit,
                  "1" if refund else "0"])
        bucket = _Bucket(int(float(tokens)), float(anchor), policy)
        quota = bucket.quota(bool(int(admitted)), amount if op == "take" else 0, float(now))
        if op != "take" or not calendar or not limits or periods is None:
            return quota if quota.admitted or bucket.tokens >= amount else quota._replace(
                limited_by="bucket")
        counts = calendar_quotas(limits, periods, [int(day_t), int(day_r)], [int(month_t), 0])
        if quota.admitted:
            return quota._replace(calendar=counts)
        waits = [(q.reset_seconds, q.name) for q in counts
                 if q.used + (1 if q.name == "requests_per_day" else amount) > q.limit]
        if bucket.tokens < amount:
            waits.append((quota.wait_seconds, "bucket"))
        wait, limited_by = max(waits)
        return quota._replace(wait_seconds=wait, limited_by=limited_by, calendar=counts)

    def _either(self, remote: Callable[[], _T], local: Callable[[], _T]) -> _T:
        """Redis when it is up (or due for a probe by this request), else the failure mode."""
        probing = False
        if self._down:
            with self._lock:
                probing = time.monotonic() >= self._retry_at
                if probing:  # one request probes; the others carry on without waiting
                    self._retry_at = time.monotonic() + max(self._pause, 0.5)
            if not probing:
                return self._without_redis(local)
        try:
            result = remote()
        except self._errors:
            self._went_down("")
            return self._without_redis(local)
        if probing:
            with self._lock:
                self._down, self._pause = False, 0.0
            self._log("Redis is reachable again: buckets are shared again")
        return result

    def _without_redis(self, local: Callable[[], _T]) -> _T:
        if self.closed_mode:
            raise StoreUnavailable(self._retry_at - time.monotonic())
        return local()

    def _went_down(self, when: str) -> None:
        with self._lock:
            first = not self._down
            self._down = True
            self._pause = min(30.0, max(0.5, self._pause * 2))
            self._retry_at = time.monotonic() + self._pause
        if first:  # one warning per outage
            self._metrics.inc("llm_proxy_store_outages_total")
            mode = ("requests get 503 until it is back" if self.closed_mode else
                    "serving from this instance's own buckets until it is back")
            self._log(f"warning: Redis is unreachable{' ' + when if when else ''}: {mode}")


def make_store(config: Config, log: Callable[[str], None], metrics: "Metrics",
               clock: Callable[[], float] = time.monotonic
               ) -> "MemoryBucketStore | RedisBucketStore":
    """The in-memory store, or the Redis one when REDIS_URL is set."""
    if config.redis_url:
        return RedisBucketStore(config, log, metrics, clock)
    return MemoryBucketStore(clock, max_buckets_of(config))


def max_buckets_of(config: Config) -> int:
    """How many buckets a process may hold: bounded by the keys when keys are required, by
    MAX_BUCKETS in open mode (where anyone can invent keys)."""
    return 0 if config.keys_file or config.proxy_api_keys else config.max_buckets


#: Either bucket store: the same interface and the same semantics.
BucketStore = typing.Union[MemoryBucketStore, RedisBucketStore]


# ########################################################################### state ####

# What the operator relies on outlives the process. Requests change balances, counters,
# calendar quota counters and the usage ledger in memory, as before; a writer thread copies
# what changed into an SQLite file (WAL) every STATE_FLUSH_SECONDS and at shutdown, in one
# transaction. Requests never wait for the disk; a crash loses at most one flush interval.

LEDGER_FIELDS = ("requests", "limited_requests", "prompt_tokens", "completion_tokens",
                 "tokens_charged")


class LedgerKey(typing.NamedTuple):
    """One row of the usage ledger: a key's use of a model on a kind of route in an hour."""
    hour: int               # the hour's start, UTC epoch seconds
    key: str                # the bucket key ("key:" + digest, or "ip:" + address)
    name: str               # the key's name (or short hash) in reports
    model: str
    kind: str               # the route's kind: generate or embed


#: The model every refused (limited) request of a key and hour counts under: refusals add one
#: row per key and hour, whatever model names the client sends.
LIMITED_MODELS = "(limited)"
#: Distinct models a key's rows may name in one hour; its requests for more count under
#: OTHER_MODELS. A client inventing names cannot grow the state by more than this.
MAX_MODELS_PER_KEY_HOUR = 20
OTHER_MODELS = "(other models)"
MAX_MODEL_NAME = 200  # characters of a model name the ledger keeps
#: What no stored text holds: lone surrogates (JSON allows them, UTF-8 cannot encode them),
#: NUL (SQLite's text functions stop at it) and the Redis ledger's field separator.
_UNSTORABLE = re.compile("[\x00\x1f\ud800-\udfff]")
#: SQLite's integers are 64-bit; a count beyond (an upstream reporting absurd usage) is kept at
#: the bound rather than making every write fail.
SQLITE_MAX_INTEGER = 2 ** 63 - 1


def stored_text(text: str) -> str:
    """A client's string as the state stores and every report shows it, whatever it holds:
    each unstorable character replaced with U+FFFD."""
    if text.isascii() and text.isprintable():  # (the usual text: none of them, found at once)
        return text
    return _UNSTORABLE.sub("\ufffd", text)


def storable(values: Iterable[object]) -> tuple[object, ...]:
    """A row's numbers within SQLite's (and Redis's) 64-bit integers."""
    return tuple(max(-SQLITE_MAX_INTEGER - 1, min(SQLITE_MAX_INTEGER, v))
                 if isinstance(v, int) else v for v in values)


class Ledger:
    """Usage per key x model x route kind x hour, added as requests end. Without a state file
    it is all here (the last LEDGER_RETENTION_DAYS); with one, here is what the file has not
    taken yet (take(), put_back() when the write failed). At most MAX_LEDGER_ROWS rows are held
    (an open proxy flooded with invented keys adds one a key): beyond, the oldest hour goes.

    Everything that decides what a request's row is lives in record(): the client's strings
    made storable, refusals under LIMITED_MODELS, and at most MAX_MODELS_PER_KEY_HOUR models
    a key and hour (the rest under OTHER_MODELS): what a client chooses cannot grow the state
    faster than the keys it holds."""

    def __init__(self, retention_days: int) -> None:
        self._lock = threading.Lock()
        self._rows: dict[LedgerKey, list[int]] = {}
        self.retention = retention_days * 86400
        #: the models each key's rows named in the hour `_models_hour` (this process's count)
        self._models_hour = 0
        self._models: dict[str, set[str]] = {}
        #: this hour's rows by what record() was given: what it decided once, found again
        self._entries: dict[tuple[str, str, str, str, int], LedgerKey] = {}

    def record(self, hour: int, key: str, name: str, model: str, kind: str,
               counts: Sequence[int]) -> None:
        """A request's row, as it ended (`counts` in LEDGER_FIELDS order)."""
        limited = counts[1]
        given = (key, name, model, kind, limited)
        with self._lock:  # (one acquisition a request: the model's count and the row)
            if hour != self._models_hour or len(self._entries) > MAX_TRACKED_KEYS:
                self._models_hour, self._models, self._entries = hour, {}, {}  # (counted anew)
            entry = self._entries.get(given)
            if entry is None:
                entry = self._entries[given] = self._entry(hour, key, name, model, kind,
                                                           limited)
            self._add(entry, counts)

    def _entry(self, hour: int, key: str, name: str, model: str, kind: str,
               limited: int) -> LedgerKey:
        """The row a request goes to: the client's strings made storable, the model counted
        (or LIMITED_MODELS, OTHER_MODELS). Under the lock, once an hour for each `given`."""
        model = LIMITED_MODELS if limited else self._model_of(
            key, stored_text(model[:MAX_MODEL_NAME]))
        return LedgerKey(hour, stored_text(key), stored_text(name), model, kind)

    def _model_of(self, key: str, model: str) -> str:
        """`model`, or OTHER_MODELS once the key has named MAX_MODELS_PER_KEY_HOUR others this
        hour. Under the lock."""
        seen = self._models.setdefault(key, set())
        if model not in seen:
            if len(seen) >= MAX_MODELS_PER_KEY_HOUR:
                return OTHER_MODELS
            seen.add(model)
        return model

    def add(self, entry: LedgerKey, counts: Sequence[int]) -> None:
        with self._lock:
            self._add(entry, counts)

    def _add(self, entry: LedgerKey, counts: Sequence[int]) -> None:
        """add(), under the lock."""
        row = self._rows.get(entry)
        if row is None:
            self._rows[entry] = list(counts)
            if len(self._rows) % 4096 == 0:  # (only a ledger no file takes grows)
                cutoff = entry.hour - self.retention
                if len(self._rows) >= MAX_LEDGER_ROWS:
                    cutoff = max(cutoff, min(e.hour for e in self._rows) + 1)
                for old in [e for e in self._rows if e.hour < cutoff]:
                    del self._rows[old]
        else:
            row[:] = map(operator.add, row, counts)

    def __len__(self) -> int:
        return len(self._rows)

    def take(self) -> dict[LedgerKey, list[int]]:
        with self._lock:
            rows, self._rows = self._rows, {}
        return rows

    def put_back(self, rows: Mapping[LedgerKey, Sequence[int]]) -> None:
        for entry, counts in rows.items():
            self.add(entry, counts)

    def rows(self, since: float, until: float,
             key: str | None = None) -> list[tuple[LedgerKey, list[int]]]:
        """The rows of hours from `since` to before `until` (of one bucket key)."""
        with self._lock:
            return [(e, list(c)) for e, c in self._rows.items()
                    if since <= e.hour < until and (key is None or e.key == key)]



def state_path(config: Config) -> str:
    """Where the state lives: STATE_DB, its default file, or "" (off, or kept in Redis)."""
    if config.state_db.lower() == "off" or config.redis_url:
        return ""
    return config.state_db or default_state_path(config.port)


def default_state_path(port: int, environ: Mapping[str, str] | None = None) -> str:
    """$XDG_STATE_HOME/llm_proxy/state-PORT.db, else ~/.local/state/llm_proxy/state-PORT.db:
    two proxies on one machine do not share a file by accident."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                         "state")
    return os.path.join(base, "llm_proxy", f"state-{port}.db")


_SCHEMA_V1 = """
CREATE TABLE buckets (key TEXT PRIMARY KEY, tokens INTEGER NOT NULL, anchor REAL NOT NULL,
                      capacity INTEGER NOT NULL, refill_tokens INTEGER NOT NULL,
                      refill_interval REAL NOT NULL);
CREATE TABLE counters (key TEXT PRIMARY KEY, requests INTEGER NOT NULL,
                       limited_requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
                       completion_tokens INTEGER NOT NULL, tokens_charged INTEGER NOT NULL);
CREATE TABLE periods (key TEXT NOT NULL, period TEXT NOT NULL, tokens INTEGER NOT NULL,
                      requests INTEGER NOT NULL, PRIMARY KEY (key, period));
CREATE TABLE ledger (hour INTEGER NOT NULL, key TEXT NOT NULL, name TEXT NOT NULL,
                     model TEXT NOT NULL, kind TEXT NOT NULL, requests INTEGER NOT NULL,
                     limited_requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
                     completion_tokens INTEGER NOT NULL, tokens_charged INTEGER NOT NULL,
                     PRIMARY KEY (hour, key, name, model, kind)) WITHOUT ROWID;
CREATE INDEX ledger_by_key ON ledger (key, hour);
"""
_SCHEMA_V2 = """
CREATE TABLE audit (at REAL NOT NULL, who TEXT NOT NULL, origin TEXT NOT NULL,
                    action TEXT NOT NULL, key TEXT NOT NULL, fields TEXT NOT NULL);
CREATE INDEX audit_by_time ON audit (at);
"""
#: schema version -> the step that brings a file from it to the next (PRAGMA user_version)
MIGRATIONS: dict[int, str] = {0: _SCHEMA_V1, 1: _SCHEMA_V2}
SCHEMA_VERSION = len(MIGRATIONS)


class StateFileGone(OSError):
    """The state file's path no longer names the file the proxy holds open."""


class StateFile:
    """The proxy's state in one SQLite file, held by one process at a time.

    Opening it (start-up) creates it and its folder when needed, takes its lock (a proxy that
    finds the file held by another live proxy refuses to start), brings the schema up to date
    (PRAGMA user_version, one migration step per version) and checks it can be read and
    written: anything wrong is a ConfigError naming the path. load() hands the buckets (their
    balances, debts and refill grids), counters and calendar counters back to a store; write()
    takes what changed, in one transaction. read_ledger() is for reports, which may run while
    the proxy does (another process reading the same file: WAL allows it). The lock is on the
    file itself (any name for it, link or not, is the same file), and each write first checks
    that the path still names that file (check_named): a file deleted or replaced while the
    proxy runs is said, not written into unseen.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._held: int | None = None  # the file's descriptor that holds its lock
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"STATE_DB {path}: its folder cannot be created "
                              f"({err.strerror or err})") from None
        self._take_lock()
        try:
            self.db = sqlite3.connect(path, timeout=5, isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # (WAL: a crash loses no commit)
            self._migrate()
            self.db.execute("BEGIN IMMEDIATE")  # can it be written?
            self.db.execute("COMMIT")
            opened = os.fstat(self._held) if self._held is not None else os.stat(path)
            self._identity = (opened.st_dev, opened.st_ino)
        except sqlite3.Error as err:
            self.close()
            raise ConfigError(f"STATE_DB {path}: {_state_problem(err)}") from None
        except OSError as err:
            self.close()
            raise ConfigError(f"STATE_DB {path}: cannot be used ({err.strerror or err})"
                              ) from None

    def _named(self) -> tuple[int, int]:
        """(device, inode) of the file the path names now (OSError when none)."""
        st = os.stat(self.path)
        return st.st_dev, st.st_ino

    def check_named(self) -> None:
        """StateFileGone when the path no longer names the file this process writes (deleted,
        or replaced by another): what is written would not be seen at the next start."""
        try:
            named = self._named()
        except FileNotFoundError:
            named = None
        if named != self._identity:
            raise StateFileGone("the path no longer names the file this proxy writes (deleted "
                                "or replaced): a restart would not see what it holds")

    def _take_lock(self) -> None:
        """Hold the file itself, not its name: an exclusive flock on the database file (made
        here when new), so that a symlink or a hard link to a file another proxy holds is
        refused as the same file. The holder's pid is written beside the real file
        (PATH.lock), opened without following a link: a link planted there cannot make the
        proxy overwrite another file."""
        try:
            import fcntl  # POSIX; elsewhere one process per file is the operator's care
        except ImportError:
            return
        real = os.path.realpath(self.path)
        flags = (os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0))
        try:
            self._held = os.open(real, flags, 0o644)
        except OSError as err:
            raise ConfigError(f"STATE_DB {self.path}: cannot be used ({err.strerror or err})"
                              ) from None
        try:
            fcntl.flock(self._held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.close()
            raise ConfigError(f"STATE_DB {self.path} is in use by another llm_proxy (pid "
                              f"{self._holder(real)}); give each proxy its own STATE_DB or PORT"
                              ) from None
        try:
            pid_file = os.open(real + ".lock", flags | os.O_TRUNC, 0o644)
            with os.fdopen(pid_file, "w") as f:
                f.write(str(os.getpid()))
        except OSError as err:
            self.close()
            raise ConfigError(f"STATE_DB {self.path}: {real}.lock cannot be written "
                              f"({err.strerror or err})") from None

    @staticmethod
    def _holder(real: str) -> str:
        """The pid written by the proxy that holds the file, or "?"."""
        try:
            pid_file = os.open(real + ".lock", os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(pid_file) as f:
                return f.read(32).strip() or "?"
        except (OSError, ValueError):
            return "?"

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(f"STATE_DB {self.path}: written by a newer llm_proxy (schema "
                              f"{version}, this one knows {SCHEMA_VERSION})")
        while version < SCHEMA_VERSION:  # each step whole or not at all
            try:
                self.db.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[version]} "
                                      f"PRAGMA user_version = {version + 1}; COMMIT;")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
            version += 1

    def load(self, store: "MemoryBucketStore", wall: float) -> None:
        try:
            buckets = {key: (tokens, anchor, BucketPolicy(capacity, refill, interval))
                       for key, tokens, anchor, capacity, refill, interval in self.db.execute(
                           "SELECT key, tokens, anchor, capacity, refill_tokens, refill_interval "
                           "FROM buckets")}
            counters = {row[0]: list(row[1:]) for row in self.db.execute(
                "SELECT key, " + ", ".join(LEDGER_FIELDS) + " FROM counters")}
            periods = {(key, period): [tokens, requests] for key, period, tokens, requests in
                       self.db.execute("SELECT key, period, tokens, requests FROM periods")}
        except sqlite3.Error as err:
            raise ConfigError(f"STATE_DB {self.path}: {_state_problem(err)}") from None
        store.restore(buckets, counters, periods, wall)

    def write(self, changes: StoreChanges, ledger: Mapping[LedgerKey, Sequence[int]],
              prune_before: float) -> None:
        """Write what changed in one transaction (sqlite3.Error if it cannot be written,
        StateFileGone if it would be written to a file the path no longer names)."""
        self.check_named()
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            for key, bucket in changes.buckets.items():
                if bucket is None:
                    db.execute("DELETE FROM buckets WHERE key = ?", (key,))
                else:
                    db.execute("INSERT OR REPLACE INTO buckets VALUES (?, ?, ?, ?, ?, ?)",
                               (key, *storable(bucket)))
            db.executemany("INSERT OR REPLACE INTO counters VALUES (?, ?, ?, ?, ?, ?)",
                           [(key, *storable(values)) for key, values in changes.counters.items()])
            for (key, period), counts in changes.periods.items():
                if counts is None:
                    db.execute("DELETE FROM periods WHERE key = ? AND period = ?", (key, period))
                else:
                    db.execute("INSERT OR REPLACE INTO periods VALUES (?, ?, ?, ?)",
                               (key, period, *storable(counts)))
            db.executemany(
                "INSERT INTO ledger VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE "
                "SET " + ", ".join(f"{f} = {f} + excluded.{f}" for f in LEDGER_FIELDS),
                [(*entry, *storable(counts)) for entry, counts in ledger.items()])
            db.execute("DELETE FROM ledger WHERE hour < ?", (int(prune_before),))
            db.execute("DELETE FROM audit WHERE at < ?", (prune_before,))
            db.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (SQLITE_FULL, SQLITE_IOERR): the error to
            # report is the first one, not "cannot rollback - no transaction is active"
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        db = getattr(self, "db", None)
        if db is not None:
            db.close()
        if self._held is not None:  # (after SQLite's own: closing it drops this process's locks)
            os.close(self._held)
            self._held = None


# -- the audit trail -------------------------------------------------------------------------

class AuditRow(typing.NamedTuple):
    """One change to the keys: when, who (the admin key's name, "local", "cli", or "file"
    for a hand edit), from where, what (the action, the key's name, the fields changed). Never
    a secret: a new secret is the field "key"."""
    at: float
    who: str
    origin: str
    action: str
    key: str
    fields: tuple[str, ...]

    def as_json(self, tz: datetime.tzinfo) -> dict[str, object]:
        return {"at": datetime.datetime.fromtimestamp(self.at, tz).isoformat(timespec="seconds"),
                "who": self.who, "from": self.origin, "action": self.action, "key": self.key,
                "fields": list(self.fields)}

    def line(self) -> str:
        """The audit row as its log line."""
        return (f"audit: {self.action} key {loggable(self.key)} by {loggable(self.who)} from "
                f"{loggable(self.origin)}"
                + (f": {', '.join(loggable(f) for f in self.fields)}" if self.fields else ""))


def insert_audit(db: sqlite3.Connection, row: AuditRow) -> None:
    db.execute("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?)",
               (row.at, stored_text(row.who), stored_text(row.origin), row.action,
                stored_text(row.key), json.dumps(list(row.fields))))


def audit_rows(db: sqlite3.Connection, since: float, limit: int) -> list[AuditRow]:
    """The audit rows from `since` on, newest first, at most `limit`."""
    return [AuditRow(at, who, origin, action, key, tuple(json.loads(fields)))
            for at, who, origin, action, key, fields in db.execute(
                "SELECT at, who, origin, action, key, fields FROM audit WHERE at >= ? "
                "ORDER BY at DESC, rowid DESC LIMIT ?", (since, limit))]


def append_audit_file(path: str, row: AuditRow) -> None:
    """Add an audit row to a state file from outside the proxy (`llm_proxy.py keys`), whether
    the proxy runs (SQLite's WAL lets another process write) or not (then the file is opened,
    brought up to date, made if new, as the proxy does at start)."""
    try:
        state = StateFile(path)
    except ConfigError:
        db = sqlite3.connect(path, timeout=5, isolation_level=None)  # held by a running proxy
        try:
            insert_audit(db, row)
        finally:
            db.close()
        return
    try:
        insert_audit(state.db, row)
    finally:
        state.close()


def read_audit_file(path: str, since: float, limit: int) -> list[AuditRow]:
    """The audit rows of a state file (while the proxy runs, too); ConfigError naming it."""
    if not os.path.exists(path):
        return []
    try:
        db = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True, timeout=5)
        try:
            return audit_rows(db, since, limit)
        finally:
            db.close()
    except sqlite3.Error as err:
        if "no such table" in str(err):
            return []
        raise ConfigError(f"STATE_DB {path}: {_state_problem(err)}") from None


class AuditTrail:
    """Where the proxy records changes to the keys: one log line each, and a row in the state
    file (kept LEDGER_RETENTION_DAYS, pruned with the ledger), or, without one (STATE_DB=off,
    Redis), in memory (the last AUDIT_MEMORY_ROWS). Methods: record(), rows()."""

    def __init__(self, state: "StateFile | None", lock: "threading.Lock | None",
                 log: Callable[[str], None]) -> None:
        self._state = state
        self._lock = lock or threading.Lock()  # (the state writer's: one thread on its db)
        self._log = log
        self._memory: collections.deque[AuditRow] = collections.deque(maxlen=AUDIT_MEMORY_ROWS)

    def record(self, row: AuditRow) -> None:
        self._log(row.line())
        with self._lock:
            if self._state is None:
                self._memory.append(row)
                return
            try:
                insert_audit(self._state.db, row)
            except sqlite3.Error as err:  # the line above is the record that stays
                self._memory.append(row)
                self._log(f"error: audit row not written to the state file: {err}")

    def rows(self, since: float, limit: int) -> list[AuditRow]:
        with self._lock:
            kept = audit_rows(self._state.db, since, limit) if self._state is not None else []
            memory = [row for row in self._memory if row.at >= since]
        return sorted(kept + memory, key=lambda r: -r.at)[:limit]


def _state_problem(err: sqlite3.Error) -> str:
    text = str(err)
    if "not a database" in text or "malformed" in text:
        return f"not a readable llm_proxy state file ({text})"
    if "readonly" in text or "read-only" in text:
        return f"cannot be written ({text})"
    if "unable to open" in text:
        return f"cannot be opened ({text})"
    return text


def read_ledger(path: str, since: float, until: float,
                key: str | None = None) -> list[tuple[LedgerKey, list[int]]]:
    """The ledger rows of hours from `since` to before `until` in a state file, read without
    disturbing the proxy that writes it. ConfigError when it cannot be read."""
    if not os.path.exists(path):
        raise ConfigError(f"STATE_DB {path}: no such file")
    try:
        db = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True, timeout=5)
        try:
            return ledger_rows(db, since, until, key)
        finally:
            db.close()
    except sqlite3.Error as err:
        raise ConfigError(f"STATE_DB {path}: {_state_problem(err)}") from None


def ledger_rows(db: sqlite3.Connection, since: float, until: float,
                key: str | None = None) -> list[tuple[LedgerKey, list[int]]]:
    """The ledger rows of hours from `since` to before `until` (of one bucket key) in an open
    state file (sqlite3.Error when they cannot be read)."""
    query = ("SELECT hour, key, name, model, kind, " + ", ".join(LEDGER_FIELDS) +
             " FROM ledger WHERE hour >= ? AND hour < ?")
    arguments: tuple = (int(since), int(math.ceil(until)))
    if key is not None:
        query += " AND key = ?"
        arguments += (key,)
    return [(LedgerKey(*row[:5]), list(row[5:])) for row in db.execute(query, arguments)]


class RedisLedger:
    """The usage ledger in Redis (with REDIS_URL), shared by every instance: a hash per hour,
    `REDIS_PREFIX l:HOUR`, whose fields are the row (key, name, model, kind) and a counter,
    kept LEDGER_RETENTION_DAYS. Written by the StateWriter like a state file."""

    path = "the usage ledger in Redis"
    SEPARATOR = "\x1f"

    def __init__(self, redis: typing.Any, prefix: str, retention_days: int,
                 errors: tuple[type[BaseException], ...]) -> None:
        self.redis = redis
        self.prefix = prefix
        self.retention = retention_days * 86400
        self.errors = errors

    def write(self, changes: StoreChanges, ledger: Mapping[LedgerKey, Sequence[int]],
              prune_before: float) -> None:
        if not ledger:
            return
        pipe = self.redis.pipeline(transaction=False)
        for entry, counts in ledger.items():
            name = f"{self.prefix}l:{entry.hour}"
            row = self.SEPARATOR.join(entry[1:])
            for field, value in zip(LEDGER_FIELDS, storable(counts)):
                if value:
                    pipe.hincrby(name, row + self.SEPARATOR + field, value)
            pipe.expireat(name, int(entry.hour + self.retention + 3600))
        pipe.execute()

    def rows(self, since: float, until: float,
             key: str | None = None) -> list[tuple[LedgerKey, list[int]]]:
        found: dict[LedgerKey, list[int]] = {}
        hours = list(range(int(since // 3600 * 3600), int(until), 3600))
        pipe = self.redis.pipeline(transaction=False)
        for hour in hours:
            pipe.hgetall(f"{self.prefix}l:{hour}")
        for hour, fields in zip(hours, pipe.execute()):
            if hour < since:
                continue
            for raw, value in fields.items():
                *row, field = raw.decode("utf-8", "replace").split(self.SEPARATOR)
                if len(row) != 4 or field not in LEDGER_FIELDS or (key and row[0] != key):
                    continue
                counts = found.setdefault(LedgerKey(hour, *row), [0] * len(LEDGER_FIELDS))
                counts[LEDGER_FIELDS.index(field)] += int(value)
        return list(found.items())

    def close(self) -> None:
        pass


def redis_ledger_rows(config: Config, since: float,
                      until: float) -> list[tuple[LedgerKey, list[int]]]:
    """The Redis ledger's rows, for `llm_proxy.py usage` (ConfigError when it cannot)."""
    store = RedisBucketStore(config, lambda message: None, Metrics())
    ledger = store.ledger(config.ledger_retention_days)
    try:
        return ledger.rows(since, until)
    except ledger.errors as err:
        raise ConfigError(f"REDIS_URL: the usage ledger cannot be read ({err})") from None


REPORT_GROUPS = ("key", "user", "model", "day", "hour")


def usage_report(rows: Iterable[tuple[LedgerKey, Sequence[int]]], by: str,
                 calendar: Calendar) -> list[dict[str, object]]:
    """The ledger's rows added up by key (its name), model, day or hour (in QUOTA_TIMEZONE),
    in order."""
    groups: dict[str, list[int]] = {}
    users: dict[str, tuple[str, str]] = {}
    for entry, counts in rows:
        if by == "key":
            group = entry.name
        elif by == "user":  # (each user under their key; a key's own work as user "")
            user = split_user(entry.key)[1]
            group = json.dumps([entry.name, user])
            users[group] = (entry.name, user)
        elif by == "model":
            group = entry.model
        else:
            local = datetime.datetime.fromtimestamp(entry.hour, calendar.tz)
            group = local.strftime("%Y-%m-%d" if by == "day" else "%Y-%m-%d %H:00")
        totals = groups.setdefault(group, [0] * len(LEDGER_FIELDS))
        for i, value in enumerate(counts):
            totals[i] += value
    if by == "user":
        return [{"key": users[group][0], "user": users[group][1],
                 **dict(zip(LEDGER_FIELDS, totals))} for group, totals in sorted(groups.items())]
    return [{by: group, **dict(zip(LEDGER_FIELDS, totals))}
            for group, totals in sorted(groups.items())]


def format_report(report: list[dict[str, object]], by: str, form: str) -> str:
    """A report as an aligned table (with a total), CSV, or JSON."""
    columns = ["key", "user", *LEDGER_FIELDS] if by == "user" else [by, *LEDGER_FIELDS]
    if form == "json":
        return json.dumps(report, indent=1) + "\n"
    if form == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(report)
        return out.getvalue()
    total: dict[str, object] = {by: "total", "key": "total", "user": ""}
    total.update((f, sum(typing.cast(int, r[f]) for r in report)) for f in LEDGER_FIELDS)
    table = [columns] + [[str(r[c]) for c in columns] for r in (*report, total)]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return "".join("  ".join(cell.ljust(w) if i < len(columns) - len(LEDGER_FIELDS) else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(row, widths))).rstrip() + "\n"
                   for row in table)


def report_window(calendar: Calendar, since: str | None, until: str | None) -> tuple[float, float]:
    """--since and --until (dates, or date and time, in QUOTA_TIMEZONE; until excluded) as
    wall-clock times: by default from the start of this month until now."""
    def moment(text: str, name: str) -> float:
        try:
            value = from_iso(text)
        except ValueError:
            raise ConfigError(f"{name}: {text!r} is not a date (2026-11-01) or a date and time "
                              "(2026-11-01T13:00)") from None
        return (value if value.tzinfo else value.replace(tzinfo=calendar.tz)).timestamp()
    start = moment(since, "since") if since else calendar.start_of(calendar.periods().month)
    end = moment(until, "until") if until else calendar.wall() + 3600
    return start, end


class StateWriter:
    """The one thread that writes the state file: what changed, every STATE_FLUSH_SECONDS and
    at stop(). It never dies: a write that fails for any reason (a full disk, a deleted file,
    a value SQLite refuses, a bug) keeps what it could not write for the next flush, is logged
    once per outage, and shows in status() (/health, /admin/overview, the
    llm_proxy_state_written metric) until a write succeeds. Requests go on from memory; a
    state that stops being written never stops silently."""

    def __init__(self, state: "StateFile | RedisLedger", store: "MemoryBucketStore | None",
                 ledger: Ledger, interval: float, log: Callable[[str], None],
                 wall: Callable[[], float] = time.time) -> None:
        self.state, self.store, self.ledger = state, store, ledger
        self.interval = interval
        self._log = log
        self._wall = wall
        #: why the last write failed, in words (None: it succeeded), and since when (wall)
        self.problem: str | None = None
        self.failing_since = 0.0
        self.flushing = threading.Lock()
        self._stop = threading.Event()
        if store is not None:  # (with Redis only the ledger is written here)
            store.persistent = True
        self._thread = threading.Thread(target=self._run, name="llm_proxy-state", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # (a timer longer than the platform's time_t takes raises OverflowError)
        while not self._stop.wait(min(self.interval, MAX_FLUSH_SECONDS)):
            try:
                self.flush()
            except Exception as err:  # (outside the write itself: the thread still goes on)
                self._failed(err)

    def flush(self) -> bool:
        """Write what changed now; whether it could be written."""
        with self.flushing:
            now = self._wall()
            changes = self.store.changes(now) if self.store is not None else \
                StoreChanges({}, {}, {})
            rows = self.ledger.take()
            try:
                self.state.write(changes, rows, now - self.ledger.retention)
            except Exception as err:  # whatever it is: nothing is dropped, the next flush retries
                if self.store is not None:
                    self.store.mark_changed(changes)
                self.ledger.put_back(rows)
                self._failed(err)
                return False
            if self.problem is not None:
                self.problem, self.failing_since = None, 0.0
                self._log(f"{self.state.path} is written again")
            return True

    def _failed(self, err: Exception) -> None:
        """Log the first failure of an outage (the later ones only replace the problem)."""
        problem = str(err) if isinstance(err, (sqlite3.Error, OSError)) else \
            f"{type(err).__name__}: {err}"
        if self.problem is None:
            self.failing_since = self._wall()
            self._log(f"warning: {self.state.path} cannot be written ({problem}): requests go on "
                      f"from memory; trying again every {_number(self.interval)} s")
        self.problem = problem

    def status(self, why: bool = False) -> dict[str, object]:
        """Whether the state is being written, and for how long it has not been; `why` adds
        the problem (for the admin: it may name paths and addresses)."""
        failing = self.problem is not None
        status: dict[str, object] = {
            "written": not failing,
            "failing_seconds": math.ceil(self._wall() - self.failing_since) if failing else 0}
        if why:
            status["problem"] = self.problem
        return status

    def unwritten(self) -> str:
        """What is held in memory that the state has not taken, in words."""
        held = self.store.pending() if self.store is not None else (0, 0, 0)
        parts = [f"{count} {what}" for count, what in zip(
            (*held, len(self.ledger)),
            ("balances", "usage counters", "quota counters", "usage ledger rows")) if count]
        return ", ".join(parts) or "nothing"

    def stop(self) -> str:
        """The last write (shutdown): what changed since the last flush. Returns what could
        not be written, with why ("" when all was): the caller says so and exits non-zero.
        A second call does nothing."""
        if self._stop.is_set():
            return ""
        self._stop.set()
        self._thread.join(WAIT_FOR_WRITER)
        written = self.flush()
        lost = "" if written else (f"{self.unwritten()} could not be written to "
                                   f"{self.state.path} ({self.problem})")
        with self.flushing:  # (a report may be reading through it)
            self.state.close()
        return lost


# ######################################################################### pricing ####

# What a request takes from its bucket at admission. In usage mode this is a reservation that the
# charge settles later with what the upstream reports (metering, below). What a generation
# request asks for (its output limits, how many answers) is read and validated by its API
# (API shapes, below) into an Ask; nothing a request says can make it cheaper than it is.

def text_bound(text: str) -> int:
    """The most tokens `text` can be, whatever its script: its UTF-8 bytes.

    The tokenizers of the models these servers run are byte-level BPE (GPT-2, Llama 3, Qwen,
    SmolLM) or SentencePiece with byte fallback (Llama 2, Mistral, Gemma): every token stands
    for at least one byte of text, so no text is more tokens than it has bytes. Characters / 4
    is not a bound even for English (digits, code, rare words split into single characters) and
    is a quarter of the truth for Chinese (about one token a character, three bytes each). An
    estimate is used only where the server reported nothing (or, in estimate mode, as the
    price), so it errs on the side of the server's time: English text comes out about four
    times its token count."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _string_stats(value: object) -> tuple[int, int]:
    """(number of strings, their text_bound) of every string value in a JSON document,
    skipping values under any key named "model". Iterative, so deeply nested input cannot blow
    the stack."""
    count, size, _ = _text_stats(value)
    return count, size


def _text_stats(value: object) -> tuple[int, int, int]:
    """_string_stats, and the integers found in arrays: token ids (a prompt or an input sent as
    tokens rather than text)."""
    count = size = tokens = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            count += 1
            size += text_bound(item)
        elif isinstance(item, dict):
            stack.extend(v for k, v in item.items() if k != "model")
        elif isinstance(item, list):
            for element in item:
                if isinstance(element, int) and not isinstance(element, bool):
                    tokens += 1
                else:
                    stack.append(element)
    return count, size, tokens


def _whole(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


RESERVE_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def response_reserve(body: Mapping[str, object], default: int) -> int:
    """Tokens set aside for the answer: max_completion_tokens, else max_tokens, else (for
    /v1/responses) max_output_tokens, else `default`; a negative or non-integer value counts as
    absent. (The request path reads limits through its API's Ask instead, which refuses such
    values; this is the formula for a body that names none.)"""
    for name in RESERVE_FIELDS:
        value = _whole(body.get(name))
        if value is not None:
            return value
    return default


def prompt_estimate(body: Mapping[str, object]) -> int:
    """An upper bound of what the input costs: the text_bound of every string joined with
    spaces, plus one for each token id sent as a number in an array. (What a server counts also
    holds its chat template's own tokens, which no reading of the body can know.)"""
    count, size, tokens = _text_stats(body)
    return size + max(0, count - 1) + tokens


def tools_estimate(body: Mapping[str, object]) -> tuple[int, int]:
    """How many tool (or function) definitions a request carries and what they add to its
    prompt estimate: Open WebUI sends about 36 built-in tools (26 KB) with every chat."""
    tools = [t for name in ("tools", "functions") if isinstance(body.get(name), list)
             for t in body[name]]  # type: ignore[attr-defined]
    return (len(tools), prompt_estimate({"tools": tools})) if tools else (0, 0)


def estimate_cost(body: Mapping[str, object], reserve: int) -> int:
    """The estimate: prompt_estimate + reserve, at least 1."""
    return max(1, prompt_estimate(body) + response_reserve(body, reserve))


def prompt_sizes(body: Mapping[str, object]) -> tuple[int, ...]:
    """The prompt_estimate of each prompt of a /v1/completions prompt array (for settling the
    prompts a server leaves out of its usage)."""
    prompts = body.get("prompt")
    if not isinstance(prompts, list):
        return ()
    return tuple(prompt_estimate({"prompt": p}) for p in prompts)


class Ask(typing.NamedTuple):
    """What a generation request asks for, read from its payload by its API and validated."""
    stream: bool
    reserve: int                         # output tokens one answer may run to
    answers: int = 1                     # answers generated: n (or best_of) times the prompts
    limits: tuple[tuple[str, ...], ...] = ()  # where the request set an output limit
    prompts: int = 1                     # prompts sent (a /v1/completions prompt array)
    bounded: bool = False                # a limit above 0 was set (else `reserve` is a default)


def request_cost(body: Mapping[str, object], policy: KeyPolicy, kind: str = "generate",
                 ask: Ask | None = None) -> int:
    """What a charged request takes from its bucket at admission (in usage mode: reserves).
    `kind` is its route's kind: "generate" (its prompt plus the reserve for every answer it
    asks for), or "embed" (its input is its whole cost). In usage mode a key's
    max_reserve_tokens (when set) caps it: an agent that asks for 32,000 output tokens and uses
    a few thousand is not refused for what it will not use; what it really costs is settled
    when it ends, as debt if need be, never more than its own limits allow."""
    if policy.token_cost_mode == "request":
        return policy.request_token_cost
    if kind == EMBED:  # an embedding generates nothing: its input is its cost
        return max(1, prompt_estimate(body))
    if ask is None:
        cost = estimate_cost(body, policy.response_token_reserve)
    else:
        cost = max(1, prompt_estimate(body) + ask.reserve * ask.answers)
    if policy.token_cost_mode == "usage" and policy.max_reserve_tokens:
        return min(cost, policy.max_reserve_tokens)  # the rest is settled as debt
    return cost


# ######################################################################## metering ####

# With TOKEN_COST_MODE=usage a Meter reads what an answer really cost as it passes through the
# relay: a body transform (feed each piece, finish at the end) that returns what to relay. Each
# API has its own (OpenAI's server-sent events, Anthropic's named events, Ollama's lines of
# JSON); the framing is shared.

_USAGE_NULL_MEMBERS = (b', "usage": null', b',"usage":null')
_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*[,}])|"usage"\s*:\s*null\s*,\s*')
_EVENT_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(rb"\n")


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


MAX_TEMPLATES = 8  # event templates a stream may make (servers whose envelope keeps changing)


class EventTemplate(typing.NamedTuple):
    """The bytes of a stream event around its piece of text, as read and as relayed.

    A stream's events are mostly alike: the same envelope (id, model, index...) around one
    piece of text. An event that is the template's envelope around exactly one JSON string
    parses to the template's object with that string as its text, so it is read without
    parsing it: one string scanned instead of a whole object decoded, a fifth of the cost.
    """
    before: bytes
    after: bytes
    relayed_before: bytes
    relayed_after: bytes

    @classmethod
    def of(cls, event: bytes, relayed: bytes, text: str, meter: "Meter") -> "EventTemplate | None":
        """The template of an event that is nothing but `text`: found where the text's JSON
        (as Python writes it, or with raw UTF-8) occurs once in the event and once as
        relayed, and checked by parsing the event with another text in its place."""
        spellings = [json.dumps(text).encode()]
        try:
            spellings.append(json.dumps(text, ensure_ascii=False).encode())
        except UnicodeEncodeError:  # (a lone surrogate: only its escaped spelling exists)
            pass
        for literal in spellings:
            at, out = event.find(literal), relayed.find(literal)
            if at < 0 or out < 0 or event.find(literal, at + 1) >= 0 \
                    or relayed.find(literal, out + 1) >= 0:
                continue
            template = cls(event[:at], event[at + len(literal):], relayed[:out],
                           relayed[out + len(literal):])
            probe = meter._parse(template.before + b'"\\u2603probe"' + template.after)
            if probe is not None and meter.text_piece(probe) == "\u2603probe":
                return template
        return None

    def fill(self, event: bytes, meter: "Meter") -> bytes | None:
        """The event as relayed, its text counted, when it fits the template; else None."""
        before, after = self.before, self.after
        if not event.startswith(before) or not event.endswith(after):
            return None
        literal = event[len(before):len(event) - len(after)]
        if len(literal) < 2 or literal[0] != 0x22:  # (a JSON string: "...")
            return None
        try:
            raw = literal.decode("utf-8", "surrogatepass")  # (as json.loads(bytes))
            text, end = _scan_string(raw, 1)
        except ValueError:  # (UnicodeDecodeError too)
            return None
        if end != len(raw):
            return None
        # (without escapes the literal's bytes are the text's UTF-8: its text_bound)
        meter.generated += len(literal) - 2 if 0x5C not in literal else text_bound(text)
        return self.relayed_before + literal + self.relayed_after


#: the C scanner: the JSON string from after its quote (public since Python 2.6, though
#: typeshed does not list it)
_scan_string: Callable[[str, int], tuple[str, int]] = \
    json.decoder.scanstring  # type: ignore[attr-defined]  # (see above)


class Meter:
    """What an answer really cost, read as it passes through (TOKEN_COST_MODE=usage).

    feed() takes each piece read from the upstream and returns what to relay. A plain body is
    relayed untouched and parsed once it has all gone out (finish()). A stream is cut into its
    events (SSE: a blank line ends one; NDJSON: a newline), each relayed as soon as it is
    complete; observe() (one per API) reads each, and may drop one (drop()). cost() says what
    the answer came to: exactly the upstream's own numbers where they cover the whole request
    (reports_all()); what they leave out is estimated (with_unreported()), and without numbers
    the estimates stand alone: the prompt estimate and the text_bound of the delivered text
    (`generated`), upper bounds in every script. A plain body over MAX_METERED_BODY is not kept:
    its usage is read from its last TAIL_WINDOW bytes (read_tail()).

    `unmeterable` is true when the answer could not be read where it should have been: an
    encoded body (Content-Encoding), a plain body over MAX_METERED_BODY whose tail holds no
    usage, or a successful answer without the usage its API always sends (`expects_usage`).
    The charge then keeps its whole reservation. A stream the upstream itself ended with an
    error event (`failed`) is settled like one that broke off: the prompt estimate and what was
    generated.
    """

    event_end = _EVENT_END

    def __init__(self, stream: bool, strip: bool = False, expects_usage: bool = True) -> None:
        self.stream = stream
        self.strip = strip                  # drop what the proxy asked for on the client's behalf
        self.expects_usage = expects_usage
        self.generated = 0                  # text_bound of the generated text seen
        self.answers = 1                    # answers the request asked for (n times prompts)
        self.output_limit: int | None = None  # the most all its answers may generate (if set)
        self.prompt_sizes: tuple[int, ...] = ()  # prompt_estimate of each prompt (several)
        self.failed = False                 # the upstream ended its stream with an error
        self.encoded = False
        self.ok = True                      # a 2xx answer (only those are expected to carry usage)
        self._pending = b""
        self._body: list[bytes] = []
        self._size = 0
        self._tail = b""                    # the end of a plain body too long to keep
        self._tail_read = False             # usage was found in that tail
        self._template: EventTemplate | None = None
        self._templates = 0

    @property
    def template(self) -> "EventTemplate | None":
        """The template pieces of text are read by now (None: each event is parsed)."""
        return self._template

    @property
    def templates_made(self) -> int:
        return self._templates

    def without_templates(self) -> "Meter":
        """This meter, reading every event the general way (what a template must match)."""
        self._templates = MAX_TEMPLATES
        return self

    def begin(self, status: int, content_encoding: str | None, stream: bool) -> None:
        """The answer's status, Content-Encoding and whether it is a stream (its Content-Type),
        before its body: an encoded body passes through unread (and unstripped), and an answer
        is metered as what it is, a stream or a plain body, whatever the request asked for (a
        server may read a request differently, or stream by default)."""
        self.ok = 200 <= status < 300
        self.stream = stream
        if content_encoding and content_encoding.strip().lower() != "identity":
            self.encoded, self.strip = True, False

    def feed(self, data: bytes) -> bytes:
        if self.encoded:
            return data
        if not self.stream:
            self._size += len(data)
            if self._size <= MAX_METERED_BODY:
                self._body.append(data)
            else:  # too long to keep: only its end, where the usage is
                self._tail = (b"".join(self._body) + self._tail + data)[-TAIL_WINDOW:]
                self._body = []
            return data
        if not self._pending and self.one_event(data):  # (the usual piece of a stream)
            return self._event(data) or b""
        buffer = self._pending + data
        out = []
        start = 0
        for match in self.event_end.finditer(buffer):
            event = self._event(buffer[start:match.end()])
            if event:
                out.append(event)
            start = match.end()
        self._pending = buffer[start:]
        if len(self._pending) > MAX_PENDING_EVENT:  # not events after all: stop holding bytes
            out.append(self.held() + self._pending)
            self._pending = b""
        return b"".join(out)

    def finish(self) -> bytes:
        """The end of the response: what is left to relay (an unterminated last event)."""
        rest, self._pending = self._pending, b""
        if not self.stream and not self.encoded and self._size <= MAX_METERED_BODY:
            obj = json_or_none(b"".join(self._body))
            if isinstance(obj, dict):
                self.observe(obj)
            self._body = []
        elif not self.stream and not self.encoded:
            self._tail_read = self.read_tail(self._tail)
            self._tail = b""
        if self.encoded:
            return rest
        return (self._event(rest) or b"") if rest else b""

    def held(self) -> bytes:
        """Whole events held back (none here; see UsageMeter)."""
        return b""

    def _event(self, event: bytes) -> bytes | None:
        template = self._template
        if template is not None:
            relayed = template.fill(event, self)
            if relayed is not None:
                return relayed
        obj = self._parse(event)
        if obj is None:
            return event
        if self.observe(obj):
            return None
        relayed = self.rewrite(event)
        if self._templates < MAX_TEMPLATES:
            text = self.text_piece(obj)
            if text is not None:
                self._templates += 1
                try:
                    self._template = EventTemplate.of(event, relayed, text, self)
                except ValueError:  # (whatever goes wrong, the general way stays right)
                    self._template = None
        return relayed

    @staticmethod
    def one_event(data: bytes) -> bool:
        """Whether `data` is exactly one whole event (what event_end finds once, at its end)."""
        return data.endswith(b"\n\n") and data.find(b"\n\n") == len(data) - 2 \
            and b"\n\r\n" not in data

    def _parse(self, event: bytes) -> dict | None:
        """The JSON object an event carries (SSE: its data lines), or None."""
        if event.startswith(b"data:") and event.find(b"\n") == len(event) - 2 \
                and event.endswith(b"\n\n") and b"\r" not in event:  # one data line, the usual
            data = event[5:].lstrip()
            return json_object(data) if data.startswith(b"{") else None
        data = b"".join(line[5:].strip() for line in event.splitlines()
                        if line.startswith(b"data:"))
        if not data.startswith(b"{"):
            return None  # [DONE], comments, other event fields
        return json_object(data)

    def rewrite(self, event: bytes) -> bytes:
        """An event as relayed (the OpenAI meter strips what the proxy asked for)."""
        return event

    def text_piece(self, obj: dict) -> str | None:
        """When an event is nothing but a piece of generated text (what observe() does with
        it is add its length to `generated`, and nothing else), that text."""
        return None

    # -- one per API ------------------------------------------------------------------------

    def observe(self, obj: dict) -> bool:
        """Note usage and generated text of one event (or of a whole plain body); True to drop
        the event."""
        raise NotImplementedError

    def usage(self) -> tuple[int | None, int, int] | None:
        """(prompt tokens or None when not reported, completion tokens, total) as reported."""
        raise NotImplementedError

    def reports_all(self) -> bool:
        """Whether the usage reported covers every answer's whole completion (not, say, only
        a stream's prompt, sent at its start)."""
        return True

    #: The member that starts the end of a plain body, where its usage is (read_tail).
    tail_key = b'"usage"'

    def observe_tail(self, obj: dict) -> None:
        """Note the usage in the members read from a long plain body's tail."""
        self.observe(obj)

    # -- the result -------------------------------------------------------------------------

    def read_tail(self, tail: bytes) -> bool:
        """The usage of a plain body too long to keep, from its last bytes: the members from
        the last `tail_key` to the body's end read as an object of their own (servers write
        usage at the end: after the choices and their logprobs, which make a body long).
        Whether usage was found there."""
        at = len(tail)
        for _ in range(4):  # (the last few, in case one is a nested member)
            at = tail.rfind(self.tail_key, 0, at)
            if at < 0:
                return False
            try:
                obj, _ = _DECODER.raw_decode("{" + tail[at:].decode("utf-8", "replace"))
            except ValueError:
                continue
            if isinstance(obj, dict):
                self.observe_tail(obj)
                if self.usage() is not None:
                    return True
        return False

    @property
    def unmeterable(self) -> bool:
        if self.encoded or (not self.stream and self._size > MAX_METERED_BODY
                            and not self._tail_read):
            return self.ok
        return self.ok and self.expects_usage and not self.failed and self.usage() is None

    def reported(self) -> int | None:
        """The total the upstream reported, if it reported one."""
        numbers = self.usage()
        return None if numbers is None else numbers[2]

    def cost(self, prompt_tokens_estimate: int) -> tuple[int, int, int]:
        """(prompt, completion, total) tokens: the upstream's numbers, exactly, where they
        cover the whole request; an estimate (an upper bound) only of what they leave out."""
        numbers = self.usage()
        if numbers is None:
            generated = self.generated_estimate()
            return prompt_tokens_estimate, generated, prompt_tokens_estimate + generated
        prompt, completion, total = numbers
        if prompt is None:  # (Ollama leaves out a cached prompt)
            prompt = prompt_tokens_estimate
            total += prompt
        if self.reports_all():
            return prompt, completion, total
        more_prompt, more_completion = self.with_unreported(prompt, completion,
                                                            prompt_tokens_estimate)
        return (more_prompt, more_completion,
                total + more_prompt - prompt + more_completion - completion)

    def with_unreported(self, prompt: int, completion: int,
                        prompt_tokens_estimate: int) -> tuple[int, int]:
        """(prompt, completion) when the report leaves the completion out (a stream cut after
        the prompt's count, as Anthropic's message_start gives it): the completion never less
        than the estimate of the delivered text."""
        return prompt, max(completion, self.generated_estimate())

    def generated_estimate(self) -> int:
        """What the delivered text may have cost: its text_bound, and never more than the
        output limit the request set (the server stops there)."""
        if self.output_limit is None:
            return self.generated
        return min(self.generated, self.output_limit)


_DECODER = json.JSONDecoder()
#: The end of a plain body over MAX_METERED_BODY kept to read its usage from (read_tail).
TAIL_WINDOW = 64 * 1024


def prorated(tokens: int, measured: int, size: int) -> int:
    """The tokens of a part of `size` (its text_bound) that the server did not count, at the
    rate it counted another part: `tokens` for a `measured` size. Never above `size`, the
    bound; the bound itself when nothing was measured."""
    if tokens <= 0 or measured <= 0:
        return size
    return min(size, -(-tokens * size // measured))


def usage_numbers(usage: object) -> tuple[int, int, int]:
    """(prompt, completion, total) from a usage object of chat/completions/embeddings
    (prompt_tokens, completion_tokens, total_tokens) or of /v1/responses (input_tokens,
    output_tokens, total_tokens). Extra fields (llama.cpp's timings) are ignored."""
    if not isinstance(usage, dict):
        return 0, 0, 0
    prompt = _count(usage.get("prompt_tokens")) or _count(usage.get("input_tokens"))
    completion = _count(usage.get("completion_tokens")) or _count(usage.get("output_tokens"))
    total = _count(usage.get("total_tokens")) or prompt + completion
    return prompt, completion, total


def generated_bound(obj: Mapping[str, object]) -> int:
    """The text_bound of the generated text in an OpenAI response object or stream chunk,
    across all its choices (for settling what the upstream did not report)."""
    size = 0
    choices = obj.get("choices")
    if type(choices) is list and len(choices) == 1 and "type" not in obj \
            and "output" not in obj:  # one delta, the usual
        choice = choices[0]
        delta = choice.get("delta") if type(choice) is dict else None
        if type(delta) is dict and "message" not in choice and "text" not in choice:
            for name, value in delta.items():
                if type(value) is str:
                    if name != "role" and name != "model":
                        size += text_bound(value)
                elif isinstance(value, (dict, list)):
                    break  # (tool calls: counted below)
            else:
                return size
            size = 0
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict):
                size += choice_bound(choice)
    kind, delta = obj.get("type"), obj.get("delta")
    if isinstance(kind, str) and kind.endswith(".delta") and isinstance(delta, str):
        size += text_bound(delta)  # a Responses API stream event
    output = obj.get("output")
    if obj.get("object") == "response" and isinstance(output, list):
        for item in output:
            for part in (item.get("content") or []) if isinstance(item, dict) else []:
                text = part.get("text") if isinstance(part, dict) else None
                if isinstance(text, str):
                    size += text_bound(text)
    return size


def choice_bound(choice: Mapping[str, object]) -> int:
    """The text_bound of one choice's generated text (its delta or message, or its text)."""
    size = 0
    for part in (choice.get("delta"), choice.get("message")):
        if isinstance(part, dict):
            size += _string_stats({k: v for k, v in part.items() if k != "role"})[1]
    text = choice.get("text")
    if isinstance(text, str):
        size += text_bound(text)
    return size


class UsageMeter(Meter):
    """The OpenAI API's usage: from the chunks with empty `choices` (the final usage chunk; a
    server that sends one per answer, as llama.cpp does for n > 1, has them added up), else the
    last non-zero usage of each answer (Ollama's /v1/completions puts zeroed usage on every
    chunk; llama.cpp's completions put it in each answer's last chunk), else a /v1/responses
    `response.completed` event; or the `usage` of a plain body.

    What the usage covers: a stream's, every answer once each has its own usage chunk (llama.cpp
    sends one per answer) or one came after every answer had finished (vLLM's, for them all);
    a plain body's, the whole request, except on llama.cpp's server (its answers carry
    `timings`), which counts only the first answer and the first prompt of a request for
    several: the others are estimated at the rate it counted the first (prorated).

    When the proxy asked for `stream_options.include_usage` on the client's behalf (strip=True),
    the usage chunk the client did not ask for is dropped, and so is the `"usage": null` member
    the upstream then adds to every other chunk; what else that chunk carried (llama.cpp's
    `timings`, which it puts on an answer's last chunk when usage is not asked for) goes onto
    that answer's last chunk, held back until the next event shows whether one follows: the
    client gets the bytes it would have got without the proxy.
    """

    def __init__(self, stream: bool, strip: bool = False, expects_usage: bool = True) -> None:
        super().__init__(stream, strip, expects_usage)
        self._finals: list[tuple[int, int, int]] = []
        self._by_answer: dict[object, tuple[int, int, int]] = {}
        self._finished: set[object] = set()      # the answers whose last chunk came
        self._covered = False                    # a usage chunk came after every answer's last
        self._partial = False                    # a plain body's usage counts its first answer
        self._choice_sizes: list[int] = []       # a plain body's answers' text_bound, in order
        self._finish_seen = False                # the event just observed ends an answer
        self._held: bytes | None = None          # an answer's last chunk, held (strip)
        self._moved: dict[str, object] = {}      # the dropped usage chunk's other members
        #: the proxy asked for counts on every chunk (ask_for_counts): they are read, and taken
        #: out of what the client gets
        self.counts_asked = False
        self._running: tuple[int, int] | None = None  # llama.cpp's timings: (prompt, generated)
        self._timings = b""  # the last per-chunk timings taken off a chunk, read when needed


    def observe(self, obj: dict) -> bool:
        timings, progress = obj.get("timings"), obj.get("prompt_progress")
        if type(timings) is dict or type(progress) is dict:  # (llama.cpp, asked: see
            prompt, generated = self._running or (0, 0)   # ask_for_counts)
            if type(progress) is dict:  # the whole prompt's count, before it is evaluated
                prompt = max(prompt, _count(progress.get("total")))
            if type(timings) is dict:
                prompt = max(prompt, _count(timings.get("prompt_n"))
                             + _count(timings.get("cache_n")))
                generated = max(generated, _count(timings.get("predicted_n")))
            self._running = (prompt, generated)
            if type(progress) is dict and self.counts_asked:
                return True  # (a chunk of progress only: the client did not ask for it)
        usage = obj.get("usage")
        if usage is None and "error" not in obj and "type" not in obj:  # a chunk of text
            self.generated += generated_bound(obj)
            if self.stream:
                self._note_finish(obj)
            else:
                self._note_answers(obj)
            return False
        if obj.get("type") == "response.completed" and isinstance(obj.get("response"), dict):
            usage = obj["response"].get("usage")
        numbers = usage_numbers(usage)
        if "error" in obj and not obj.get("choices"):
            self.failed = True
        final = obj.get("choices") == [] and numbers[2] > 0
        self._note_finish(obj)
        if final:
            self._finals.append(numbers)
            self._covered = self._covered or len(self._finished) >= self.answers
            if self.strip:
                self._moved = {k: v for k, v in obj.items() if k not in _CHUNK_MEMBERS}
        elif numbers[2] > 0:
            choices = obj.get("choices")
            first = choices[0] if isinstance(choices, list) and choices else None
            self._by_answer[_index(first)] = numbers
        if not self.stream:
            self._note_answers(obj)
        self.generated += generated_bound(obj)
        return final and self.strip

    def _note_finish(self, obj: dict) -> None:
        choices = obj.get("choices")
        if type(choices) is list:
            for choice in choices:
                if type(choice) is dict and choice.get("finish_reason") is not None:
                    self._finished.add(_index(choice))
                    self._finish_seen = True

    def _note_answers(self, obj: dict) -> None:
        """A plain body of several answers: the size of each, and whether its usage is
        llama.cpp's (the first answer's only)."""
        choices = obj.get("choices")
        if isinstance(choices, list) and len(choices) > 1:
            self._choice_sizes = [choice_bound(c) for c in choices if isinstance(c, dict)]
            self._partial = "timings" in obj

    def reports_all(self) -> bool:
        if not self.stream:
            return not self._partial
        return (self.answers <= 1 or self._covered or len(self._finals) >= self.answers
                or len(self._by_answer) >= self.answers)

    def with_unreported(self, prompt: int, completion: int,
                        prompt_tokens_estimate: int) -> tuple[int, int]:
        if self.stream:  # cut before the usage of its last answers: the whole estimated
            return (max(prompt, prompt_tokens_estimate),
                    max(completion, self.generated_estimate()))
        if len(self._choice_sizes) < 2:
            return super().with_unreported(prompt, completion, prompt_tokens_estimate)
        first, *others = self._choice_sizes
        more_completion = completion + sum(prorated(completion, first, n) for n in others)
        more_prompt = prompt
        if len(self.prompt_sizes) > 1:
            measured, *rest = self.prompt_sizes
            more_prompt += sum(prorated(prompt, measured, n) for n in rest)
        return more_prompt, more_completion

    _TIMINGS = b',"timings":{'

    def _without_timings(self, event: bytes) -> bytes:
        """With counts asked for, llama.cpp's per-chunk `timings` member (its last, an object
        of numbers) is taken off a chunk's bytes before anything else looks at it: the chunk
        is then the one the client would have had, and the fast path (the event template)
        still serves it; the last one taken is read only when the cost is (_counts)."""
        at = event.find(self._TIMINGS)
        if at > 0 and b'"finish_reason":null' in event:
            end = event.find(b"}", at + len(self._TIMINGS))
            if end > 0 and event[end + 1:end + 2] == b"}" and \
                    b"{" not in event[at + len(self._TIMINGS):end]:
                self._timings = event[at + len(self._TIMINGS) - 1:end + 1]
                return event[:at] + event[end + 1:]
        return event

    def _counts(self) -> tuple[int, int] | None:
        """(prompt, generated) as the server last counted them while the stream ran."""
        prompt, generated = self._running or (0, 0)
        timings = json_object(self._timings) if self._timings else None
        if timings is not None:
            prompt = max(prompt, _count(timings.get("prompt_n")) + _count(timings.get("cache_n")))
            generated = max(generated, _count(timings.get("predicted_n")))
        return (prompt, generated) if prompt else None

    def _event(self, event: bytes) -> bytes | None:
        if self.counts_asked:
            event = self._without_timings(event)
        template = self._template
        if template is not None and self._held is None:  # (the usual event, first)
            relayed = template.fill(event, self)
            if relayed is not None:
                return relayed
        if not self.strip:
            return super()._event(event)
        relayed = super()._event(event)
        held = self._held
        if relayed is None:  # the usage chunk the proxy asked for
            self._held = None
            return self._with_moved(held, event) if held is not None else None
        if self._finish_seen:
            self._finish_seen = False
            self._held = relayed
            return held
        if held is None:
            return relayed
        self._held = None
        return held + relayed

    def _with_moved(self, held: bytes, event: bytes) -> bytes:
        """An answer's last chunk with the members its dropped usage chunk carried besides the
        usage, as the server writes them when usage is not asked for (at its end)."""
        moved, self._moved = self._moved, {}
        members = _raw_members(event, moved)
        end = held.rfind(b"}")
        if not members or end < 0:
            return held
        return held[:end] + b"," + b",".join(members) + held[end:]

    def finish(self) -> bytes:
        out = super().finish()
        return out + self.held()

    def held(self) -> bytes:
        held, self._held = self._held, None
        return held or b""

    def rewrite(self, event: bytes) -> bytes:
        if self.counts_asked and (b'"timings"' in event or b'"usage":{' in event
                                  or b'"usage": {' in event):
            event = self._without_counts(event)
        if self.strip and b'"usage"' in event:
            for member in _USAGE_NULL_MEMBERS:  # (the usual spellings, found without the regex)
                at = event.find(member)
                if at >= 0 and event[at + len(member):at + len(member) + 1] in b",}":
                    rest = event[:at] + event[at + len(member):]
                    if b'"usage"' not in rest:
                        return rest
            return _USAGE_NULL.sub(b"", event)
        return event

    def _without_counts(self, event: bytes) -> bytes:
        """A chunk of text without the counts the proxy asked for on it: llama.cpp's
        `timings` and vLLM's continuous `usage` (null, as the client would have had it). The
        usage chunk and an answer's last chunk keep theirs (a server sends those unasked)."""
        obj = self._parse(event)
        choices = obj.get("choices") if obj is not None else None
        if obj is None or type(choices) is not list or not choices or any(
                type(c) is not dict or c.get("finish_reason") is not None for c in choices):
            return event
        usage = obj.get("usage")
        if "timings" not in obj and not (type(usage) is dict and any(
                _count(v) for v in usage.values())):
            return event  # (Ollama's zeroed usage on every chunk is its own)
        obj.pop("timings", None)
        if usage is not None:
            obj["usage"] = None
        return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() \
            + b"\n\n"

    def text_piece(self, obj: dict) -> str | None:
        if obj.get("usage") is not None or "error" in obj or "type" in obj or "output" in obj \
                or "timings" in obj:
            return None
        choices = obj.get("choices")
        if type(choices) is not list or len(choices) != 1 or type(choices[0]) is not dict:
            return None
        choice = choices[0]
        if "message" in choice or choice.get("finish_reason") is not None:
            return None  # (an answer's last chunk is never a template: see _event)
        delta = choice.get("delta")
        if delta is None:  # a completion's piece
            text = choice.get("text")
        elif type(delta) is dict and delta.keys() == {"content"} and "text" not in choice:
            text = delta["content"]
        else:
            return None
        return text if type(text) is str else None

    def usage(self) -> tuple[int | None, int, int] | None:
        """The usage reported, added up over the answers' reports. A server that reports each
        answer of n on its own (llama.cpp) counts the request's prompt in every report, but
        processes it once a prompt, and so do its own counters: the prompt is counted once for
        each prompt the request sent (the largest reports), the completions all added up."""
        found = self._finals or list(self._by_answer.values())
        counted = None if found else self._counts()
        if counted is not None:  # (a stream cut before its usage: as the server counted)
            prompt, generated = counted
            return prompt, generated, prompt + generated
        if not found:
            return None
        prompts = sorted((n[0] for n in found), reverse=True)
        prompt = sum(prompts[:max(1, len(self.prompt_sizes))])
        completion = sum(n[1] for n in found)
        other = sum(n[2] - n[0] - n[1] for n in found)  # (what a total holds besides the two)
        return prompt, completion, prompt + completion + max(0, other)


#: The members of an OpenAI stream chunk; a usage chunk's others are moved, not dropped.
_CHUNK_MEMBERS = frozenset({"id", "object", "created", "model", "system_fingerprint",
                            "service_tier", "choices", "usage", "obfuscation"})


def _index(choice: object) -> object:
    """A choice's index, as a key (None when it has none, or an odd one)."""
    index = choice.get("index") if isinstance(choice, dict) else None
    return index if isinstance(index, (int, str)) else None


def _raw_members(event: bytes, members: Mapping[str, object]) -> list[bytes]:
    """The bytes of the top-level `members` of an event's JSON, as the server wrote them."""
    try:
        text = event.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return []
    found = []
    for name, value in members.items():
        for match in re.finditer(re.escape(json.dumps(name)) + r"\s*:\s*", text):
            try:
                read, end = _DECODER.raw_decode(text, match.end())
            except ValueError:
                continue
            if read == value:
                found.append(text[match.start():end].encode("utf-8", "surrogatepass"))
                break
    return found


class AnthropicMeter(Meter):
    """The Anthropic Messages API's usage: a message's `usage`, or, streamed, message_start's
    (the input) and the last message_delta's (the output, cumulative). The prompt is
    input_tokens plus the cache fields (cache_creation_input_tokens, cache_read_input_tokens),
    as in Anthropic's own API and on llama.cpp's server."""

    FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
              "output_tokens")

    def __init__(self, stream: bool, strip: bool = False, expects_usage: bool = True) -> None:
        super().__init__(stream, strip, expects_usage)
        self._fields: dict[str, int] | None = None
        self._output_counted = False  # the output count came (message_start's is 0)

    def observe(self, obj: dict) -> bool:
        kind = obj.get("type")
        usage: object = None
        if kind == "message":
            usage = obj.get("usage")
            self._output_counted = True
            content = obj.get("content")
            for block in content if isinstance(content, list) else []:
                if isinstance(block, dict):
                    self.generated += _string_stats({k: v for k, v in block.items()
                                                     if k != "type"})[1]
        elif kind == "message_start" and isinstance(obj.get("message"), dict):
            usage = obj["message"].get("usage")
        elif kind == "message_delta":
            usage = obj.get("usage")
            self._output_counted = self._output_counted or isinstance(usage, dict)
        elif kind == "error":
            self.failed = True
        elif kind == "content_block_delta" and isinstance(obj.get("delta"), dict):
            delta = obj["delta"]
            for name in ("text", "partial_json", "thinking"):
                if isinstance(delta.get(name), str):
                    self.generated += text_bound(delta[name])
        if isinstance(usage, dict):
            fields = self._fields if self._fields is not None else {}
            for name in self.FIELDS:  # cumulative: the largest value seen is the latest
                fields[name] = max(fields.get(name, 0), _count(usage.get(name)))
            self._fields = fields
        return False

    def text_piece(self, obj: dict) -> str | None:
        delta = obj.get("delta")
        if obj.get("type") != "content_block_delta" or type(delta) is not dict \
                or not delta.keys() <= {"type", "text"}:
            return None
        text = delta.get("text")
        return text if type(text) is str else None

    def reports_all(self) -> bool:
        return self._output_counted

    def observe_tail(self, obj: dict) -> None:
        self.observe({**obj, "type": "message"})

    def usage(self) -> tuple[int | None, int, int] | None:
        if self._fields is None:
            return None
        f = self._fields
        prompt = (f["input_tokens"] + f["cache_creation_input_tokens"]
                  + f["cache_read_input_tokens"])
        return prompt, f["output_tokens"], prompt + f["output_tokens"]


class OllamaMeter(Meter):
    """Ollama's native API: lines of JSON; the last (`"done": true`) carries prompt_eval_count
    (left out when the prompt was cached: the prompt estimate stands in) and eval_count.
    /api/embed reports prompt_eval_count too."""

    event_end = _LINE_END
    tail_key = b'"total_duration"'  # (the counts follow it, after a long "context")

    def __init__(self, stream: bool, strip: bool = False, expects_usage: bool = True) -> None:
        super().__init__(stream, strip, expects_usage)
        self._numbers: tuple[int | None, int] | None = None

    @staticmethod
    def one_event(data: bytes) -> bool:
        return data.endswith(b"\n") and data.find(b"\n") == len(data) - 1

    def _parse(self, event: bytes) -> dict | None:
        return json_object(event) if event.lstrip().startswith(b"{") else None

    def observe(self, obj: dict) -> bool:
        for part in (obj.get("message"), obj):
            if isinstance(part, dict):
                for name in ("content", "response", "thinking"):
                    if isinstance(part.get(name), str):
                        self.generated += text_bound(part[name])
        if "error" in obj and obj.get("done") is not True:
            self.failed = True
        if obj.get("done") is True or "prompt_eval_count" in obj or "eval_count" in obj:
            prompt = obj.get("prompt_eval_count")
            self._numbers = (_count(prompt) if prompt is not None else None,
                             _count(obj.get("eval_count")))
        return False

    def usage(self) -> tuple[int | None, int, int] | None:
        if self._numbers is None:
            return None
        prompt, completion = self._numbers
        return prompt, completion, (prompt or 0) + completion


# ###################################################################### API shapes ####

# How each API the proxy serves speaks, one class per API: what a request may ask for (read:
# its stream flag and output limits, validated, and the reserve they come to; cap: the limit
# written into the forwarded body in estimate mode), its errors, the limit answer (an assistant
# message in the API's own shape, or a 429), the last event of a stream the upstream broke off,
# and the meter that reads its usage. A route names its API; nothing else knows their shapes.

@dataclass(frozen=True)
class Reply:
    """A whole answer made by the proxy itself (body None: no body, as for HEAD or 204)."""
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes | None


def json_reply(status: int, value: object, headers: Sequence[tuple[str, str]] = ()) -> Reply:
    return Reply(status, (("Content-Type", "application/json"), *headers),
                 json.dumps(value).encode())


def wait_text(seconds: float) -> str:
    """How long a wait is, in words a person reads, rounded up: '45 s', '5 min', '3 h 20 min',
    '2 days 4 h'."""
    whole = max(1, math.ceil(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes = math.ceil(whole / 60)
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 48 * 60:
        hours, rest = divmod(minutes, 60)
        return f"{hours} h {rest} min" if rest else f"{hours} h"
    days, rest = divmod(math.ceil(minutes / 60), 24)
    return f"{days} days {rest} h" if rest else f"{days} days"


def limit_message(seconds: float) -> str:
    return f"limit reached, wait {wait_text(seconds)}"


def rate_limit_headers(quota: Quota) -> list[tuple[str, str]]:
    """The X-RateLimit-* headers of every charged response (the prototype's names), and for
    each calendar quota of the key its limit, what remains and the seconds until it resets
    (X-RateLimit-Limit-Tokens-Day, ...-Remaining-..., ...-Reset-...)."""
    headers = [
        ("X-RateLimit-Limit", str(quota.limit)),
        ("X-RateLimit-Remaining", str(max(0, quota.remaining))),
        ("X-RateLimit-Reset", str(math.ceil(quota.reset_seconds))),
        ("X-RateLimit-Refill-Tokens", str(quota.policy.refill_tokens)),
        ("X-RateLimit-Refill-Seconds", _number(quota.policy.refill_interval)),
        ("X-RateLimit-Reset-Seconds", str(math.ceil(quota.wait_seconds))),
    ]
    for q in quota.calendar:
        suffix = CALENDAR_HEADER_SUFFIX[q.name]
        headers += [(f"X-RateLimit-Limit-{suffix}", str(q.limit)),
                    (f"X-RateLimit-Remaining-{suffix}", str(q.remaining)),
                    (f"X-RateLimit-Reset-{suffix}", str(math.ceil(q.reset_seconds)))]
    return headers


CALENDAR_HEADER_SUFFIX = {"tokens_per_day": "Tokens-Day", "tokens_per_month": "Tokens-Month",
                          "requests_per_day": "Requests-Day"}
#: What the limit answer says ran out, for each thing that can refuse a request.
LIMIT_TEXTS = {"tokens_per_day": "daily limit reached, resets in {}",
               "tokens_per_month": "monthly limit reached, resets in {}",
               "requests_per_day": "daily request limit reached, resets in {}"}


def reset_text(seconds: float, calendar: Calendar | None = None) -> str:
    """How far away a calendar reset is (wait_text), and, past a few hours, when it comes on
    the calendar's clock: '3 days 4 h (on Thu 1 Jan 00:00 UTC)'."""
    text = wait_text(seconds)
    if calendar is None or seconds < 6 * 3600:
        return text
    moment = datetime.datetime.fromtimestamp(calendar.wall() + seconds, calendar.tz)
    return f"{text} (on {moment:%a} {moment.day} {moment:%b %H:%M} {calendar.zone})"


def retry_headers(wait: float, honoured: float = SDK_MAX_RETRY_AFTER) -> list[tuple[str, str]]:
    """Retry-After (whole seconds) and retry-after-ms, which the SDKs read first; past what the
    SDK would wait (`honoured`), x-should-retry: false so it fails fast instead of backing off
    blindly."""
    seconds = max(1, math.ceil(wait))
    headers = [("Retry-After", str(seconds)), ("retry-after-ms", str(max(1, math.ceil(wait * 1000))))]
    if seconds > honoured:
        headers.append(("x-should-retry", "false"))
    return headers


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


MAX_LIMIT = 2 ** 31 - 1


def _field(payload: Mapping[str, object], path: tuple[str, ...]) -> object:
    value: object = payload
    for name in path:
        if not isinstance(value, dict) or name not in value:
            return None
        value = value[name]
    return value


def _read_integer(payload: Mapping[str, object], path: tuple[str, ...], low: int,
                  high: int = MAX_LIMIT) -> int | None:
    """An integer field (None when absent or null), or ProxyError(400) naming it."""
    value = _field(payload, path)
    if value is None:
        return None
    name = ".".join(path)
    if type(value) is not int or not low <= value <= high:
        raise ProxyError(HTTPStatus.BAD_REQUEST, f"Invalid value for '{name}': expected an "
                         f"integer from {low} to {high}, got {json.dumps(value)[:40]}.",
                         param=name, code="invalid_value")
    return value


def _read_stream(payload: Mapping[str, object], default: bool) -> bool:
    value = payload.get("stream")
    if value is None:
        return default
    if type(value) is not bool:
        raise ProxyError(HTTPStatus.BAD_REQUEST, "Invalid type for 'stream': expected a boolean, "
                         f"got {json.dumps(value)[:40]}.", param="stream", code="invalid_type")
    return value


def _set_limit(payload: dict, path: tuple[str, ...], value: int) -> None:
    for name in path[:-1]:
        payload = payload.setdefault(name, {})
    payload[path[-1]] = value


class OpenAIShape:
    """The OpenAI API (chat/completions, completions, responses, embeddings): errors as
    {"error": {message, type, param, code}}, the limit as a chat.completion / text_completion
    (or their streams) or a 429 of type "requests", a broken stream's last event as
    `data: {"error": ...}` (which the openai SDK raises as APIError)."""

    name = "openai"
    stream_default = False
    honoured_retry_after = SDK_MAX_RETRY_AFTER
    #: output limits a request may set (llama.cpp's n_predict too: it wins over max_tokens)
    LIMITS: tuple[tuple[str, ...], ...] = (("max_tokens",), ("max_completion_tokens",),
                                           ("max_output_tokens",), ("n_predict",))
    #: the output limits some server of the API reads, by endpoint (capped in estimate mode):
    #: Ollama reads only max_tokens on chat and completions and only max_output_tokens on
    #: the Responses API, vLLM max_tokens and max_completion_tokens, llama.cpp n_predict too.
    #: An endpoint not named here (an EXTRA_ROUTES row's: EXTRA) gets CAPPED.
    CAPPED: tuple[tuple[str, ...], ...] = (("max_tokens",), ("max_completion_tokens",),
                                           ("n_predict",))
    CAPPED_BY_ENDPOINT: dict[str, tuple[tuple[str, ...], ...]] = {
        "responses": CAPPED + (("max_output_tokens",),)}
    #: the endpoints whose streams end with a usage chunk when asked (stream_options)
    USAGE_CHUNK_ENDPOINTS = frozenset({"chat", "completions"})
    #: the endpoints whose limit can be an assistant message, and its shape's name
    MESSAGE_ENDPOINTS = frozenset({"chat", "completions"})

    # -- what a request asks for ------------------------------------------------------------

    def read(self, payload: dict, route: Route, default_reserve: int) -> Ask:
        """Validate what the request asks for and the reserve it comes to: the largest output
        limit any field sets (else `default_reserve`), for each of its answers (n, or best_of,
        times the prompts of a prompt array). A limit of 0 (or n_predict's -1) sets none:
        Ollama's runner stops early only for a positive one."""
        stream = _read_stream(payload, self.stream_default)
        limits, largest = [], None
        for field in self.LIMITS:
            if field[0] not in payload:  # (most set none: no need to look closer)
                continue
            value = _read_integer(payload, field, -1 if field == ("n_predict",) else 0)
            if value is not None:
                limits.append(field)
                if value > 0:
                    largest = value if largest is None else max(largest, value)
        answers = 1 if "n" not in payload and "best_of" not in payload else max(
            _read_integer(payload, ("n",), 1, 128) or 1,
            _read_integer(payload, ("best_of",), 1, 128) or 1)
        prompt, prompts = payload.get("prompt"), 1
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompts = len(prompt)  # several prompts (strings or token lists): answers for each
        reserve = default_reserve if largest is None else largest
        return Ask(stream, reserve, answers * prompts, tuple(limits), prompts,
                   largest is not None)

    def capped(self, route: Route) -> tuple[tuple[str, ...], ...]:
        """Every output limit a server of this API may read on `route`."""
        return self.CAPPED_BY_ENDPOINT.get(route.endpoint, self.CAPPED)

    def cap(self, payload: dict, route: Route, ask: Ask) -> bool:
        """Estimate mode: write the reserve charged for into every output limit a server of
        the route's API may read, and every one the request set, whichever the request used:
        whatever the upstream reads, generation cannot exceed what was paid for. Whether the
        body changed."""
        changed = False
        for field in dict.fromkeys(self.capped(route) + ask.limits):
            value = _field(payload, field)
            if type(value) is not int or value != ask.reserve:
                _set_limit(payload, field, ask.reserve)
                changed = True
        return changed

    def ask_for_usage(self, payload: dict, route: Route) -> bool:
        """Usage mode, a stream on chat or completions: ask for the usage chunk on the client's
        behalf (stream_options.include_usage). Whether the body changed."""
        if route.endpoint not in self.USAGE_CHUNK_ENDPOINTS:
            return False
        options = payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            return False
        payload["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                     "include_usage": True}
        return True

    def ask_for_counts(self, payload: dict, route: Route) -> bool:
        """Usage mode, a stream on chat or completions: ask for the counts so far on every
        chunk (llama.cpp: timings_per_token, and return_progress, whose first chunk, sent
        before the prompt is evaluated, holds the prompt's count; vLLM:
        stream_options.continuous_usage_stats), so that a stream its client stops (a chat UI's
        Stop button) is charged what the server counted rather than the prompt's estimate
        (Open WebUI's tool definitions make that estimate thousands of tokens too many).
        Whether the body changed."""
        if route.endpoint not in self.USAGE_CHUNK_ENDPOINTS or "timings_per_token" in payload:
            return False
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            return False
        payload["timings_per_token"] = True
        payload["return_progress"] = True  # (llama.cpp: the prompt's count comes first)
        payload["stream_options"] = {**(options or {}), "continuous_usage_stats": True}
        return True

    def meter(self, route: Route, ask: Ask | None, payload: dict) -> Meter:
        stream = ask is not None and ask.stream
        options = payload.get("stream_options")
        asked = isinstance(options, dict) and options.get("include_usage") is True
        return UsageMeter(stream, expects_usage=not stream or asked)

    # -- how it answers ---------------------------------------------------------------------

    def error(self, err: ProxyError) -> Reply:
        return Reply(err.status, (("Content-Type", "application/json"), *err.headers), err.body())

    def limited(self, err: ProxyError, text: str, route: Route, payload: dict | None, *,
                as_message: bool, created: int) -> Reply:
        """The answer to a request the proxy will not forward for now (an empty bucket, too
        many at once): `err` as a 429, or, when `as_message` on an endpoint that has one, the
        assistant message `text` in the shape the request asked for, with err's headers."""
        if not as_message or payload is None or route.endpoint not in self.MESSAGE_ENDPOINTS:
            return self.error(err)
        model = payload.get("model")
        options = payload.get("stream_options")
        content_type, body = limit_completion(
            route.endpoint == "chat", model if isinstance(model, str) else "", text,
            stream=payload.get("stream") is True,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            created=created)
        return Reply(HTTPStatus.OK, (("Content-Type", content_type), *err.headers), body)

    def broken_stream_event(self, message: str) -> bytes:
        return b"data: " + error_body(message, "server_error", "upstream_error") + b"\n\n"


def _completion_id(chat: bool) -> str:
    prefix = "chatcmpl-" if chat else "cmpl-"
    return prefix + uuid.uuid4().hex[:24]


def _sse(events: Iterable[object]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + \
        b"data: [DONE]\n\n"


def _named_event(name: str, data: object) -> bytes:
    """One server-sent event with an `event:` line (the Anthropic and Responses streams)."""
    return b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(data).encode())


ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def limit_completion(chat: bool, model: str, text: str, *, stream: bool, include_usage: bool,
                     created: int) -> tuple[str, bytes]:
    """The assistant-message answer to a limited request, in the shape the client asked for:
    (content type, body) of a chat.completion (`chat`) / text_completion object or their SSE
    streams."""
    ident = _completion_id(chat)
    head = {"id": ident, "created": created, "model": model}
    if not stream:
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": "stop"}
            obj = {**head, "object": "chat.completion"}
        else:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}
            obj = {**head, "object": "text_completion"}
        body = {"id": ident, "object": obj["object"], "created": created, "model": model,
                "choices": [choice], "usage": dict(ZERO_USAGE)}
        return "application/json", json.dumps(body).encode()
    usage = {"usage": None} if include_usage else {}
    if chat:
        base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
        deltas = [({"role": "assistant", "content": ""}, None), ({"content": text}, None),
                  ({}, "stop")]
        events: list[object] = [
            {**base, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": f}],
             **usage} for d, f in deltas]
    else:
        base = {"id": ident, "object": "text_completion", "created": created, "model": model}
        pieces = [(text, None), ("", "stop")]
        events = [{**base, "choices": [{"text": t, "index": 0, "logprobs": None,
                                        "finish_reason": f}], **usage} for t, f in pieces]
    if include_usage:
        events.append({**base, "choices": [], "usage": dict(ZERO_USAGE)})
    return "text/event-stream; charset=utf-8", _sse(events)


def _response_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


#: A Responses API usage object with nothing counted (the limit answer generated nothing).
ZERO_RESPONSE_USAGE = {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0},
                       "output_tokens": 0, "output_tokens_details": {"reasoning_tokens": 0},
                       "total_tokens": 0}


def limit_response_events(model: str, text: str, created: int) -> list[tuple[str, dict]]:
    """The Responses API's events for an answer of one message holding `text`, named and
    numbered as a server sends them (response.created ... response.completed); the last one's
    `response` is the whole answer."""
    message_id = _response_id("msg_")
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {"id": message_id, "type": "message", "status": "completed", "role": "assistant",
            "content": [part]}
    response: dict[str, object] = {
        "id": _response_id("resp_"), "object": "response", "created_at": created,
        "status": "in_progress", "error": None, "incomplete_details": None,
        "instructions": None, "max_output_tokens": None, "model": model, "output": [],
        "parallel_tool_calls": True, "previous_response_id": None, "store": False,
        "temperature": None, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
        "tools": [], "top_p": None, "truncation": "disabled", "usage": None, "metadata": {}}
    done = {**response, "status": "completed", "output": [item],
            "usage": dict(ZERO_RESPONSE_USAGE)}
    at = {"item_id": message_id, "output_index": 0, "content_index": 0}
    events: list[tuple[str, dict]] = [
        ("response.created", {"response": response}),
        ("response.in_progress", {"response": response}),
        ("response.output_item.added", {"output_index": 0, "item": {
            **item, "status": "in_progress", "content": []}}),
        ("response.content_part.added", {**at, "part": {**part, "text": ""}}),
        ("response.output_text.delta", {**at, "delta": text, "logprobs": []}),
        ("response.output_text.done", {**at, "text": text, "logprobs": []}),
        ("response.content_part.done", {**at, "part": part}),
        ("response.output_item.done", {"output_index": 0, "item": item}),
        ("response.completed", {"response": done})]
    return [(name, {"type": name, "sequence_number": number, **data})
            for number, (name, data) in enumerate(events)]


class ResponsesShape(OpenAIShape):
    """OpenAI's Responses API (/v1/responses), the one Codex speaks: the limit as a `response`
    whose one message holds the text (or the event stream of such an answer). Its clients wait
    out a Retry-After silently (Codex printed "Reconnecting... 1/5" and waited an hour), so a
    429 whose wait is over a minute says `usage_limit_reached` with `resets_at`: Codex then
    stops at once and prints when to come back, and the openai SDK gets x-should-retry: false."""

    honoured_retry_after = ANTHROPIC_MAX_RETRY_AFTER

    MESSAGE_ENDPOINTS = frozenset({"responses"})

    def limited(self, err: ProxyError, text: str, route: Route, payload: dict | None, *,
                as_message: bool, created: int) -> Reply:
        if not as_message or payload is None or route.endpoint not in self.MESSAGE_ENDPOINTS:
            return self.error(self.give_up(err, created))
        model = payload.get("model")
        events = limit_response_events(model if isinstance(model, str) else "", text, created)
        if payload.get("stream") is not True:
            return Reply(HTTPStatus.OK, (("Content-Type", "application/json"), *err.headers),
                         json.dumps(events[-1][1]["response"]).encode())
        body = b"".join(_named_event(name, data) for name, data in events)
        return Reply(HTTPStatus.OK, (("Content-Type", "text/event-stream; charset=utf-8"),
                                     *err.headers), body)

    def give_up(self, err: ProxyError, created: int) -> ProxyError:
        """A limit's 429 whose wait is longer than clients should sit through, said as
        usage_limit_reached (Codex's word for a limit it must not retry) with when it resets;
        any other error as it is."""
        if err.wait is None or err.wait <= self.honoured_retry_after:
            return err
        resets = created + math.ceil(err.wait)
        return _ResetError(err, resets)


class _ResetError(ProxyError):
    """A 429 that names when the limit resets (resets_at, Unix seconds; resets_in_seconds)."""

    def __init__(self, err: ProxyError, resets: int) -> None:
        super().__init__(err.status, err.message, type="usage_limit_reached", code=err.code,
                         headers=err.headers, wait=err.wait)
        self.resets = resets

    def body(self) -> bytes:
        assert self.wait is not None
        return json.dumps({"error": {"message": self.message, "type": self.type,
                                     "param": None, "code": self.code,
                                     "resets_at": self.resets,
                                     "resets_in_seconds": math.ceil(self.wait)}}).encode()


#: The Anthropic error type of each status the proxy answers with (docs.claude.com/en/api/errors).
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 502: "api_error",
    503: "overloaded_error", 504: "timeout_error", 508: "api_error", 529: "overloaded_error",
}




class AnthropicShape(OpenAIShape):
    """The Anthropic Messages API (/v1/messages): errors as {"type": "error", "error": {type,
    message}}, the limit as a `message` (or its event stream, every event named), a broken
    stream's last event as `event: error`. Its SDKs and Claude Code honour a retry-after of at
    most 60 s."""

    name = "anthropic"
    honoured_retry_after = ANTHROPIC_MAX_RETRY_AFTER
    LIMITS = CAPPED = (("max_tokens",),)
    CAPPED_BY_ENDPOINT = {}
    USAGE_CHUNK_ENDPOINTS = frozenset()  # its answers always carry usage
    MESSAGE_ENDPOINTS = frozenset({"messages"})
    #: the endpoints whose answers carry usage (count_tokens's and an EXTRA row's do not)
    COUNTED_ENDPOINTS = frozenset({"messages"})

    def read(self, payload: dict, route: Route, default_reserve: int) -> Ask:
        stream = _read_stream(payload, False)
        value = _read_integer(payload, ("max_tokens",), 0)
        if value is None:  # (the API requires it; local servers do not insist)
            return Ask(stream, default_reserve)
        # 0 sets no limit to Ollama, whose Anthropic layer passes it on as num_predict
        return Ask(stream, value or default_reserve, 1, (("max_tokens",),), 1, value > 0)

    def ask_for_usage(self, payload: dict, route: Route) -> bool:
        return False  # its answers always carry usage

    def meter(self, route: Route, ask: Ask | None, payload: dict) -> Meter:
        return AnthropicMeter(ask is not None and ask.stream,
                              expects_usage=route.endpoint in self.COUNTED_ENDPOINTS)

    def error(self, err: ProxyError) -> Reply:
        kind = ANTHROPIC_ERROR_TYPES.get(err.status, "api_error" if err.status >= 500
                                         else "invalid_request_error")
        body = {"type": "error", "error": {"type": kind, "message": err.message}}
        return Reply(err.status, (("Content-Type", "application/json"), *err.headers),
                     json.dumps(body).encode())

    def limited(self, err: ProxyError, text: str, route: Route, payload: dict | None, *,
                as_message: bool, created: int) -> Reply:
        if not as_message or payload is None or route.endpoint not in self.MESSAGE_ENDPOINTS:
            return self.error(err)
        model = payload.get("model") if isinstance(payload.get("model"), str) else ""
        message = {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message",
                   "role": "assistant", "model": model,
                   "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                   "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
        if payload.get("stream") is not True:
            return Reply(HTTPStatus.OK, (("Content-Type", "application/json"), *err.headers),
                         json.dumps(message).encode())
        start = {**message, "content": [], "stop_reason": None}
        body = b"".join((
            _named_event("message_start", {"type": "message_start", "message": start}),
            _named_event("content_block_start", {"type": "content_block_start", "index": 0,
                                                     "content_block": {"type": "text",
                                                                       "text": ""}}),
            _named_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                     "delta": {"type": "text_delta",
                                                               "text": text}}),
            _named_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _named_event("message_delta", {"type": "message_delta",
                                               "delta": {"stop_reason": "end_turn",
                                                         "stop_sequence": None},
                                               "usage": {"output_tokens": 0}}),
            _named_event("message_stop", {"type": "message_stop"})))
        return Reply(HTTPStatus.OK, (("Content-Type", "text/event-stream; charset=utf-8"),
                                     *err.headers), body)

    def broken_stream_event(self, message: str) -> bytes:
        return _named_event("error", {"type": "error", "error": {"type": "api_error",
                                                                     "message": message}})


class OllamaShape(OpenAIShape):
    """Ollama's native API (/api/chat, /api/generate, ...): `stream` defaults to true, streams
    are lines of JSON (application/x-ndjson), errors are {"error": "..."}, the limit is a normal
    answer with "done": true (one line when streamed)."""

    name = "ollama"
    stream_default = True
    LIMITS = CAPPED = (("options", "num_predict"),)
    CAPPED_BY_ENDPOINT = {}
    USAGE_CHUNK_ENDPOINTS = frozenset()  # the last line always carries the counts
    MESSAGE_ENDPOINTS = frozenset({"ollama_chat", "ollama_generate"})
    #: the endpoints whose answers carry no counts (the old embeddings route); every other,
    #: an EXTRA row's too, ends with prompt_eval_count and eval_count
    UNCOUNTED_ENDPOINTS = frozenset({"ollama_embeddings"})

    def read(self, payload: dict, route: Route, default_reserve: int) -> Ask:
        stream = _read_stream(payload, True)
        options = payload.get("options")
        if options is not None and not isinstance(options, dict):
            raise ProxyError(HTTPStatus.BAD_REQUEST, "Invalid type for 'options': expected an "
                             "object.", param="options", code="invalid_type")
        value = _read_integer(payload, ("options", "num_predict"), -2)
        if value is None:
            return Ask(stream, default_reserve)
        # 0 and -1 (until it stops) and -2 (fill the context) set no limit of their own:
        # Ollama's runner stops early only for a positive num_predict
        return Ask(stream, value if value > 0 else default_reserve, 1,
                   (("options", "num_predict"),), 1, value > 0)

    def ask_for_usage(self, payload: dict, route: Route) -> bool:
        return False  # the last line always carries the counts

    def meter(self, route: Route, ask: Ask | None, payload: dict) -> Meter:
        stream = ask is not None and ask.stream
        return OllamaMeter(stream,
                           expects_usage=route.endpoint not in self.UNCOUNTED_ENDPOINTS)

    def error(self, err: ProxyError) -> Reply:
        return Reply(err.status, (("Content-Type", "application/json; charset=utf-8"),
                                  *err.headers), json.dumps({"error": err.message}).encode())

    def limited(self, err: ProxyError, text: str, route: Route, payload: dict | None, *,
                as_message: bool, created: int) -> Reply:
        if not as_message or payload is None or route.endpoint not in self.MESSAGE_ENDPOINTS:
            return self.error(err)
        model = payload.get("model") if isinstance(payload.get("model"), str) else ""
        answer: dict[str, object] = {
            "model": model, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                        time.gmtime(created))}
        if route.endpoint == "ollama_chat":
            answer["message"] = {"role": "assistant", "content": text}
        else:
            answer["response"] = text
        answer.update({"done": True, "done_reason": "stop", "prompt_eval_count": 0,
                       "eval_count": 0})
        if payload.get("stream") is not False:
            return Reply(HTTPStatus.OK, (("Content-Type", "application/x-ndjson"),
                                         *err.headers), json.dumps(answer).encode() + b"\n")
        return Reply(HTTPStatus.OK, (("Content-Type", "application/json; charset=utf-8"),
                                     *err.headers), json.dumps(answer).encode())

    def broken_stream_event(self, message: str) -> bytes:
        return json.dumps({"error": message}).encode() + b"\n"


OPENAI, RESPONSES = OpenAIShape(), ResponsesShape()
ANTHROPIC, OLLAMA = AnthropicShape(), OllamaShape()


# ################################################################### HTTP messages ####

_NO_TOKENS: frozenset[str] = frozenset()
_FIELD_LINE = ": ".join  # (a field's line from its (name, value), made by map: no loop)


class Headers:
    """Message headers: looked up without regard to case, repeated names and order kept.

    The part of email.message.Message that http.server and http.client use (get, get_all,
    items), without the email package's parser, which is a large share of the cost of a request.
    """

    __slots__ = ("_items", "_first", "_all", "_tokens", "repeated")

    def __init__(self, items: list[tuple[str, str]]) -> None:
        # (a loop, not map and zip: for the handful of fields of a block it is faster)
        self._items = items
        first: dict[str, str] = {}
        for name, value in items:
            first[name.lower()] = value  # (the last one wins here; see below)
        #: every value of each name, made only when a name repeats (None: none does)
        self._all: dict[str, list[str]] | None = None
        #: whether a name appears more than once
        self.repeated = len(first) != len(items)
        if self.repeated:
            first = {}
            every: dict[str, list[str]] = {}
            for name, value in items:
                key = name.lower()
                first.setdefault(key, value)
                every.setdefault(key, []).append(value)
            self._all = every
        #: each name's first value
        self._first = first
        self._tokens: frozenset[str] | None = None  # (see connection_tokens: read once)

    @typing.overload
    def get(self, name: str) -> str | None: ...

    @typing.overload
    def get(self, name: str, default: str) -> str: ...

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._first.get(name.lower(), default)

    @typing.overload
    def get_all(self, name: str) -> list[str] | None: ...

    @typing.overload
    def get_all(self, name: str, default: _T) -> list[str] | _T: ...

    def get_all(self, name: str, default: object = None) -> object:
        key = name.lower()
        if self._all is not None:
            values = self._all.get(key)
            return list(values) if values else default
        value = self._first.get(key)
        return default if value is None else [value]

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def without(self, names: frozenset[str]) -> list[tuple[str, str]]:
        """The fields (in order) whose lower-case name is not in `names`."""
        return [item for item in self._items if item[0].lower() not in names]

    def connection_tokens(self) -> frozenset[str]:
        """The options of the Connection fields, lower case (the names of hop-by-hop fields),
        read once."""
        tokens = self._tokens
        if tokens is None:
            values = self.get_all("Connection")
            tokens = self._tokens = _NO_TOKENS if not values else frozenset(
                t.strip().lower() for v in values for t in v.split(","))
        return tokens

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._first

    def __len__(self) -> int:
        return len(self._items)


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 section 5.6.2
_FORBIDDEN_IN_VALUE = re.compile(rb"[\x00\r\n]")
#: one whole line of a block (from a line's start, to its CRLF): a field's name, and its value
#: without the blanks before it; _TRIMMED_FIELD without those after it too (slower: it
#: backtracks, so it serves only a block with a blank at a line's end)
_HEADER_FIELD = re.compile(r"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00\r\n]*)\r\n",
                           re.MULTILINE)
_TRIMMED_FIELD = re.compile(
    r"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[^\x00\r\n]*[^\x00\r\n \t])?)[ \t]*\r\n",
    re.MULTILINE)


class HeaderError(Exception):
    """Headers that cannot be accepted; `status` says why (400 malformed, 431 too large)."""

    def __init__(self, status: HTTPStatus) -> None:
        super().__init__(status.phrase)
        self.status = status


def read_headers(fp: typing.BinaryIO | io.BufferedIOBase,
                 max_bytes: int = MAX_UPSTREAM_HEAD_BYTES) -> Headers:
    """Read header lines up to the empty line that ends them (RFC 9112 section 5).

    Raises HeaderError(431) past `max_bytes` or MAX_HEADER_LINES, HeaderError(400) for a line
    without a colon, whitespace before the colon or obsolete line folding (ambiguous framing is
    how requests are smuggled), and EOFError when the stream ends first.
    """
    fast = _read_header_block(fp, max_bytes)
    if fast is not None:
        return fast
    items: list[tuple[str, str]] = []
    budget = max_bytes
    readline = fp.readline
    while True:
        line = readline(budget + 1)
        if not line:
            raise EOFError("headers cut off")
        budget -= len(line)
        if budget < 0 or len(items) >= MAX_HEADER_LINES:
            raise HeaderError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        if line in (b"\r\n", b"\n"):
            return Headers(items)
        if not line.endswith(b"\n"):
            raise EOFError("headers cut off")
        name, colon, value = line[:-2 if line.endswith(b"\r\n") else -1].partition(b":")
        value = value.strip(b" \t")  # (a CR or NUL left in it is refused below)
        if not colon or not name or name[-1:] in (b" ", b"\t") or line[:1] in (b" ", b"\t") \
                or not _TOKEN.fullmatch(name) or _FORBIDDEN_IN_VALUE.search(value):
            raise HeaderError(HTTPStatus.BAD_REQUEST)
        items.append((name.decode("latin-1"), value.decode("latin-1")))


def _read_header_block(fp: typing.BinaryIO | io.BufferedIOBase,
                       max_bytes: int) -> Headers | None:
    """The fast path of read_headers: a well-formed block already in fp's buffer, parsed with
    one regular expression instead of line by line. None (nothing consumed) for anything else,
    which read_headers then reads line by line and accepts or refuses as the rules say."""
    peek = getattr(fp, "peek", None)
    if peek is None:
        return None
    data = peek(max_bytes)
    end = data.find(b"\r\n\r\n", 0, max_bytes)
    if data[:2] == b"\r\n":
        end = -2
    elif end < 0:
        return None
    block = data[:end + 2].decode("latin-1")
    pattern = _TRIMMED_FIELD if " \r\n" in block or "\t\r\n" in block else _HEADER_FIELD
    items = pattern.findall(block)
    # Each match is one whole line (it starts where a line does and ends at its CRLF), so as
    # many matches as line feeds means every line matched: the block is well formed.
    if len(items) != block.count("\n") or len(items) >= MAX_HEADER_LINES \
            or end + 4 > max_bytes:
        return None  # (the slow path reads it, and accepts it or raises the error)
    fp.read(end + 4)
    return Headers(items)


#: Refused in a decoded path: control characters, whitespace, a backslash, a '%' left after
#: decoding (a path encoded twice), ';' parameters. A route is forwarded in its one canonical
#: spelling or not at all.
_BAD_PATH_CHAR = re.compile(r"[\x00-\x20\x7f-\x9f\\%;]|\s")
_BAD_QUERY_CHAR = re.compile(r"[\x00-\x20\x7f]")
#: A path normalize_path leaves as it is: segments that are neither empty nor '.' or '..',
#: of characters that decode to themselves and that no rule above refuses; no query.
_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9_~-][A-Za-z0-9_.~:@!$&'()*+,=-]*)+")


def normalize_path(target: str) -> tuple[str, str]:
    """Split a request target into (normalised path, raw query).

    The path is percent-decoded once, empty and '.' segments are dropped, '..' segments are
    resolved (never above the root) and a trailing slash is removed. Routing, charging and
    forwarding all use this one result, so no other spelling reaches a route uncharged.
    Raises ProxyError(400) for targets that cannot be a path, and for paths that are not
    plainly one: control characters or whitespace, a backslash, ';' parameters, or a '%' left
    after decoding.
    """
    if _PLAIN_PATH.fullmatch(target):
        return target, ""  # (the usual target: already its one spelling)
    if target.startswith(("http://", "https://")):  # absolute-form (RFC 9112 section 3.2.2)
        target = urllib.parse.urlsplit(target)._replace(scheme="", netloc="").geturl() or "/"
    path, _, query = target.partition("?")
    query = query.partition("#")[0]
    path = path.partition("#")[0]
    if not path.startswith("/"):
        raise ProxyError(HTTPStatus.BAD_REQUEST, "Invalid request target.")
    try:
        decoded = urllib.parse.unquote(path, errors="strict")
    except UnicodeDecodeError:
        raise ProxyError(HTTPStatus.BAD_REQUEST, "Invalid percent-encoding in path.") from None
    if _BAD_PATH_CHAR.search(decoded) or _BAD_QUERY_CHAR.search(query):
        raise ProxyError(HTTPStatus.BAD_REQUEST, "Invalid character in request target.")
    segments: list[str] = []
    for segment in decoded.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment and segment != ".":
            segments.append(segment)
    return "/" + "/".join(segments), query


_DECODE_JSON = json.JSONDecoder().decode


def json_object(data: bytes) -> dict | None:
    """The JSON object in UTF-8 `data`, or None. (json.loads less its checks of what it is
    given: a third of the cost of reading a stream's event.)"""
    try:
        obj = _DECODE_JSON(data.decode("utf-8", "surrogatepass"))  # (as json.loads(bytes))
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def json_or_none(body: bytes) -> object:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


# The upstream must read the body the proxy read. Everything that keeps them from reading it
# differently lives here: the proxy forwards the client's bytes (or its own re-encoding of what
# it read), and Go's encoding/json (Ollama) matches an object's keys to a struct's fields
# without regard to case, with Unicode simple folding (U+212A KELVIN SIGN is "k", U+017F LONG S
# is "s"), the last match winning and two maps merging. So a key that appears twice in an
# object, or that only such matching takes for a field the proxy reads, is refused: what the
# proxy priced, limited and routed on is then the only reading there is.

#: Every field the proxy reads from a request body, by the object it is in ("" the body
#: itself, else the member of that name): what it prices (the prompt, the output limits, the
#: answers), meters (stream, stream_options), routes and polices (model), for every API. The
#: fields and their case variants are the same for all: one table for every door.
READ_FIELDS: dict[str, frozenset[str]] = {
    "": frozenset({"model", "stream", "stream_options", "options", "max_tokens",
                   "max_completion_tokens", "max_output_tokens", "n_predict", "n", "best_of",
                   "prompt", "input", "messages", "system", "instructions"}),
    "options": frozenset({"num_predict"}),
    "stream_options": frozenset({"include_usage"}),
}
_TOP_FIELDS = READ_FIELDS[""]
#: The non-ASCII letters whose Unicode simple case folding is an ASCII letter (CaseFolding.txt,
#: status C and S); the dotted and dotless i fold only to themselves in Go.
_SIMPLE_FOLDS_TO_ASCII = str.maketrans({"\u212a": "k", "\u017f": "s"})


def folded_key(key: str) -> str:
    """What Go's encoding/json compares when it matches `key` with an (ASCII) field name."""
    return key.lower() if key.isascii() else key.translate(_SIMPLE_FOLDS_TO_ASCII).lower()


def _ambiguous_key(message: str, key: str) -> ProxyError:
    return ProxyError(HTTPStatus.BAD_REQUEST, message, param=key[:60], code="ambiguous_key")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """An object of the body (json's object_pairs_hook): a key sent twice is refused."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        key = _first_repeated(k for k, _ in pairs)
        raise _ambiguous_key(f"The key {json.dumps(key)[:60]} appears twice in an object of "
                             "the request body; send it once.", key)
    return obj


def _first_repeated(keys: Iterable[str]) -> str:
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            return key
        seen.add(key)
    raise ValueError("no key is repeated")


def check_read_keys(payload: dict) -> None:
    """ProxyError(400) for a key that is not a field the proxy reads but that a server
    matching keys case-insensitively (Ollama) would take for one ("MAX_TOKENS", "Model",
    "max_to\u212aens"): it would then read a value the proxy never saw."""
    if _TOP_FIELDS.issuperset(payload) and "options" not in payload \
            and "stream_options" not in payload:
        return  # (the usual body: only fields the proxy reads, nothing nested to look at)
    for where, fields in READ_FIELDS.items():
        obj = payload.get(where) if where else payload
        if type(obj) is not dict:
            continue
        for key in obj:
            if key not in fields and folded_key(key) in fields:
                name = f"{where}.{folded_key(key)}" if where else folded_key(key)
                raise _ambiguous_key(
                    f"The key {json.dumps(key)[:60]} differs from '{name}' only by case; "
                    f"servers that match keys without regard to case read it as '{name}'. "
                    f"Send '{name}' once.", key)


_DECODE_UNIQUE = json.JSONDecoder(object_pairs_hook=_unique_keys).decode


def _read_unique(body: bytes) -> object:
    """json.loads(body), every object's keys unique (else ProxyError(400))."""
    # (an object's '{' first, and no NUL after it: UTF-8, with no BOM, as json would find)
    encoding = "utf-8" if body[:1] == b"{" and body[1:2] != b"\0" \
        else json.detect_encoding(body)
    return _DECODE_UNIQUE(body.decode(encoding, "surrogatepass"))


def parse_json_object(body: bytes) -> dict:
    """The body of a charged request: a JSON object whose every reading is the proxy's (no
    key twice, no case variant of a field it reads), or ProxyError(400)."""
    try:
        value = _read_unique(body)
    except RecursionError:
        raise ProxyError(HTTPStatus.BAD_REQUEST, "Request body is nested too deeply.") from None
    except (UnicodeDecodeError, ValueError):
        raise ProxyError(HTTPStatus.BAD_REQUEST,
                         "We could not parse the JSON body of your request. The body must be "
                         "valid JSON (UTF-8).") from None
    if not isinstance(value, dict):
        raise ProxyError(HTTPStatus.BAD_REQUEST, "The request body must be a JSON object.")
    check_read_keys(value)
    return value


def policed_json(body: bytes) -> object:
    """The body of an uncharged request whose model a key may not choose freely, read as a
    charged one is (ProxyError(400) for an ambiguous key), or None when it is not JSON (then
    it names no allowed model)."""
    try:
        value = _read_unique(body)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, dict):
        check_read_keys(value)
    return value


_ASCII_DIGITS = re.compile(r"[0-9]+")  # str.isdigit() also takes "²" and other Unicode digits


def request_framing(headers: Headers) -> int | None:
    """How a request's body is delimited: its Content-Length, or None for chunked. Checked for
    every request before it is routed, because a body the proxy does not read must not become
    the next request: ambiguous or invalid framing is ProxyError(400) and closes the connection
    (request smuggling, RFC 9112 section 6.3)."""
    if not headers.repeated and "transfer-encoding" not in headers:  # (the usual: one length)
        return content_length(headers.get("content-length", "0").strip())
    lengths = [v.strip() for v in headers.get_all("Content-Length") or []]
    encoding = ",".join(headers.get_all("Transfer-Encoding") or []).strip().lower()
    if encoding:
        if lengths:
            raise ProxyError(HTTPStatus.BAD_REQUEST, "Both Content-Length and "
                             "Transfer-Encoding were sent.", close=True)
        if encoding != "chunked":
            raise ProxyError(HTTPStatus.BAD_REQUEST, "Unsupported Transfer-Encoding.",
                             close=True)
        return None
    if len(lengths) > 1:  # duplicate or conflicting: which one the next hop uses is unknown
        raise ProxyError(HTTPStatus.BAD_REQUEST, "Conflicting Content-Length headers.",
                         close=True)
    return content_length(lengths[0] if lengths else "0")


def content_length(raw: str) -> int:
    """A request's one Content-Length value (stripped), or ProxyError(400)."""
    if not _ASCII_DIGITS.fullmatch(raw):
        raise ProxyError(HTTPStatus.BAD_REQUEST, "Invalid Content-Length.", close=True)
    return int(raw)


class CorsPolicy:
    """Which web pages may call the proxy, decided by the server, not left to the browser.

    A request without an Origin header (curl, SDKs, server-side clients) is unaffected. One
    with an Origin is refused (403, in its API's shape, before anything is charged or
    forwarded) unless CORS_ORIGINS allows that origin, or it is the proxy's own: a simple
    cross-origin POST from a page gets nothing. CORS_ORIGINS defaults to * when keys are
    required (the key is the protection) and to none in open mode (as Ollama's OLLAMA_ORIGINS
    does), so a page the operator opens cannot use a proxy kept to this machine. Admin routes
    carry no CORS headers and refuse every Origin (see the handler).
    """

    def __init__(self, origins: tuple[str, ...], keys_required: bool) -> None:
        origins = origins or (("*",) if keys_required else ("none",))
        self.any = origins == ("*",)
        self.allowed = frozenset() if origins == ("none",) or self.any else frozenset(origins)
        self._any_lines = ("Access-Control-Allow-Origin: *\r\n"
                           f"Access-Control-Expose-Headers: {CORS_EXPOSED}")

    def lines(self, origin: str | None, host: str | None) -> str:
        """The CORS header lines of the answer to a request from `origin` (empty: none), or
        ProxyError(403) for an origin that may not call."""
        if origin is None:
            return self._any_lines if self.any else ""
        if self.any:
            return self._any_lines
        if origin.rstrip("/").lower() in self.allowed or (
                host is not None and origin.lower() in (f"http://{host}".lower(),
                                                        f"https://{host}".lower())):
            return (f"Access-Control-Allow-Origin: {header_safe(origin)}\r\n"
                    f"Access-Control-Expose-Headers: {CORS_EXPOSED}\r\nVary: Origin")
        raise ProxyError(HTTPStatus.FORBIDDEN, "Requests from this web origin are not allowed "
                         "(CORS_ORIGINS).", type="permission_error", code="origin_not_allowed")


def is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "::ffff:127.0.0.1")


def header_safe(value: str) -> str:
    return "".join(ch for ch in value if " " <= ch < "\x7f")


_PLAIN_LOG_TEXT = re.compile(r'[ !#-\[\]-~]*')  # printable ASCII but for '"' and '\\'


def loggable(text: str) -> str:
    """Escape control and non-ASCII characters, quotes and backslashes before anything reaches
    the log (as nginx does: a quote in a path must not end the field and forge a line)."""
    if _PLAIN_LOG_TEXT.fullmatch(text):
        return text
    return "".join(ch if " " <= ch < "\x7f" and ch not in '"\\' else f"\\x{ord(ch):02x}"
                   for ch in text)


# ########################################################################## routes ####

@dataclass(frozen=True)
class Route:
    """What one (method, normalised path) is: a row of the route table.

    `kind` says what happens to it (GENERATE, EMBED, FREE, MANAGE: forwarded; LOCAL, ADMIN:
    answered by the proxy), `api` how it speaks (what its requests may ask for, its errors, its
    limit answer, its meter), `answer` which local answer serves it (for a forwarded route: one
    that may answer instead, such as the BASE_MODEL model list). `message_limit`: its limit can
    be an assistant message. `upstream`: forwarded under BASE_API_URL in place of /v1 ("v1"),
    or under the upstream's root (NATIVE_API_URL, "root"). `private`: its local answer depends
    on the caller's key (every ADMIN row, and the caller's own usage), so no cache may keep
    it for someone else (Cache-Control: no-store). A `path` ending in "/" covers everything
    below it. `endpoint`: which of its API's endpoints it is (chat, completions, responses,
    messages, ollama_chat, ...; EXTRA for an EXTRA_ROUTES row), what the API shapes read and
    cap, meter and answer by, never the path. `asset`: the page asset a page route serves.
    """
    path: str
    methods: frozenset[str]
    kind: str
    api: OpenAIShape = OPENAI
    answer: str = ""
    message_limit: bool = False
    upstream: str = "v1"
    private: bool = False
    endpoint: str = ""
    asset: str = ""

    @property
    def label(self) -> str:
        """How metrics name the route: its path, or "other" for a row that covers many."""
        return "other" if self.path.endswith("/") else self.path

    def charges(self, policy: KeyPolicy) -> bool:
        """Whether a request on this route is charged to a key with this policy."""
        return self.kind == GENERATE or (self.kind == EMBED
                                         and policy.token_cost_mode != "request")


#: The endpoint of every EXTRA_ROUTES row: the shapes treat it as an endpoint they know
#: nothing of (no limit message, no usage chunk asked for, the API's usual output limits).
EXTRA = "extra"
#: The prefix of the paths forwarded under BASE_API_URL (the rest go to the upstream's root).
V1_PREFIX = "/v1"
#: Where a server lists its models (read by the router of several servers).
MODEL_LIST_PATH = "/v1/models"


def _row(spec: str, kind: str, api: OpenAIShape = OPENAI, answer: str = "",
         message_limit: bool = False, private: bool = False, endpoint: str = "",
         asset: str = "") -> Route:
    """A row from 'METHOD[,METHOD] /path'."""
    methods, path = spec.split()
    upstream = "v1" if path == V1_PREFIX or path.startswith(V1_PREFIX + "/") else "root"
    return Route(path, frozenset(methods.split(",")), kind, api, answer, message_limit,
                 upstream, private or kind == ADMIN, endpoint, asset)


#: What each route is. Anything not found here is answered 404 and never forwarded, and a
#: method not listed for a route's path gets 405. EXTRA_ROUTES adds rows.
DEFAULT_ROUTES = (
    # OpenAI
    _row("POST /v1/chat/completions", GENERATE, message_limit=True, endpoint="chat"),
    _row("POST /v1/completions", GENERATE, message_limit=True, endpoint="completions"),
    _row("POST /v1/responses", GENERATE, RESPONSES, message_limit=True, endpoint="responses"),
    _row("POST /v1/embeddings", EMBED, endpoint="embeddings"),
    _row("POST /v1/rerank", EMBED, endpoint="rerank"),
    _row("GET /v1/models", FREE, answer="models", endpoint="models"),
    _row("GET /v1/models/", FREE, answer="model", endpoint="model"),
    # Anthropic Messages
    _row("POST /v1/messages", GENERATE, ANTHROPIC, message_limit=True, endpoint="messages"),
    _row("POST /v1/messages/count_tokens", FREE, ANTHROPIC, endpoint="count_tokens"),
    # Ollama's native API, at the upstream's root
    _row("POST /api/chat", GENERATE, OLLAMA, message_limit=True, endpoint="ollama_chat"),
    _row("POST /api/generate", GENERATE, OLLAMA, message_limit=True,
         endpoint="ollama_generate"),
    _row("POST /api/embed", EMBED, OLLAMA, endpoint="ollama_embed"),
    _row("POST /api/embeddings", EMBED, OLLAMA, endpoint="ollama_embeddings"),
    _row("GET /api/tags", FREE, OLLAMA, answer="tags", endpoint="ollama_tags"),
    _row("POST /api/show", FREE, OLLAMA, endpoint="ollama_show"),
    _row("GET /api/version", FREE, OLLAMA, endpoint="ollama_version"),
    _row("GET /api/ps", FREE, OLLAMA, answer="ps", endpoint="ollama_ps"),
    _row("POST /api/pull", MANAGE, OLLAMA, endpoint="ollama_pull"),
    _row("POST /api/push", MANAGE, OLLAMA, endpoint="ollama_push"),
    _row("POST /api/create", MANAGE, OLLAMA, endpoint="ollama_create"),
    _row("POST /api/copy", MANAGE, OLLAMA, endpoint="ollama_copy"),
    _row("DELETE /api/delete", MANAGE, OLLAMA, endpoint="ollama_delete"),
    _row("HEAD,POST /api/blobs/", MANAGE, OLLAMA, endpoint="ollama_blobs"),
    # answered by the proxy
    _row("GET /health", LOCAL, answer="health", private=True),
    _row("GET /metrics", ADMIN, answer="metrics"),
    _row("GET /admin/keys", ADMIN, answer="admin_keys"),
    _row("POST /admin/keys", ADMIN, answer="admin_key_create"),
    _row("PATCH,DELETE,POST /admin/keys/", ADMIN, answer="admin_key"),
    _row("GET /admin/audit", ADMIN, answer="admin_audit"),
    _row("GET /admin/usage", ADMIN, answer="admin_usage"),
    _row("GET /v1/usage", LOCAL, answer="usage", private=True),
    _row("GET /admin/overview", ADMIN, answer="overview"),
    _row("GET /admin", LOCAL, answer="page", asset="admin.html"),
    _row("GET /usage", LOCAL, answer="page", asset="usage.html"),
    _row("GET /ui/style.css", LOCAL, answer="page", asset="style.css"),
    _row("GET /ui/pages.js", LOCAL, answer="page", asset="pages.js"),
    _row("GET /ui/admin.js", LOCAL, answer="page", asset="admin.js"),
    _row("GET /ui/usage.js", LOCAL, answer="page", asset="usage.js"),
    _row("GET /favicon.ico", LOCAL, answer="no_icon"),
    _row("OPTIONS /", LOCAL, answer="preflight"),
)


def extra_route(method: str, path: str, kind: str) -> Route:
    """A row of EXTRA_ROUTES: its API is the one its path belongs to, its endpoint EXTRA."""
    covering = path.endswith("/*")
    path = path[:-1] if covering else path
    return _row(f"{method} {path}", kind, api_of_path(path), endpoint=EXTRA)


#: The API of the paths below each prefix (the first that matches), for EXTRA_ROUTES rows
#: and for answering a request no route matched (a 404 or 405 in the shape its client
#: expects); any other path speaks OpenAI's.
API_PREFIXES: tuple[tuple[str, OpenAIShape], ...] = (
    ("/api/", OLLAMA), ("/v1/messages", ANTHROPIC))


def api_of_path(path: str) -> OpenAIShape:
    """The API a path speaks (API_PREFIXES)."""
    for prefix, api in API_PREFIXES:
        if path.startswith(prefix) or path == prefix.rstrip("/"):
            return api
    return OPENAI


class RouteTable:
    """The routes, looked up by (method, normalised path): an exact row first, then the rows
    that cover the path, the longest first. find() is the only place paths are compared."""

    def __init__(self, rows: Iterable[Route]) -> None:
        self.rows = tuple(rows)
        self._exact: dict[tuple[str, str], Route] = {}
        self._methods: dict[str, set[str]] = {}
        self._covering: list[Route] = []
        for row in self.rows:
            if row.path.endswith("/"):
                self._covering.append(row)
            else:
                self._methods.setdefault(row.path, set()).update(row.methods)
                for method in row.methods:
                    self._exact[(method, row.path)] = row
        self._covering.sort(key=lambda row: -len(row.path))

    def find(self, method: str, path: str) -> Route:
        """The route of (method, path), or ProxyError: 404 for a path no row knows, 405 (with
        Allow) for a method no row of that path lists. OPTIONS (CORS preflight) is answered on
        every path."""
        row = self._exact.get((method, path))
        if row is not None:
            return row
        allowed = set(self._methods.get(path, ()))
        for row in self._covering:
            if path.startswith(row.path) and len(path) > len(row.path) or row.path == "/":
                if method in row.methods:
                    return row
                if row.path != "/":
                    allowed.update(row.methods)
        if allowed:
            raise ProxyError(HTTPStatus.METHOD_NOT_ALLOWED, f"Method {method} is not allowed "
                             f"for {path}.", code="method_not_allowed",
                             headers=[("Allow", ", ".join(sorted(allowed | {"OPTIONS"})))])
        raise ProxyError(HTTPStatus.NOT_FOUND, f"Invalid URL ({method} {path}).",
                         code="unknown_url")

    def overlap(self, method: str, path: str) -> Route | None:
        """The row that a new row for (method, path) would take requests from (a path ending
        in "/" covering what is below it), or None when it adds only what no row serves. A new
        exact row replaces a row of the same path or one covering it; a new covering row wins
        over the shorter covering rows for what is below it. (Exact rows are found before any
        covering row, so a covering row never takes from them.)"""
        covering = path.endswith("/")
        if not covering and (method, path) in self._exact:
            return self._exact[(method, path)]
        for row in self._covering:
            if method in row.methods and path.startswith(row.path) \
                    and (covering or len(path) > len(row.path)):
                return row
        return None


#: The built-in routes alone: a row of EXTRA_ROUTES may not take requests from any of them.
BUILT_IN_ROUTES = RouteTable(DEFAULT_ROUTES)


# ######################################################################## exchange ####

class Exchange:
    """One request, from its request line to its access-log line: what it is and how it went.

    The handler makes one per request and passes it along; the charge, the forwarder, the relay
    and the access log read and write it. Nothing else remembers the request.
    """

    __slots__ = ("method", "path", "query", "client", "started", "route", "api", "label",
                 "bucket_key", "policy", "cors", "length", "expects_continue", "body", "body_read",
                 "payload", "ask", "charge", "ending", "status", "note", "head_sent", "tail",
                 "model", "server", "user", "counts_asked")

    def __init__(self, method: str, target: str, client: str) -> None:
        self.method = method
        self.path = target.partition("?")[0]  # as sent, until normalised
        self.query = ""
        self.client = client                # the peer's address
        self.started = time.perf_counter()
        self.route: Route | None = None
        self.api: OpenAIShape = OPENAI      # how the proxy's own answers speak
        self.label = "-"                    # the key's name or short hash, for logs and metrics
        self.bucket_key = ""
        self.policy: KeyPolicy | None = None
        self.cors = ""                      # the CORS header lines its answers carry
        self.length: int | None = 0         # the body's Content-Length (None: chunked)
        self.expects_continue = False       # the client waits for 100 Continue to send it
        self.body = b""
        self.body_read = False              # a body left unread closes the connection
        self.payload: dict | None = None    # the JSON body of a charged request
        self.ask: Ask | None = None         # what a generation request asks for
        self.charge: Charge | None = None
        self.ending = NOT_SENT              # how the upstream part went (see Charge.close)
        self.status = 0                     # the status the client was sent
        self.note = ""
        self.head_sent = False
        self.tail = b""                     # the answer's last bytes, written after the charge
        self.model: str | None = None       # the model its server must serve (aliases resolved)
        self.server: ModelServer | None = None  # the server it went to (last, after failover)
        self.user = ""                      # the user a trusted front end named ("" for none)
        self.counts_asked = False           # the forwarded body asks for counts on every chunk

    @property
    def cost(self) -> int | None:
        """The tokens charged (None: a request that is never charged)."""
        return None if self.charge is None else self.charge.cost

    @property
    def remaining(self) -> int | None:
        return None if self.charge is None else self.charge.remaining

    @property
    def route_label(self) -> str:
        return self.route.label if self.route is not None else "other"


class Identity(typing.NamedTuple):
    """Who a request is from: the bucket it draws on, its policy, its name in logs."""
    bucket_key: str
    policy: KeyPolicy
    label: str


def client_key(headers: Headers) -> str:
    """The key a client presents: a bearer token, or (as Anthropic's clients send it) x-api-key.
    The one reader of a client's key: every route that asks who is calling reads it here."""
    scheme, _, token = (headers.get("Authorization") or "").strip().partition(" ")
    return (token.strip() if scheme.lower() == "bearer" else "") \
        or (headers.get("x-api-key") or "").strip()


def identify(headers: Headers, keys: KeyRing, default_policy: KeyPolicy, peer: str,
             trust_forwarded_for: bool, now: float | None = None) -> Identity:
    """The caller's bucket key and policy, or ProxyError(401). Keyless callers share their
    IP's bucket (when keys are not required): the last X-Forwarded-For address when it is
    trusted, else the peer's."""
    token = client_key(headers)
    if not token:
        if keys:
            raise ProxyError(HTTPStatus.UNAUTHORIZED, "You didn't provide an API key. "
                             "Provide it in the Authorization header as 'Bearer YOUR_KEY' "
                             "(or as x-api-key).", code="invalid_api_key")
        if trust_forwarded_for:
            forwarded = [p.strip() for p in ",".join(
                headers.get_all("X-Forwarded-For") or []).split(",") if p.strip()]
            if forwarded:
                peer = forwarded[-1]
        return Identity("ip:" + peer, default_policy, "-")
    digest = key_digest(token)
    found = keys.find(digest, time.time() if now is None else now)
    if found is None:
        if keys:
            raise ProxyError(HTTPStatus.UNAUTHORIZED, "Incorrect API key provided.",
                             code="invalid_api_key")
        found = (digest, default_policy)
    digest, policy = found
    identity = Identity(policy.bucket_key(digest), policy, policy.name or short_hash(digest))
    if policy.disabled:
        raise ProxyError(HTTPStatus.UNAUTHORIZED, "This API key has been disabled.",
                         code="invalid_api_key")
    check_expiry(policy, time.time() if now is None else now)
    return identity


def check_expiry(policy: KeyPolicy, now: float) -> None:
    """401 key_expired from the key's expires_at on (the moment itself included)."""
    if policy.expires_at is not None and now >= policy.expires_at:
        raise ProxyError(HTTPStatus.UNAUTHORIZED, f"This API key expired on "
                         f"{policy.expires_text}.", code="key_expired")


def check_model(payload: object, allowed: frozenset[str],
                aliases: Mapping[str, str] | None = None, who: str = "This key") -> None:
    """A key (or a front end's user) limited to some models gets 403 for any other (naming
    the allowed ones). A model that is an alias is allowed when the list names the alias or
    its target."""
    model = payload.get("model") if isinstance(payload, dict) else None
    if not may_use(allowed, model, aliases):
        raise ProxyError(HTTPStatus.FORBIDDEN,
                         f"{who} may not use model {model!r}. Allowed: "
                         f"{', '.join(sorted(allowed))}.", code="model_not_allowed",
                         param="model")


def may_use(allowed: frozenset[str] | None, model: object,
            aliases: Mapping[str, str] | None = None) -> bool:
    """Whether a key's models list (None: any) lets it use `model` (an alias: or its target)."""
    if allowed is None or model in allowed:
        return True
    target = aliases.get(model) if aliases and isinstance(model, str) else None
    return target is not None and target in allowed


def model_field(payload: object, api: OpenAIShape) -> str:
    """Which field of a request body names its model: "model", or on Ollama's native API an
    older client's "name" when "model" is absent."""
    if api is OLLAMA and isinstance(payload, dict) and "model" not in payload \
            and "name" in payload:
        return "name"
    return "model"


def upstream_body(ex: Exchange, base_model: str) -> tuple[bytes, bytes | None]:
    """The body to forward for a charged request, and the one to fall back to if the upstream
    refuses stream_options the proxy added (None: nothing was added). The client's bytes go as
    they are unless the model is rewritten (BASE_MODEL, generation routes), the reserve charged
    for is written into its output limits (estimate mode), or, in usage mode, a stream is asked
    for its usage on the client's behalf. The fallback is the one value that says so: the
    forwarder sends it when the upstream refuses the first, and the answer says which went
    (Answer.usage_asked), from which the meter is configured once."""
    payload, route, ask = ex.payload, ex.route, ex.ask
    assert payload is not None and route is not None and ex.policy is not None
    if not base_model and ex.policy.token_cost_mode == "request":
        return ex.body, None  # (nothing to write into it, nothing to ask for)
    changed = False
    fallback = None
    if base_model and route.kind == GENERATE:
        payload["model"] = base_model
        changed = True
    if ask is not None and ex.policy.token_cost_mode == "estimate":
        changed = route.api.cap(payload, route, ask) or changed
    elif ask is not None and ex.charge is not None and ex.charge.output_limit is not None:
        written = ask._replace(reserve=ex.charge.output_limit)
        changed = route.api.cap(payload, route, written) or changed
    meter = ex.charge.meter if ex.charge is not None else None
    if meter is not None and meter.stream:
        plain = json.dumps(payload).encode() if changed else ex.body
        if route.api.ask_for_usage(payload, route):
            fallback, changed = plain, True
            # (and the counts so far, on every chunk: see ask_for_counts)
            ex.counts_asked = route.api.ask_for_counts(payload, route)
    return (json.dumps(payload).encode() if changed else ex.body), fallback


# ########################################################################## charge ####

#: How the upstream part of a request ended, which decides what it costs (Charge.close).
NOT_SENT = "not sent"        # it never reached the upstream (queue, unreachable): refunded
NO_ANSWER = "no answer"      # sent, but no answer came (timeout, reset, nonsense): charged
FAILED = "failed"            # the upstream answered 502/503/504/529 (it never ran): refunded
REFUSED = "refused"          # the upstream answered 4xx: charged (usage mode: what it reports)
LEFT = "client left"         # the client went away before the answer was whole: charged
BROKEN = "broken off"        # the answer stopped before its end: charged
ANSWERED = "answered"        # relayed whole: charged (usage mode: what the upstream reports)
REFUNDED_ENDINGS = frozenset({NOT_SENT, FAILED})
#: Upstream statuses that say the model never ran (a gateway's or an overloaded server's).
NOT_RUN_STATUSES = frozenset({502, 503, 504, 508, 529})


def upstream_ending(status: int) -> str | None:
    """What an upstream status alone says of how the request ended (None: the relay will)."""
    if status in NOT_RUN_STATUSES:
        return FAILED
    if 400 <= status < 500:
        return REFUSED
    return None


class Charge:
    """A request's claim on its key's bucket, from admission to its end.

    States: `declined` (not admitted: nothing was taken), or `held` from admission until
    close() moves it, exactly once, to `refunded` (the tokens go back) or `settled` (the tokens
    stay; in usage mode the reservation is replaced with what the upstream reports). close() is
    the only place money moves after admission, and a close after it moved the charge does
    nothing; one whose store call failed left it `held`, its tokens taken. The balance shown in
    headers and logs is the charge's own `quota`.
    """

    __slots__ = ("store", "key", "bucket", "held", "state", "quota", "meter", "prompt_estimate",
                 "periods", "cost", "prompt_tokens", "completion_tokens", "note", "output_limit",
                 "also")

    def __init__(self, store: "BucketStore | None", key: str, bucket: BucketPolicy | None,
                 quota: Quota | None, held: int, *, meter: Meter | None = None,
                 prompt_estimate: int = 0, periods: Periods | None = None) -> None:
        self.store = store
        self.key = key
        self.bucket = bucket
        self.held = held
        self.state = "held" if held else "declined"
        self.quota = quota
        self.meter = meter                    # usage mode: reads what the answer really cost
        self.prompt_estimate = prompt_estimate
        self.periods = periods                # the day and month its calendar quotas count in
        self.cost = held                      # what the request costs so far
        self.prompt_tokens = self.completion_tokens = 0  # usage mode: what it settled with
        self.note = ""
        self.output_limit: int | None = None  # written into the forwarded body (usage mode)
        #: the other buckets it was taken from (a user's key, behind the user's own): each
        #: moves as this one does, (bucket key, policy, the periods its quotas count in)
        self.also: tuple[tuple[str, BucketPolicy, Periods | None], ...] = ()

    @classmethod
    def declined(cls, quota: Quota | None) -> "Charge":
        """A request that was not admitted (limited: `quota` says why) and costs nothing."""
        return cls(None, "", None, quota, 0)

    @property
    def remaining(self) -> int | None:
        return None if self.quota is None else self.quota.remaining

    def hold_more(self, tokens: int) -> None:
        """At admission, before anything is sent: take `tokens` more into the held amount (the
        output room of a request that set no limit of its own); close() settles them with the
        rest."""
        assert self.state == "held" and self.store is not None and self.bucket is not None
        settled = self.store.settle(self.key, tokens, self.bucket, periods=self.periods)
        for key, bucket, periods in self.also:
            self.store.settle(key, tokens, bucket, periods=periods)
        assert self.quota is not None
        self.quota = self.quota._replace(remaining=settled.remaining, calendar=tuple(
            q if q.name == "requests_per_day" else q._replace(used=q.used + tokens)
            for q in self.quota.calendar))
        self.held += tokens
        self.cost = self.held

    def settlement(self, ending: str) -> tuple[int, int, int]:
        """What the request costs in the end, given how it ended: (tokens, prompt tokens,
        completion tokens); the token counts are those the usage counters record.

        Refunded only when the model provably did not run (never sent; 502/503/504/529).
        Otherwise the held tokens stay, or, in usage mode, what the upstream reports replaces
        them: a 4xx refusal costs what it reports, else nothing; an answer the meter could not
        read keeps its whole reservation, and so does a plain request that ended without its
        usage (kept_whole); anything else costs the usage reported (or the prompt estimate plus
        what was generated, when a stream was cut short).
        """
        if ending in REFUNDED_ENDINGS:
            return 0, 0, 0
        meter = self.meter
        if meter is None:
            return self.held, 0, 0
        if ending == REFUSED:
            reported = meter.reported()
            return (reported, 0, 0) if reported else (0, 0, 0)
        prompt, completion, total = meter.cost(self.prompt_estimate)
        if total < self.held and (ending == ANSWERED and meter.unmeterable
                                  or kept_whole(meter, ending)):
            return self.held, prompt, completion
        return total, prompt, completion

    def close(self, ending: str) -> None:
        """Refund or settle the held tokens, once; then nothing more moves.

        The state moves only once the store has taken the settlement: if the store call
        raises, the charge is still held (its tokens stay taken) and says so in its state,
        rather than claiming a settlement that never happened."""
        if self.state != "held":
            return
        state = "refunded" if ending in REFUNDED_ENDINGS else "settled"
        total, prompt, completion = self.settlement(ending)
        self.prompt_tokens, self.completion_tokens = prompt, completion
        if total != self.held or prompt or completion:
            assert self.store is not None and self.bucket is not None
            try:
                self.quota = self.store.settle(self.key, total - self.held, self.bucket,
                                               prompt=prompt, completion=completion,
                                               periods=self.periods,
                                               refund=state == "refunded")
                for key, bucket, periods in self.also:
                    self.store.settle(key, total - self.held, bucket, prompt=prompt,
                                      completion=completion, periods=periods,
                                      refund=state == "refunded")
            except StoreUnavailable:
                self.note = "not settled: the store is unreachable"
                return
        self.state, self.cost = state, total


def kept_whole(meter: Meter, ending: str) -> bool:
    """Whether a request keeps its whole reservation because it ended, once forwarded, without
    the usage of a plain (non-stream) answer: its client left, or its answer never came whole.

    A plain answer is generated whole before its first byte is sent, and closing the
    connection does not stop every server: llama.cpp's runs a plain request to its end (it
    polls for a hang-up about once a second at best; measured, 346 tokens generated after the
    client left at 0.5 s). So it is charged as if it ran to its limit: the reservation, what
    the client agreed to at admission. The other choice, reading the answer to its end after
    the client has gone to settle it exactly, would keep generating on servers that do stop
    (Ollama, vLLM), holding a connection and a queue slot for nobody.
    """
    return not meter.stream and ending in (LEFT, NO_ANSWER, BROKEN) and meter.usage() is None


def admit(ex: Exchange, store: "BucketStore", metrics: "Metrics",
          calendar: Calendar | None = None) -> Charge:
    """Take the request's cost from its bucket, and from its key's calendar quotas, in one
    step: a held charge, or a declined one when the bucket or a quota cannot pay (the limit
    answer reads its quota). ProxyError(400) for a request that costs more than a bucket (or
    a token quota) can ever hold."""
    policy, route, payload = ex.policy, ex.route, ex.payload
    assert policy is not None and route is not None and payload is not None
    bucket = policy.bucket
    cost = request_cost(payload, policy, route.kind, ex.ask)
    limits = policy.calendar
    users = policy.users if ex.user else None
    if cost > bucket.capacity or limits.any or users is not None:  # (else it fits: the usual)
        check_fits(cost, bucket, limits, users, payload)
    counted = limits.any or (users is not None and users.calendar)
    periods = calendar.periods() if counted and calendar is not None else None
    also: tuple[tuple[str, BucketPolicy, Periods | None], ...] = ()
    key = refused_by = ex.bucket_key
    if users is None:
        quota = room = store.take(ex.bucket_key, cost, bucket, limits if periods else None,
                                  periods)
    else:  # the user's bucket and quotas, and the key's: both pay, or neither
        key = user_bucket_key(ex.bucket_key, ex.user)
        user_part = Part(key, users.bucket, users.calendar if users.calendar else None,
                         users.max_users)
        quotas = store.take_together(
            (user_part, Part(ex.bucket_key, bucket, limits if limits else None)), cost, periods)
        quota = quotas[1] if quotas[1].limited_by and not quotas[0].limited_by else quotas[0]
        refused_by = ex.bucket_key if quota is quotas[1] else key
        room = quota._replace(remaining=min(q.remaining for q in quotas),
                              calendar=quotas[0].calendar + quotas[1].calendar)
        bucket = users.bucket
        also = ((ex.bucket_key, policy.bucket, periods if limits else None),)
        periods = periods if users.calendar else None
    if not quota.admitted:
        metrics.inc("llm_proxy_limited_requests_total", (("key", metrics.key(ex.label)),))
        declined = Charge.declined(quota)
        declined.key = refused_by  # (whose limit the answer speaks of)
        return declined
    if policy.token_cost_mode != "usage":
        charge = Charge(store, key, bucket, quota, cost, periods=periods)
        charge.also = also
        return charge
    meter = route.api.meter(route, ex.ask, payload)
    estimate = prompt_estimate(payload)
    if ex.ask is not None:
        meter.answers = ex.ask.answers
        if ex.ask.limits and all(_whole(_field(payload, f)) for f in ex.ask.limits):
            meter.output_limit = ex.ask.reserve * ex.ask.answers  # (0 or -1 anywhere: none)
        if ex.ask.prompts > 1:
            meter.prompt_sizes = prompt_sizes(payload)
    charge = Charge(store, key, bucket, quota, cost, meter=meter,
                    prompt_estimate=estimate, periods=periods)
    charge.also = also
    if ex.ask is not None and route.kind == GENERATE:
        if ex.ask.bounded:  # its own limit, written where every server reads one
            charge.output_limit = ex.ask.reserve
        else:
            bound_output(charge, ex.ask, policy, room)
    return charge


def check_fits(cost: int, bucket: BucketPolicy, limits: CalendarLimits,
               users: "UserPolicy | None", payload: dict) -> None:
    """NeverAdmitted for a request that costs more than its bucket (or a token quota, or its
    user's) can ever hold."""
    ceiling = min((v for v in (bucket.capacity, limits.tokens_per_day, limits.tokens_per_month)
                   if v is not None))
    holder = "a bucket holds" if ceiling == bucket.capacity else "this key's quota allows"
    if users is not None:
        mine = min((v for v in (users.bucket.capacity, users.calendar.tokens_per_day,
                                users.calendar.tokens_per_month) if v is not None))
        if mine < ceiling:
            ceiling, holder = mine, ("a user's bucket holds" if mine == users.bucket.capacity
                                     else "a user's quota allows")
    if cost > ceiling:
        raise NeverAdmitted(cost, ceiling, holder, tools_estimate(payload))


def bound_output(charge: Charge, ask: Ask, policy: KeyPolicy, quota: Quota) -> None:
    """Usage mode, a request that set no output limit (or 0, which sets none): it is forwarded
    with one, so that what it can cost is bounded. The limit is the reserve plus half the
    room the bucket and the token quotas still had after its reservation, at most
    max_output_tokens an answer; that room is held with the reservation (and settled with it), so a burst of such requests
    cannot spend together more than the key has (each admitted one sees what the earlier ones
    hold), and, taking half, leaves room for the next."""
    room = max(0, policy.max_output_tokens - ask.reserve) * ask.answers
    left = [quota.remaining] + [q.remaining for q in quota.calendar
                                if q.name != "requests_per_day"]
    extra = max(0, min(room, min(left) // 2)) // ask.answers * ask.answers
    if extra:
        charge.hold_more(extra)
    charge.output_limit = min(policy.max_output_tokens, ask.reserve + extra // ask.answers)


# ####################################################################### forwarder ####

# Upstream connections (made by http.client, read with its response framing through one
# buffered reader per pooled connection), the fair queue in front of a small upstream, and the
# Forwarder that takes a request through both and brings back the answer's head.


@dataclass(frozen=True)
class Upstream:
    """Where a route's requests go: a server (scheme, host, port), and the path that replaces
    the route's own `prefix` (BASE_API_URL's path replaces /v1; the root's is put in front of
    native paths such as /api/chat)."""
    scheme: str
    host: str
    port: int
    base_path: str
    prefix: str = V1_PREFIX

    @classmethod
    def from_url(cls, url: str, prefix: str = V1_PREFIX) -> "Upstream":
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname or "", port, parts.path.rstrip("/"), prefix)

    @classmethod
    def root_of(cls, config: Config) -> "Upstream":
        """The upstream's root: NATIVE_API_URL, else BASE_API_URL without its trailing /v1."""
        url = config.native_api_url or re.sub(re.escape(V1_PREFIX) + "/?$", "",
                                                 config.base_api_url)
        return cls.from_url(url, prefix="")

    @property
    def address(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    @property
    def host_header(self) -> str:
        """The Host header http.client would send: IPv6 in brackets, the port unless default."""
        try:
            host = self.host.encode("ascii").decode()
        except UnicodeEncodeError:
            host = self.host.encode("idna").decode()
        if ":" in host:
            host = f"[{host}]"
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def path_for(self, path: str, query: str) -> str:
        """The upstream target for a normalised path: the base path replaces the prefix."""
        quoted = _quoted_path(self.base_path + path[len(self.prefix):])
        return quoted + ("?" + query if query else "")


_NO_BODY_STATUSES = frozenset({HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED})
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([2-5][0-9][0-9])(?: ([^\r\n]*))?\r\n")
_DIGITS = re.compile(r"[0-9]+")  # str.isdigit() also takes "²" and other Unicode digits


class _UpstreamResponse:
    """http.client's response, reading its headers with read_headers instead of the email
    package. The framing rules are http.client's own: its HTTPResponse's methods (read,
    read1, the chunked decoding, its private _read_status and _check_close), taken onto this
    plain object (see below), which an answer's reading uses and nothing else. An
    HTTPResponse is an io object besides: made, closed and finalised as one, it cost about a
    third of reading a small answer.

    begin() follows CPython 3.10-3.13's HTTPResponse.begin (Lib/http/client.py). What it
    changes: headers come from read_headers (not the email parser); every interim 1xx is
    skipped (CPython skips only 100) and 101 is refused; a 204/304 that claims a body marks
    the connection as not reusable; Content-Length must be ASCII digits.
    """

    __slots__ = ("fp", "_method", "debuglevel", "headers", "msg", "version", "status", "code",
                 "reason", "chunked", "chunk_left", "length", "will_close")

    def __init__(self, reader: io.BufferedReader, method: str) -> None:
        #: the connection's reader (or a body put back: _PutBack); None once read or closed
        self.fp: typing.Any = reader
        self._method = method
        self.debuglevel = 0
        self.headers: Headers | None = None
        self.version = 11
        self.status = self.code = 0
        self.reason = ""
        self.chunked = False
        self.chunk_left: int | None = None
        self.length: int | None = None
        self.will_close = True

    if typing.TYPE_CHECKING:  # (http.client's, taken on below the class)
        def read(self, amt: int | None = None) -> bytes: ...
        def read1(self, n: int = -1) -> bytes: ...
        def isclosed(self) -> bool: ...
        def _read_status(self) -> tuple[str, int, str]: ...
        def _check_close(self) -> bool: ...
        def _close_conn(self) -> None: ...

    def close(self) -> None:
        if self.fp is not None:
            self._close_conn()

    def begin(self) -> None:
        if self.headers is not None:
            return
        while True:
            version, status, reason = self._status_line()
            if status == 101:  # Switching Protocols, never asked for: not HTTP any more
                raise http.client.HTTPException("unexpected 101 Switching Protocols")
            if not 100 <= status < 200:
                break
            self._headers_or_error()  # an interim answer (100, 102, 103...): skipped, never relayed
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = self._headers_or_error()
        encoding = (self.headers.get("Transfer-Encoding") or "").lower()
        self.chunked = encoding == "chunked"
        self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None
        length = self.headers.get("Content-Length")
        if length and not self.chunked and _DIGITS.fullmatch(length.strip()):
            self.length = int(length)
        if status in _NO_BODY_STATUSES or self._method == "HEAD":
            if status in _NO_BODY_STATUSES and (self.chunked or self.length):
                self.will_close = True  # it claims a body it cannot have: trust nothing after it
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True

    def getheader(self, name: str, default: typing.Any = None) -> typing.Any:
        """http.client's (a repeated field's values joined), reading Headers directly."""
        headers = self.headers
        if headers is None:
            raise http.client.ResponseNotReady()
        if headers.repeated:
            values = headers.get_all(name)
            return default if values is None else ", ".join(values)
        return headers.get(name, default)

    def _status_line(self) -> tuple[str, int, str]:
        """http.client's _read_status, for the usual line at once: one that came whole, of a
        final status, by HTTP/1.x (any other, http.client's own reads)."""
        line = _STATUS_LINE.match(self.fp.peek(1))
        if line is None:  # (http.client's own reading, with all its checks)
            return self._read_status()
        self.fp.read(line.end())
        minor, status, reason = line.groups()
        return f"HTTP/1.{minor[0] - 48}", int(status), (reason or b"").decode("latin-1")

    def _headers_or_error(self) -> Headers:
        try:
            return read_headers(self.fp)
        except (HeaderError, EOFError) as err:
            raise http.client.HTTPException(str(err)) from None


# http.client's framing, on _UpstreamResponse: each method of its HTTPResponse that this one
# does not define, but those that only an io object has (they call super()).
for _name, _function in vars(http.client.HTTPResponse).items():
    if callable(_function) and _name not in vars(_UpstreamResponse) \
            and _name not in ("flush", "readline", "__iter__"):
        setattr(_UpstreamResponse, _name, _function)
del _name, _function


#: struct tcp_info (linux/tcp.h): the state is its first byte; tcpi_bytes_received (Linux 4.1),
#: counting the peer's closing as one, ends at byte 136.
_TCP_INFO_SIZE = 136
_TCP_ESTABLISHED = 1
_IPPROTO_TCP, _TCP_INFO = socket.IPPROTO_TCP, getattr(socket, "TCP_INFO", 11)
_BYTES_RECEIVED = struct.Struct("@128xQ")


class SocketReader(io.RawIOBase):
    """The raw reading side of a socket, for a BufferedReader, with a timeout that raises
    TimeoutError. socket.makefile's SocketIO does the same with more checks per read, and
    with a socket-level timeout, which CPython enforces by polling before every recv and
    send: two system calls and two hand-offs of the GIL per operation, where a kernel timeout
    (set_io_timeout) needs one. Closing it leaves the socket open."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self._recv_into = sock.recv_into
        #: Whether peek_buffered() may look without waiting (a TLS socket takes no flags).
        self.can_peek = not isinstance(sock, ssl.SSLSocket)
        self._dont_wait = False
        self._no_read = False  # (see held)
        #: The peer closed its end (seen by peek_buffered: a read that returned nothing).
        self.ended = False
        #: Bytes received from the socket so far (by this, or as the stream relay adds them).
        self.received = 0
        #: Whether arrived() can tell (plain TCP on Linux, until TCP_INFO says too little).
        self.tcp_info = (self.can_peek and sys.platform.startswith("linux")
                         and hasattr(socket, "TCP_INFO")
                         and sock.family in (socket.AF_INET, socket.AF_INET6))

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: typing.Any) -> int | None:  # (any writable buffer)
        if self._no_read:
            return None
        if self._dont_wait:
            try:
                count = self._recv_into(buffer, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None  # nothing there: the buffered reader's peek returns b""
            self.ended = count == 0
            self.received += count
            return count
        try:
            count = self._recv_into(buffer)
        except BlockingIOError:  # the kernel's receive timeout
            raise TimeoutError("timed out") from None
        self.received += count
        return count

    def arrived(self) -> bool | None:
        """Whether the socket has received what was not read from it (bytes, or the peer's
        closing), from the kernel's TCP_INFO: a system call that keeps the interpreter lock.
        One that lets go of it (a look with recv) hands it, under load, to another thread,
        and waits up to the switch interval to have it back. None where TCP_INFO cannot tell
        (then peek_buffered looks)."""
        if not self.tcp_info:
            return None
        try:
            info = self._sock.getsockopt(_IPPROTO_TCP, _TCP_INFO, _TCP_INFO_SIZE)
        except OSError:
            return True  # (a socket that cannot say is not one to use)
        if len(info) < _TCP_INFO_SIZE:  # (a kernel before 4.1: no tcpi_bytes_received)
            self.tcp_info = False
            return None
        return info[0] != _TCP_ESTABLISHED or _BYTES_RECEIVED.unpack_from(info)[0] != self.received

    def held(self, reader: io.BufferedReader) -> bytes:
        """What `reader` (reading from this) holds, without any system call."""
        self._no_read = True
        try:
            return reader.peek(1)
        finally:
            self._no_read = False

    def peek_buffered(self, reader: io.BufferedReader) -> bytes:
        """What `reader` (reading from this) holds or the socket has already received,
        without waiting: one system call at most."""
        self._dont_wait = True
        try:
            return reader.peek(1)
        finally:
            self._dont_wait = False


def peek_now(reader: io.BufferedReader, sock: socket.socket) -> bytes | None:
    """What `reader` holds or its socket has already received, found out without waiting: the
    bytes (b"" at the connection's end), or None when nothing has come yet. One system call at
    most through SocketReader.peek_buffered; a TLS socket (whose reads take no flags), or a
    reader that is not a socket's, is made briefly non-blocking instead, and there an error
    means nothing has come. Elsewhere a reset raises OSError, as a read would. The one peek
    without waiting: the pool's idle check, the relay's and the stream relay's."""
    raw = getattr(reader, "raw", None)
    if isinstance(raw, SocketReader) and raw.can_peek:
        data = raw.peek_buffered(reader)
        return data if data or raw.ended else None
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        return reader.peek(1)
    except (OSError, ValueError):  # (nothing there: BlockingIOError, SSLWantReadError)
        return None
    finally:
        sock.settimeout(timeout)


_TIMEVAL = struct.Struct("@ll")  # struct timeval on Linux


def set_io_timeout(sock: socket.socket, seconds: float) -> None:
    """Give a socket's reads and writes a time limit. For a plain socket on Linux the limit is
    the kernel's (SO_RCVTIMEO, SO_SNDTIMEO): an expired read raises TimeoutError through
    SocketReader, an expired write BlockingIOError (an OSError). Elsewhere, and for TLS (whose
    blocking reads would retry after the kernel's timeout), it is Python's socket timeout,
    which raises TimeoutError for both."""
    if isinstance(sock, ssl.SSLSocket) or not sys.platform.startswith("linux"):
        sock.settimeout(seconds)
        return
    sock.settimeout(None)
    whole = int(seconds)
    timeval = _TIMEVAL.pack(whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


@functools.lru_cache(maxsize=1024)
def _quoted_path(path: str) -> str:
    return urllib.parse.quote(path, safe="/:@!$&'()*+,;=-._~")


class _ConnectionReader(io.BufferedReader):
    """The buffered reader of one upstream connection, kept for the connection's life.
    http.client makes a new one for every response (and closes it at the response's end),
    which costs as much as the rest of reading a small response; close() is therefore a no-op
    and release() the real close, called when the connection closes (the socket is closed
    separately)."""

    def close(self) -> None:
        pass

    def release(self) -> None:
        super().close()


class _Connection:
    """What the pool holds of an upstream connection: http.client makes it (connect timeout,
    TCP_NODELAY, TLS with certificate checks); requests are written here in one send (head and
    body together, one packet for small bodies) and answers are read by _UpstreamResponse,
    that is http.client's framing, from the connection's own reader."""

    __slots__ = ("sock", "raw", "reader")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.raw = SocketReader(sock)
        self.reader = _ConnectionReader(self.raw, READ_BUFFER)

    def send_request(self, head: str, body: bytes) -> "_UpstreamResponse":
        """Send a request whose head (request line and headers, without the empty line that
        ends them) is `head`; the response object that will read its answer."""
        self.sock.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        return _UpstreamResponse(self.reader, head.partition(" ")[0])

    def answer_begun(self) -> bool:
        """Whether the answer to the request just sent has begun to arrive, found out without
        waiting. A look that reads what has come (the answer must be read anyway), not the
        kernel's count (has_unread): one system call where an answer that has come would
        otherwise take two. A reset raises, as the read would."""
        return peek_now(self.reader, self.sock) is not None

    def has_unread(self) -> bool:
        """Whether an idle connection has bytes waiting to be read (buffered, or received by
        the kernel), or the upstream has closed its end, found out without waiting: bytes no
        request asked for, or a connection closed while it was idle (a server may close an
        idle keep-alive connection at any time; llama.cpp's does so after streams when many
        are open at once). The pool's look before reuse."""
        arrived = self.raw.arrived()
        if arrived is not None:
            return arrived or bool(self.raw.held(self.reader))
        try:
            return peek_now(self.reader, self.sock) is not None
        except (OSError, ValueError):  # (reset by the upstream: not usable)
            return True

    def close(self) -> None:
        self.reader.release()
        self.sock.close()


class UpstreamPool:
    """Idle keep-alive connections to the upstream, reused last-in first-out.

    acquire() gives a connected connection and whether it was reused; release() returns one whose
    response was read to the end; anything else must be closed by the caller.
    """

    def __init__(self, upstream: Upstream, open_timeout: float, read_timeout: float,
                 max_idle: int = POOL_MAX_IDLE, api_key: str = "") -> None:
        self.upstream = upstream
        self.open_timeout = open_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._ssl = ssl.create_default_context() if upstream.scheme == "https" else None
        self.host_line = f"Host: {upstream.host_header}"
        self.authorization_line = f"Authorization: Bearer {api_key}" if api_key else ""
        self.api_key_line = f"x-api-key: {api_key}" if api_key else ""

    def acquire(self, new: bool = False) -> tuple[_Connection, bool]:
        """An idle connection that has received anything while idle (bytes no request asked
        for, or the upstream's closing it) is closed and the next one tried. One may still be
        closed by the upstream as the request goes out; the caller finds out when the request
        fails before any answer, and retries once on a `new` connection."""
        while not new:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(), False
            if not conn.has_unread():
                return conn, True
            conn.close()
        return self._connect(), False

    def release(self, conn: _Connection) -> None:
        """Take back a connection whose response was read to its end by its own framing. Any
        byte beyond that end belongs to no request: acquire() looks before the connection
        is used again and closes it, so no byte of one exchange can reach another (one look
        a request, not one here and one there)."""
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self) -> _Connection:
        u = self.upstream
        if self._ssl is not None:
            maker: http.client.HTTPConnection = http.client.HTTPSConnection(
                u.host, u.port, timeout=self.open_timeout, context=self._ssl)
        else:
            maker = http.client.HTTPConnection(u.host, u.port, timeout=self.open_timeout)
        try:
            maker.connect()  # sets TCP_NODELAY; checks the certificate
        except (socket.timeout, TimeoutError):
            maker.close()
            raise UpstreamUnreachable(HTTPStatus.GATEWAY_TIMEOUT, "The upstream server did not "
                                      "accept the connection in time.",
                                      "upstream_timeout") from None
        except OSError:
            maker.close()
            raise UpstreamUnreachable(HTTPStatus.BAD_GATEWAY, "The upstream server could not be "
                                      "reached.", "upstream_unreachable") from None
        sock, maker.sock = maker.sock, None
        set_io_timeout(sock, self.read_timeout)
        return _Connection(sock)

    def idle(self) -> list[_Connection]:
        """The connections waiting in the pool now (a copy of the list)."""
        with self._lock:
            return list(self._idle)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            self.max_idle = 0  # (a connection given back later is closed: see release)
        for conn in idle:
            conn.close()


def wait_readable(upstream: socket.socket, client: socket.socket | None, timeout: float) -> bool:
    """Block until the upstream socket is readable, watching the client socket meanwhile.

    Raises ClientGone as soon as the client closes its end (so the caller can close the upstream
    and stop generation), UpstreamTimeout after `timeout` seconds of silence. Returns whether the
    client should still be watched: a client that sent more bytes (a pipelined request) is not
    gone, and watching it further would spin.
    """
    poller = select.poll()
    poller.register(upstream, select.POLLIN)
    if client is not None:
        poller.register(client, select.POLLIN)
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UpstreamTimeout()
        events = poller.poll(remaining * 1000)
        if not events:
            raise UpstreamTimeout()
        watching = client is not None
        readable = False
        for fd, _ in events:
            if client is not None and fd == client.fileno():
                if peer_closed(client):
                    raise ClientGone()
                poller.unregister(client)
                client, watching = None, False
            elif fd == upstream.fileno():
                readable = True
        if readable:
            return watching


def peer_closed(sock: socket.socket) -> bool:
    """Whether the peer has closed the connection, without waiting (a socket with a timeout
    would otherwise wait for data inside recv, MSG_DONTWAIT or not)."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if not poller.poll(0):
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):
        return True



class _Waiter:
    __slots__ = ("key", "seq", "granted", "rank", "since")

    def __init__(self, key: str, seq: int, rank: int = 1, since: float = 0.0) -> None:
        self.key, self.seq = key, seq
        self.rank, self.since = rank, since  # its class (PRIORITIES' index), when it came
        self.granted = threading.Event()


class FairGate:
    """At most `limit` requests in flight to the upstream; the others wait their turn.

    When a slot frees up it goes to the highest priority class waiting (high, normal, low; a
    low request that has waited `max_wait` seconds of `clock` counts as normal, so nothing
    starves), and within the class to the waiting key with the fewest requests in flight, and
    among equals to the one served least recently (round-robin), so a key that queues 50
    requests cannot starve one that sends a single request. With fair=False the longest waiter
    of the class goes first (FIFO). Methods for the caller: enter(), leave().
    """

    def __init__(self, limit: int, fair: bool = True, max_wait: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.fair = fair
        self.max_wait = max_wait
        self._clock = clock
        self._lock = threading.Lock()
        self._busy = 0
        self._inflight: dict[str, int] = {}
        self._waiting: dict[str, list[_Waiter]] = {}
        self._served: dict[str, int] = {}  # the turn at which each key last got a slot
        self._turn = 0
        self._seq = 0
        self._closed = False

    def enter(self, key: str, timeout: float, gone: Callable[[], bool],
              priority: str = "normal") -> str:
        """"ok" once the request may go upstream; "gone" if the client went away while it
        waited, "timeout" after `timeout` seconds, "closed" when the proxy is stopping. Only
        "ok" must be followed by leave()."""
        with self._lock:
            if self._closed:
                return "closed"
            if self._busy < self.limit and not self._waiting:
                self._grant(key)
                return "ok"
            self._seq += 1
            waiter = _Waiter(key, self._seq, PRIORITIES.index(priority), self._clock())
            self._waiting.setdefault(key, []).append(waiter)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if waiter.granted.wait(max(0.0, min(0.1, remaining))):
                return "ok"
            outcome = "closed" if self._closed else "gone" if gone() else \
                "timeout" if remaining <= 0.1 else ""
            if outcome:
                with self._lock:
                    if waiter.granted.is_set():  # granted meanwhile: hand the slot on
                        self._release(key)
                    else:
                        queue = self._waiting[key]
                        queue.remove(waiter)
                        if not queue:
                            del self._waiting[key]
                            self._forget(key)
                return outcome

    def leave(self, key: str) -> None:
        with self._lock:
            self._release(key)

    def close(self) -> None:
        """Turn every waiting request away ("closed"), now and from now on."""
        self._closed = True

    def waiting(self) -> int:
        """How many requests wait for a slot now."""
        with self._lock:
            return sum(len(queue) for queue in self._waiting.values())

    def waiting_by_key(self) -> dict[str, int]:
        """How many requests of each key wait for a slot now."""
        with self._lock:
            return {key: len(queue) for key, queue in self._waiting.items()}

    def _grant(self, key: str) -> None:
        self._busy += 1
        self._inflight[key] = self._inflight.get(key, 0) + 1
        self._turn += 1
        self._served[key] = self._turn

    def _release(self, key: str) -> None:
        self._busy -= 1
        self._inflight[key] -= 1
        if not self._inflight[key]:
            del self._inflight[key]
        self._forget(key)
        while self._busy < self.limit and self._waiting:
            # each key's first waiter of its best class (a front end's users may wait in
            # another class than the key's own work: the key ranks by its best)
            firsts = {k: min(queue, key=lambda w: (self._rank(w), w.seq))
                      for k, queue in self._waiting.items()}
            ranks = {k: self._rank(w) for k, w in firsts.items()}
            best = min(ranks.values())
            if self.fair:
                chosen = min((k for k in self._waiting if ranks[k] == best),
                             key=lambda k: (self._inflight.get(k, 0), self._served.get(k, 0)))
            else:
                chosen = min((k for k in self._waiting if ranks[k] == best),
                             key=lambda k: firsts[k].seq)
            queue = self._waiting[chosen]
            waiter = firsts[chosen]
            queue.remove(waiter)
            if not queue:
                del self._waiting[chosen]
            self._grant(chosen)
            waiter.granted.set()

    def _forget(self, key: str) -> None:
        if key not in self._inflight and key not in self._waiting:
            self._served.pop(key, None)  # a key with nothing going on needs no memory

    def _rank(self, waiter: _Waiter) -> int:
        """A waiter's class now: low (2) is served as normal (1) after max_wait seconds."""
        if waiter.rank == 2 and self._clock() - waiter.since >= self.max_wait:
            return 1
        return waiter.rank


class KeySlots:
    """Requests in flight per key, capped at MAX_CONCURRENT_PER_KEY (0: no cap, no cost):
    enter() refuses beyond it. A key's own max_concurrent is a cap its requests queue for
    instead: wait() lets them in one by one as the key's requests end, first come first
    served, up to a timeout."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._freed = threading.Condition(self._lock)
        self._queued: dict[str, collections.deque[object]] = {}

    def wait(self, key: str, limit: int, timeout: float, gone: Callable[[], bool]) -> str:
        """"ok" once the key has fewer than `limit` in flight and this request's turn has
        come (then leave() must follow); "gone" if the client went away, "timeout" after
        `timeout` seconds."""
        ticket = object()
        deadline = time.monotonic() + timeout
        with self._freed:
            queue = self._queued.setdefault(key, collections.deque())
            queue.append(ticket)
            try:
                while queue[0] is not ticket or self._counts.get(key, 0) >= limit:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return "timeout"
                    self._freed.wait(min(0.1, remaining))
                    if gone():
                        return "gone"
                self._counts[key] = self._counts.get(key, 0) + 1
                return "ok"
            finally:
                queue.remove(ticket)
                if not queue:
                    del self._queued[key]
                self._freed.notify_all()

    def waiting(self, key: str) -> int:
        with self._lock:
            return len(self._queued.get(key, ()))

    def enter(self, key: str) -> bool:
        if not self.limit:
            return True
        with self._lock:
            count = self._counts.get(key, 0)
            if count >= self.limit:
                return False
            self._counts[key] = count + 1
            return True

    def leave(self, key: str) -> None:
        with self._lock:
            if key not in self._counts:
                return  # (no cap: enter() counted nothing)
            self._counts[key] -= 1
            if not self._counts[key]:
                del self._counts[key]
            self._freed.notify_all()


class _BytesReader(io.BytesIO):
    """A response body already read, put back for the relay (read1 and peek as on a socket)."""

    def peek(self, size: int = 0) -> bytes:
        return self.getvalue()[self.tell():]


def upstream_head(method: str, target: str, headers: Headers, peer: str, pool: "UpstreamPool",
                  body: bytes, api: OpenAIShape = OPENAI, via: str = "") -> str:
    """The upstream request's line and headers (without the empty line that ends them): the
    client's end-to-end headers (repeats joined), with Host, the upstream key, X-Forwarded-For
    and Content-Length set here. The upstream key goes as a bearer token, and for the
    Anthropic API as x-api-key too (llama.cpp takes either, vLLM only the first, servers made
    for Anthropic's clients may want the second). Every value was checked when it was parsed
    (read_headers) or configured (Config)."""
    named = headers.connection_tokens()
    kept = headers.without(NOT_FORWARDED_UP | named if named else NOT_FORWARDED_UP)
    if headers.repeated:
        forwarded: dict[str, str] = {}
        for name, value in kept:
            forwarded[name] = f"{forwarded[name]}, {value}" if name in forwarded else value
        kept = list(forwarded.items())
    lines = [f"{method} {target} HTTP/1.1", pool.host_line, "Accept-Encoding: identity",
             *map(_FIELD_LINE, kept)]
    previous = ", ".join(headers.get_all("X-Forwarded-For", ())) \
        if "x-forwarded-for" in headers else ""
    lines.append(f"X-Forwarded-For: {previous}, {peer}" if previous else f"X-Forwarded-For: {peer}")
    if via:
        hops = ", ".join(headers.get_all("Via", ())) if "via" in headers else ""
        lines.append(f"Via: {hops}, 1.1 {via}" if hops else f"Via: 1.1 {via}")
    if pool.authorization_line:
        lines.append(pool.authorization_line)
        if api is ANTHROPIC:
            lines.append(pool.api_key_line)
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines)


@dataclass
class Answer:
    """The upstream's answer to a request, its head read, its body not yet."""
    pool: "UpstreamPool"
    conn: _Connection
    resp: _UpstreamResponse
    sent: float                 # when the request went out (time.perf_counter)
    #: the body that went asks for usage on the client's behalf (stream_options the proxy
    #: added, and the upstream took)
    usage_asked: bool = False
    cut: bool = False           # cut short by the proxy's shutdown
    server: "ModelServer | None" = None  # the server that answered

    __hash__ = object.__hash__  # (one answer is one answer, whatever its fields say)


_UPSTREAM_ERROR_KINDS = {"upstream_timeout": "timeout", "upstream_unreachable": "refused"}
_NO_QUEUE = contextlib.nullcontext()


class Forwarder:
    """Takes a request to the upstream and brings back its answer's head.

    target(): where a route's request goes (the /v1 base or the upstream's root, each server
    with its own pool of connections). turn(): the request's place in the fair queue (when
    MAX_UPSTREAM_CONCURRENCY is set). send(): the exchange, retried once when a reused pooled
    connection turns out to have been closed by the upstream, and sent once more without the
    stream_options the proxy added on the client's behalf when the upstream refuses them.
    finish(): the connection back to its pool, or closed. Whatever fails sets `ex.ending` and
    raises the error the client gets.
    """

    def __init__(self, config: Config, gate: FairGate | None, metrics: "Metrics",
                 upstreams: UpstreamsSpec | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.upstreams = {"v1": Upstream.from_url(config.base_api_url),
                          "root": Upstream.root_of(config)}
        self.pools: dict[tuple[str, str, int], UpstreamPool] = {}
        for upstream in self.upstreams.values():
            if upstream.address not in self.pools:
                self.pools[upstream.address] = UpstreamPool(
                    upstream, config.open_timeout, config.read_timeout,
                    api_key=config.base_api_key)
        self.pool = self.pools[self.upstreams["v1"].address]
        self.gate = gate
        #: the servers requests go to: BASE_API_URL's alone, or UPSTREAMS_FILE's (Router)
        default = ModelServer(UpstreamSpec(DEFAULT_UPSTREAM, config.base_api_url, ""),
                              self.upstreams, self.pools, gate, clock, any_model=True)
        self.router = Router([default], config, clock)
        if upstreams is not None:
            self.close()  # (BASE_API_URL's pools hold no connection yet)
            self.router.apply(upstreams)
        self.metrics = metrics
        self.queue_timeout = config.upstream_queue_timeout
        self._lock = threading.Lock()
        #: answers being relayed (cut() ends them): changed by a set's own calls, without a
        #: lock; one added as cut() runs sees `_stopping`, set before cut() takes its copy
        self._active: set[Answer] = set()
        self._stopping = False

    def target(self, route: Route, path: str, query: str,
               server: ModelServer | None = None) -> tuple["UpstreamPool", str]:
        """The pool and the request target of a forwarded request (at `server`, else at
        BASE_API_URL's)."""
        upstreams, pools = (self.upstreams, self.pools) if server is None else (
            server.upstreams, server.pools)
        upstream = upstreams[route.upstream]
        return pools[upstream.address], upstream.path_for(path, query)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.router.close()

    def cut(self) -> int:
        """The proxy is stopping: end every answer being relayed (its upstream connection is
        shut, so its relay ends as if the upstream broke off, with the API's last error event)
        and turn every queued request away. How many answers were cut."""
        with self._lock:
            self._stopping = True
            active = list(self._active)
        for gate in {self.gate, *self.router.gates()} - {None}:
            gate.close()  # type: ignore[union-attr]
        for answer in active:
            answer.cut = True
            try:
                answer.conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed
        return len(active)

    def turn(self, ex: Exchange, client: socket.socket,
             server: ModelServer | None = None) -> typing.ContextManager[None]:
        """Hold a slot to the upstream (`server`'s own queue, else BASE_API_URL's) for the body
        of a `with`. A request that leaves the queue (its `client` went away, or it waited
        UPSTREAM_QUEUE_TIMEOUT) never reached the upstream: ex.ending stays NOT_SENT."""
        gate = self.gate if server is None else server.gate
        return _NO_QUEUE if gate is None else self._queued(ex, lambda: peer_closed(client), gate)

    @contextlib.contextmanager
    def _queued(self, ex: Exchange, gone: Callable[[], bool], gate: FairGate) -> Iterator[None]:
        outcome = gate.enter(ex.bucket_key, self.queue_timeout, gone, request_priority(ex))
        if outcome == "gone":
            raise ClientGone()
        if outcome == "closed":
            raise ProxyError(HTTPStatus.SERVICE_UNAVAILABLE, "The proxy is shutting down. "
                             "Please try again shortly.", type="server_error",
                             code="shutting_down", headers=[("Retry-After", "1")])
        if outcome != "ok":
            raise ProxyError(HTTPStatus.SERVICE_UNAVAILABLE, "The model server is busy; this "
                             f"request waited {_number(self.queue_timeout)} s for its turn. "
                             "Please try again.", type="server_error", code="upstream_busy",
                             headers=[("Retry-After", "1"), ("retry-after-ms", "1000")])
        try:
            yield
        finally:
            gate.leave(ex.bucket_key)

    def send(self, ex: Exchange, pool: "UpstreamPool", head: Callable[[bytes], str],
             body: bytes, fallback: bytes | None, client: socket.socket,
             server: ModelServer | None = None) -> Answer:
        """Send the request (head(body) makes its head) and read the answer's head, watching
        the client meanwhile. The answer's status may already say how the request ended
        (upstream_ending); a request that could not be sent at all stays NOT_SENT. The
        server's health follows (a refused or reset connection, or a 502/503/504/529, marks
        it down), and its own metrics."""
        if server is None or server.any_model:  # (BASE_API_URL alone: the metrics above)
            return self._send(ex, pool, head, body, fallback, client)
        labels = (("upstream", server.name),)
        self.metrics.inc("llm_proxy_upstream_requests_total", labels)
        try:
            answer = self._send(ex, pool, head, body, fallback, client)
        except ProxyError as err:
            self.metrics.inc("llm_proxy_upstream_failures_total", labels)
            if err.code == "upstream_unreachable":
                server.failed()
            raise
        answer.server = server
        self.metrics.observe("llm_proxy_upstream_ttfb_seconds:" + server.name,
                             time.perf_counter() - answer.sent)
        if answer.resp.status in DOWN_STATUSES:
            self.metrics.inc("llm_proxy_upstream_failures_total", labels)
            server.failed()
        else:
            server.health.answered()
        return answer

    def _send(self, ex: Exchange, pool: "UpstreamPool", head: Callable[[bytes], str],
              body: bytes, fallback: bytes | None, client: socket.socket) -> Answer:
        started = time.perf_counter()
        try:
            conn, resp = self._exchange(pool, head(body), body, client)
            answer = Answer(pool, conn, resp, started, usage_asked=fallback is not None)
            if fallback is not None:
                refused = self._stream_options_refused(resp)
                if refused:  # asked again without them: that answer is relayed instead
                    self._done(pool, conn, resp, whole=True)
                    conn, resp = self._exchange(pool, head(fallback), fallback, client)
                    answer = Answer(pool, conn, resp, started)
        except ProxyError as err:
            if not isinstance(err, UpstreamUnreachable):
                ex.ending = NO_ANSWER
            self.metrics.inc("llm_proxy_upstream_errors_total",
                             (("kind", _UPSTREAM_ERROR_KINDS.get(err.code or "", "invalid")),))
            raise
        except ClientGone:
            ex.ending = LEFT
            raise
        self.metrics.observe("llm_proxy_upstream_ttfb_seconds", time.perf_counter() - started)
        self._active.add(answer)
        if self._stopping:  # (cut() ran while this one was being sent)
            answer.cut = True
            shut(answer.conn.sock)
        ex.ending = upstream_ending(resp.status) or ex.ending
        if resp.status >= 500:
            self.metrics.inc("llm_proxy_upstream_errors_total", (("kind", "5xx"),))
        return answer

    def finish(self, answer: Answer, whole: bool) -> None:
        """Done with the answer: a connection whose answer was read whole (by its own framing)
        goes back to its pool, any other is closed."""
        self._active.discard(answer)
        self._done(answer.pool, answer.conn, answer.resp, whole and not answer.cut)
        latency = time.perf_counter() - answer.sent
        self.metrics.observe("llm_proxy_upstream_latency_seconds", latency)
        if answer.server is not None:
            self.metrics.observe("llm_proxy_upstream_latency_seconds:" + answer.server.name,
                                 latency)

    @staticmethod
    def _done(pool: "UpstreamPool", conn: _Connection, resp: _UpstreamResponse,
              whole: bool) -> None:
        if whole and resp.isclosed() and not resp.will_close:
            pool.release(conn)
        else:
            conn.close()

    @staticmethod
    def _exchange(pool: "UpstreamPool", head: str, body: bytes,
                  client: socket.socket) -> tuple[_Connection, _UpstreamResponse]:
        """Send the request and read the response head. A reused connection that the upstream
        had closed meanwhile fails before any byte comes back; that one is retried on a new one."""
        for attempt in (1, 2):
            conn, reused = pool.acquire(new=attempt == 2)
            try:
                resp = conn.send_request(head, body)
                if not conn.answer_begun():  # (under load it often has come: no poll)
                    wait_readable(conn.sock, client, pool.read_timeout)
                resp.begin()
                return conn, resp
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                conn.close()
                if reused and attempt == 1:
                    continue
                raise ProxyError(HTTPStatus.BAD_GATEWAY, "The upstream server closed the "
                                 "connection without answering.", type="server_error",
                                 code="upstream_unreachable") from None
            except (UpstreamTimeout, TimeoutError, BlockingIOError):
                conn.close()  # (BlockingIOError: the kernel's send timeout)
                raise ProxyError(HTTPStatus.GATEWAY_TIMEOUT, "The upstream server did not answer "
                                 "in time.", type="server_error", code="upstream_timeout") from None
            except ClientGone:
                conn.close()
                raise
            except (OSError, http.client.HTTPException):
                conn.close()
                raise ProxyError(HTTPStatus.BAD_GATEWAY, "The upstream server sent an invalid "
                                 "response.", type="server_error", code="upstream_error") from None
        raise AssertionError("unreachable")

    @staticmethod
    def _stream_options_refused(resp: _UpstreamResponse) -> bool:
        """Whether the upstream refused the stream_options the proxy added (a small 400 that
        names them). Any other answer is left for the relay (a small 400 is read and put back)."""
        if resp.status != HTTPStatus.BAD_REQUEST or resp.length is None \
                or resp.length > 64 * 1024:
            return False
        error = resp.read()
        if b"stream_options" in error:
            return True
        # (typeshed's fp is a BufferedReader; the relay reads it through read1 and peek only)
        resp.fp, resp.length = _BytesReader(error), len(error)  # type: ignore[assignment]
        return False


# ################################################################### model servers ####

# Several model servers behind one proxy (UPSTREAMS_FILE): which server serves which model,
# which are up, and which one a request goes to. Without the file, BASE_API_URL is the one
# server and serves any model. Everything that decides where a request goes lives here; the
# money path (policy, bucket, quotas, the charge, the ledger) never looks at it.

_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_UPSTREAM_FIELDS = ("name", "url", "api_key", "api_key_env", "native_url", "models",
                    "max_concurrency")
BACKOFF_FIRST = 1.0        # seconds a server stays down after its first failure
BACKOFF_MAX = 30.0         # ... doubling at each failed probe, up to this
PROBE_TIMEOUT = 2.0        # seconds a probe (a server's model list) may take at most
MAX_NAMED_MODELS = 20      # models a model_not_found error names
#: Statuses before the answer's head that mark a server down (a gateway's, an overloaded one's).
DOWN_STATUSES = frozenset({502, 503, 504, 529})
#: Statuses after which the request is sent to another server: the first provably did not run
#: it (504 is not one: a gateway that timed out may have let the model run).
FAILOVER_STATUSES = frozenset({502, 503, 529})
DEFAULT_UPSTREAM = "default"  # the name of BASE_API_URL's server, without UPSTREAMS_FILE


@dataclass(frozen=True)
class UpstreamSpec:
    """One model server as the upstreams file describes it (models None: discovered from its
    own model list; for BASE_API_URL alone: any model)."""
    name: str
    url: str
    native_url: str
    api_key: str = ""
    models: frozenset[str] | None = None
    max_concurrency: int = 0


@dataclass(frozen=True)
class UpstreamsSpec:
    """The upstreams file: its servers, and the aliases (a name clients send -> the model a
    server serves)."""
    upstreams: tuple[UpstreamSpec, ...]
    aliases: tuple[tuple[str, str], ...] = ()


def read_upstreams_file(path: str, config: Config,
                        environ: Mapping[str, str] | None = None) -> UpstreamsSpec:
    """The upstreams file, validated; ConfigError naming the file, the entry and the field."""
    environ = os.environ if environ is None else environ
    where = f"UPSTREAMS_FILE {path}"
    document = read_settings_file(path, "UPSTREAMS_FILE")
    unknown = sorted(set(document) - {"upstreams", "aliases"})
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}")
    entries = document.get("upstreams")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f'{where}: "upstreams" must be a non-empty list')
    specs: list[UpstreamSpec] = []
    for index, entry in enumerate(entries):
        spec = upstream_spec(entry, f"{where}: upstreams[{index}]", config, environ)
        if any(s.name == spec.name for s in specs):
            raise ConfigError(f"{where}: upstreams[{index}] ({spec.name}): name is used by "
                              "another entry")
        specs.append(spec)
    aliases = document.get("aliases", {})
    if not isinstance(aliases, dict):
        raise ConfigError(f"{where}: aliases must be a table/object of name = model")
    listed = {m for s in specs if s.models is not None for m in s.models}
    discovered = any(s.models is None for s in specs)
    for alias, model in aliases.items():
        if not isinstance(model, str) or not model or not alias:
            raise ConfigError(f"{where}: aliases.{alias}: must name a model (a non-empty string)")
        if alias in listed:
            raise ConfigError(f"{where}: aliases.{alias}: a server already serves a model of "
                              "that name")
        if model not in listed and not discovered:
            raise ConfigError(f"{where}: aliases.{alias}: {model!r} is served by no upstream")
    return UpstreamsSpec(tuple(specs), tuple(sorted(aliases.items())))


def upstream_spec(entry: object, where: str, config: Config,
                  environ: Mapping[str, str]) -> UpstreamSpec:
    """One entry of the upstreams file, validated (`where` names it in errors)."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: an entry must be a table/object")
    if isinstance(entry.get("name"), str):
        where += f" ({entry['name']})"
    for field in entry:
        if field not in _UPSTREAM_FIELDS:
            raise ConfigError(f"{where}: unknown field {field!r}")
    for field in ("name", "url"):
        if field not in entry:
            raise ConfigError(f"{where}: {field} is required")
    name = entry["name"]
    if not isinstance(name, str) or not _UPSTREAM_NAME.fullmatch(name):
        raise ConfigError(f"{where}: name must be 1 to 64 letters, digits, '.', '_' or '-'")
    for field in ("url", "native_url", "api_key", "api_key_env"):
        if field in entry and not isinstance(entry[field], str):
            raise ConfigError(f"{where}: {field} must be a string")
    url = _url(f"{where}: url", entry["url"])
    native = (_url(f"{where}: native_url", entry["native_url"]) if "native_url" in entry
              else re.sub(V1_PREFIX + "/?$", "", url))
    if "api_key" in entry and "api_key_env" in entry:
        raise ConfigError(f"{where}: give at most one of api_key and api_key_env")
    key = entry.get("api_key", "")
    if "api_key_env" in entry:
        if entry["api_key_env"] not in environ:
            raise ConfigError(f"{where}: api_key_env: the environment variable "
                              f"{entry['api_key_env']} is not set")
        key = environ[entry["api_key_env"]]
    key = _key(f"{where}: the api key", key)
    models = entry.get("models")
    if models is not None and (not isinstance(models, list) or not models or not all(
            isinstance(m, str) and m for m in models)):
        raise ConfigError(f"{where}: models must be a non-empty list of model names")
    concurrency = entry.get("max_concurrency", config.max_upstream_concurrency)
    if type(concurrency) is not int or concurrency < 0:
        raise ConfigError(f"{where}: max_concurrency must be a whole number, 0 or more")
    return UpstreamSpec(name, url, native, key, None if models is None else frozenset(models),
                        concurrency)


def serves(names: Iterable[str] | frozenset[str], model: str) -> bool:
    """Whether a list of model names holds `model`, Ollama's way: a name without a tag is the
    same as the name with ":latest"."""
    if model in names:
        return True
    if ":" not in model:
        return model + ":latest" in names
    return model.endswith(":latest") and model[:-len(":latest")] in names


class Health:
    """Passive health of one server: up until it fails (a refused or reset connection, a
    502/503/504/529 before the answer's head), then down; a probe (its model list) is due
    after a back-off of BACKOFF_FIRST seconds, doubling at each failed probe up to
    BACKOFF_MAX; the first answer brings it back up. `clock` is injected (tests move it)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.backoff = 0.0        # 0: up
        self.probe_at = 0.0

    @property
    def up(self) -> bool:
        return not self.backoff

    def failed(self) -> None:
        self.backoff = min(BACKOFF_MAX, self.backoff * 2) if self.backoff else BACKOFF_FIRST
        self.probe_at = self.clock() + self.backoff

    def answered(self) -> None:
        self.backoff = 0.0

    def probe_due(self) -> bool:
        return bool(self.backoff) and self.clock() >= self.probe_at

    def retry_after(self) -> int:
        """Seconds until its next probe (at least 1)."""
        return max(1, math.ceil(self.probe_at - self.clock()))


class ModelServer:
    """One upstream server at run time: its /v1 base and its root (each with a pool of
    connections), its own fair queue, its health, the models it serves and its requests in
    flight. `any_model`: BASE_API_URL alone, which serves whatever is asked and is never marked
    down (without UPSTREAMS_FILE nothing changes)."""

    def __init__(self, spec: UpstreamSpec, upstreams: dict[str, "Upstream"],
                 pools: dict[tuple[str, str, int], "UpstreamPool"], gate: FairGate | None,
                 clock: Callable[[], float], any_model: bool = False) -> None:
        self.spec, self.name = spec, spec.name
        self.upstreams, self.pools, self.gate = upstreams, pools, gate
        self.health = Health(clock)
        self.any_model = any_model
        self.discovered: frozenset[str] | None = None  # the model list it last gave
        self.refreshed: float | None = None            # when (clock), for MODELS_REFRESH_SECONDS
        self.in_flight = 0

    @classmethod
    def from_spec(cls, spec: UpstreamSpec, config: Config,
                  clock: Callable[[], float]) -> "ModelServer":
        upstreams = {"v1": Upstream.from_url(spec.url),
                     "root": Upstream.from_url(spec.native_url, prefix="")}
        pools: dict[tuple[str, str, int], UpstreamPool] = {}
        for upstream in upstreams.values():
            if upstream.address not in pools:
                pools[upstream.address] = UpstreamPool(upstream, config.open_timeout,
                                                       config.read_timeout, api_key=spec.api_key)
        gate = (FairGate(spec.max_concurrency, config.fair_queue,
                         config.priority_max_wait_seconds, clock)
                if spec.max_concurrency else None)
        return cls(spec, upstreams, pools, gate, clock)

    @property
    def models(self) -> frozenset[str]:
        """The models it serves: its file's list, else the list it last gave."""
        if self.spec.models is not None:
            return self.spec.models
        return self.discovered or frozenset()

    def serves(self, model: str) -> bool:
        return self.any_model or serves(self.models, model)

    @property
    def up(self) -> bool:
        return self.any_model or self.health.up

    def failed(self) -> None:
        if not self.any_model:
            self.health.failed()

    def probe(self, timeout: float) -> bool:
        """Ask for its model list (GET {url}/models, its own API key): whether it answered
        200 with a list. The list is kept as its models when the file names none."""
        v1 = self.upstreams["v1"]
        pool = self.pools[v1.address]
        maker = (http.client.HTTPSConnection(v1.host, v1.port, timeout=timeout,
                                             context=pool._ssl) if pool._ssl is not None
                 else http.client.HTTPConnection(v1.host, v1.port, timeout=timeout))
        headers = {"Authorization": f"Bearer {self.spec.api_key}"} if self.spec.api_key else {}
        try:
            maker.request("GET", v1.path_for(MODEL_LIST_PATH, ""), headers=headers)
            resp = maker.getresponse()
            data = resp.read(MAX_METERED_BODY)
        except (OSError, http.client.HTTPException):
            return False
        finally:
            maker.close()
        listed = json_or_none(data) if resp.status == HTTPStatus.OK else None
        rows = listed.get("data") if isinstance(listed, dict) else None
        if not isinstance(rows, list):
            return False
        self.discovered = frozenset(row["id"] for row in rows if isinstance(row, dict)
                                    and isinstance(row.get("id"), str) and row["id"])
        return True

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


class Router:
    """Which server a request goes to: one that serves its model (after aliases), up, with
    the fewest requests in flight, ties in turn. Holds the servers and aliases in force
    (replaced whole on a reload of UPSTREAMS_FILE), and looks after their health: probes the
    servers that are down once their back-off has passed, and reads the model lists of those
    the file gives none, every MODELS_REFRESH_SECONDS (tick(), from the watcher's thread).

    Methods for the caller: resolve(), check_up(), pick(), release(), alternative(), listed(),
    owner(), apply(), tick(), close().
    """

    def __init__(self, servers: Sequence[ModelServer], config: Config,
                 clock: Callable[[], float], spec: UpstreamsSpec | None = None) -> None:
        self.config, self.clock = config, clock
        self.spec = spec
        self.servers: tuple[ModelServer, ...] = tuple(servers)
        self.aliases: dict[str, str] = dict(spec.aliases) if spec is not None else {}
        self._lock = threading.Lock()
        self._turn = 0
        self.retired: list[ModelServer] = []   # servers a reload removed (closed at the end)

    @property
    def several(self) -> bool:
        """Whether UPSTREAMS_FILE is in force (else BASE_API_URL serves every model)."""
        return self.spec is not None

    def apply(self, spec: UpstreamsSpec) -> None:
        """Put a new upstreams file in force: a server whose entry is unchanged keeps its
        connections, queue, health and model list; the others are made anew."""
        old = {s.name: s for s in self.servers}
        servers = []
        for entry in spec.upstreams:
            kept = old.get(entry.name)
            servers.append(kept if kept is not None and kept.spec == entry
                           else ModelServer.from_spec(entry, self.config, self.clock))
        gone = [s for s in self.servers if s not in servers]
        with self._lock:  # (a request sees the old servers and aliases or the new ones)
            self.servers, self.aliases, self.spec = tuple(servers), dict(spec.aliases), spec
            self.retired += gone
        for server in gone:
            server.close()  # (its idle connections; answers being relayed keep theirs)

    def resolve(self, model: str | None) -> str | None:
        """The model a request's model names (an alias's target), after checking some server
        serves it: ProxyError 404 (model_not_found) for one none serves, 400 for a request
        without one when there are several servers. None: no model, one server."""
        servers = self.servers
        if model is None:
            if len(servers) > 1:
                raise ProxyError(HTTPStatus.BAD_REQUEST, "This request names no model, and "
                                 "this proxy has several model servers: say which model "
                                 "(model).", param="model", code="model_required")
            return None
        target = self.aliases.get(model, model)
        if any(s.serves(target) for s in servers):
            return target
        known = self.listed(up_only=False)
        shown = ", ".join(known[:MAX_NAMED_MODELS]) + (", ..." if len(known) > MAX_NAMED_MODELS
                                                       else "")
        raise ProxyError(HTTPStatus.NOT_FOUND, f"The model {model!r} does not exist here. "
                         f"Models: {shown or 'none'}.", param="model", code="model_not_found")

    def pick(self, model: str | None, tried: Sequence[ModelServer] = ()) -> ModelServer:
        """The server for a request of `model` (resolved; None: the only one), among those up
        and not `tried`, with the fewest in flight (ties in turn); counted in flight until
        release(). ProxyError 503 with Retry-After when every server of the model is down."""
        with self._lock:
            servers = self.servers
            if len(servers) == 1 and not tried:  # (BASE_API_URL alone: nothing to choose)
                only = servers[0]
                if only.up and (model is None or only.serves(model)):
                    only.in_flight += 1
                    return only
            found = [s for s in servers if s not in tried
                     and (model is None or s.serves(model))]
            healthy = [s for s in found if s.up]
            if not healthy:
                raise self._unavailable(found)
            self._turn += 1
            start = self._turn % len(healthy)
            turned = healthy[start:] + healthy[:start]
            chosen = min(turned, key=lambda s: s.in_flight)
            chosen.in_flight += 1
            return chosen

    def release(self, server: ModelServer) -> None:
        with self._lock:
            server.in_flight -= 1

    def check_up(self, model: str | None) -> None:
        """ProxyError 503 (with Retry-After) when no server of `model` is up."""
        found = [s for s in self.servers if model is None or s.serves(model)]
        if not any(s.up for s in found):
            raise self._unavailable(found)

    @staticmethod
    def _unavailable(servers: Sequence[ModelServer]) -> ProxyError:
        wait = min((s.health.retry_after() for s in servers), default=1)
        return ProxyError(HTTPStatus.SERVICE_UNAVAILABLE, "Every server of this model is "
                          "down; please try again shortly.", type="server_error",
                          code="upstream_unavailable",
                          headers=[("Retry-After", str(wait)),
                                   ("retry-after-ms", str(wait * 1000))])

    def alternative(self, model: str | None, tried: Sequence[ModelServer]) -> bool:
        """Whether another server that is up serves `model` (one not `tried`)."""
        return any(s not in tried and s.up and (model is None or s.serves(model))
                   for s in self.servers)

    def listed(self, up_only: bool = True) -> list[str]:
        """The models the servers serve (those up only, by default) and the aliases, sorted."""
        names = {m for s in self.servers if s.up or not up_only for m in s.models}
        aliases = {a for a, target in self.aliases.items()
                   if any((s.up or not up_only) and s.serves(target) for s in self.servers)}
        return sorted(names | aliases)

    def owner(self, model: str) -> str:
        """The names of the servers up that serve a model (or an alias's target), for the
        model lists."""
        target = self.aliases.get(model, model)
        return ",".join(s.name for s in self.servers if s.up and s.serves(target)) or "llm_proxy"

    def tick(self) -> None:
        """Probe the servers that are down once their back-off has passed, and read the model
        lists of those the file gives none every MODELS_REFRESH_SECONDS."""
        if not self.several:
            return
        now, every = self.clock(), self.config.models_refresh_seconds
        timeout = min(PROBE_TIMEOUT, self.config.open_timeout)
        for server in self.servers:
            if server.up:
                due = server.spec.models is None and (server.refreshed is None
                                                      or now - server.refreshed >= every)
            else:
                due = server.health.probe_due()
            if not due:
                continue
            server.refreshed = now
            if server.probe(timeout):
                server.health.answered()
            else:
                server.failed()

    def gates(self) -> list[FairGate]:
        return [s.gate for s in self.servers if s.gate is not None]

    def close(self) -> None:
        for server in (*self.servers, *self.retired):
            server.close()


class Ticker:
    """A daemon thread calling `tick` every `interval` seconds until close()."""

    def __init__(self, tick: Callable[[], None], interval: float, name: str) -> None:
        self._tick, self._interval = tick, interval
        self._closing = threading.Event()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while not self._closing.wait(self._interval):
            self._tick()

    def close(self) -> None:
        self._closing.set()



# ########################################################################### relay ####

# The answer's head and body go to the client as they arrive, never buffered whole. What the
# client's copy of the body looks like is decided once (choose_framing); a body transform (the
# usage meter) may rewrite pieces on the way, and the relay knows nothing of what it does. Once
# the head is out the relay reports how it ended instead of raising.

NONE, LENGTH, CHUNKED, CLOSE = "none", "length", "chunked", "close"


class Framing(typing.NamedTuple):
    """How the client's copy of a response body is delimited: not at all (NONE: no body), by
    Content-Length (LENGTH), in chunks (CHUNKED), or by closing the connection (CLOSE)."""
    kind: str
    length: int | None = None


def choose_framing(*, status: int, method: str, http11: bool, upstream_length: int | None,
                   length_kept: bool) -> Framing:
    """The framing of the relayed body. The upstream's length is kept when the upstream sent
    one and nothing changes the body's length; otherwise an HTTP/1.1 client gets chunks and an
    HTTP/1.0 client a body that ends when the connection does."""
    if status in _NO_BODY_STATUSES or method == "HEAD":
        return Framing(NONE)
    if upstream_length is not None and length_kept:
        return Framing(LENGTH, upstream_length)
    return Framing(CHUNKED) if http11 else Framing(CLOSE)


def frame_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 section 7.1)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


class BodyTransform(Protocol):
    """What the relay asks of a body transform: feed() takes each piece read from the upstream
    and returns what to relay now; finish() returns what is left at the end; held() what whole
    events it holds back, to go out before the error event of a body that broke off."""

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...

    def held(self) -> bytes: ...


def held_back(transform: BodyTransform | None, chunked: bool) -> bytes:
    """The whole events a transform holds, framed, for a body that ends short."""
    data = transform.held() if transform is not None else b""
    return frame_chunk(data) if data and chunked else data


#: How a relay ended.
WHOLE = "whole"                 # the body went out whole
CLIENT_GONE = "client gone"     # the client went away (or stopped reading)
UPSTREAM_BROKE = "broke off"    # the upstream's body stopped before its end (reset, bad framing)
UPSTREAM_SILENT = "timeout"     # the upstream sent nothing for READ_TIMEOUT


class RelayEnd(typing.NamedTuple):
    """How a relay ended (one of the four above), and what the caller needs to know of it."""
    how: str
    sent: bool = True           # whether anything (the head first) went out to the client
    detail: str = ""            # the failure's name, for the access log
    tail: bytes = b""           # WHOLE: the bytes that complete the answer, not yet written


def relay(resp: _UpstreamResponse, upstream: socket.socket, write: Callable[[bytes], None],
          head: bytes, framing: Framing, transform: BodyTransform | None,
          watch: socket.socket | None, read_timeout: float) -> RelayEnd:
    """Send `head` with the first piece of the body, then each piece as it arrives, framed as
    `framing` says, except the bytes that complete the answer: those come back in the
    RelayEnd's `tail`, for the caller to write once the request's charge is closed. A stream is
    generated while it is relayed: with `watch` (the client's socket) the client is watched
    between pieces so that its going away closes the upstream at once, which stops generation.
    A plain body was generated before its head was sent, so it is simply read (READ_TIMEOUT
    still applies). `write` raises ClientGone."""
    chunked = framing.kind == CHUNKED
    try:
        while resp.fp is not None and (resp.chunked or resp.length != 0):
            if watch is not None and not _buffered(resp, upstream):
                if not wait_readable(upstream, watch, read_timeout):
                    watch = None
            piece = resp.read1(READ_CHUNK)
            if not piece:
                break
            if transform is not None:
                piece = transform.feed(piece)
                if not piece:
                    continue
            data = frame_chunk(piece) if chunked else piece
            if resp.length == 0 and not chunked:  # the last piece of a sized body
                head += data
                break
            write(head + data if head else data)  # the head goes with the first piece
            head = b""
        resp.close()
        rest = transform.finish() if transform is not None else b""
        tail = head + ((frame_chunk(rest) if rest else b"") + LAST_CHUNK if chunked else rest)
    except ClientGone:
        return RelayEnd(CLIENT_GONE)
    except (UpstreamTimeout, socket.timeout, TimeoutError):
        return RelayEnd(UPSTREAM_SILENT, not head, "timeout", held_back(transform, chunked))
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return RelayEnd(UPSTREAM_BROKE, not head, type(exc).__name__,
                        held_back(transform, chunked))
    return RelayEnd(WHOLE, True, "", tail)


def _buffered(resp: _UpstreamResponse, sock: socket.socket) -> bool:
    """Whether the response already holds unread bytes (so waiting on the socket would stall).

    http.client reads through a BufferedReader; peek_now looks at it without waiting.
    """
    fp = resp.fp
    if fp is None:
        return True
    try:
        data = peek_now(fp, sock) or b""
    except (OSError, ValueError):  # (a reset: the read that follows says so)
        return False
    if resp.chunked and resp.chunk_left == 0 and b"\r\n".startswith(data):
        return False  # only the CRLF that ends the last chunk: the next one is still to come
    return bool(data)


# -- the stream relay: one thread for every stream body ------------------------------------

# A stream is generated while it is relayed, a few dozen bytes at a time, for seconds or
# minutes; a busy model server writes tens of thousands of events a second to a few hundred
# clients. Relayed by the thread that read its request, each event costs a poll, a receive, a
# send and two hand-offs of the interpreter lock between hundreds of threads. The stream relay
# is one thread that owns every stream body once its head is out: the upstream and client
# sockets of all of them in one epoll set, read and written without blocking (MSG_DONTWAIT),
# each event a receive and a send in a loop that hands the lock to nobody. The handler's thread
# waits until its stream has ended and carries on as after relay(): the charge closes, the
# tail is written. Plain-TCP upstreams on Linux only (a TLS socket cannot be read without
# blocking this way); other streams and every plain body keep relay().

STREAM_OUT_LIMIT = 256 * 1024   # bytes held for a slow client before its upstream is paused
SWITCH_INTERVAL = 0.0005        # seconds a thread may hold the interpreter lock while streams
                                # are relayed (see StreamRelay.pace)
RELAY_TICK = 0.1                # how often the stream relay looks at its deadlines (seconds)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


class BodyReader:
    """An upstream body decoded from pieces split anywhere, by its own framing: chunked (RFC
    9112 section 7.1; extensions and trailers read and dropped), a Content-Length, or the
    connection's end (length None). feed() returns the data the piece completes; `done` once
    the body is whole, `extra` what came after it (bytes no request asked for). Bad chunked
    framing raises ValueError."""

    __slots__ = ("chunked", "left", "done", "extra", "_buf", "_data", "_crlf", "_trailers")

    def __init__(self, chunked: bool, length: int | None) -> None:
        self.chunked = chunked
        self.left = None if chunked else length     # bytes to go of a sized body
        self.done = not chunked and length == 0
        self.extra = b""
        self._buf = b""             # an incomplete size or trailer line
        self._data = 0              # bytes to go of the current chunk's data
        self._crlf = False          # the CRLF after a chunk's data is due
        self._trailers = False      # the last chunk has come: trailer lines until an empty one

    def feed(self, data: bytes) -> bytes:
        if self.chunked:
            return self._chunks(data)
        left = self.left
        if left is not None:
            if len(data) >= left:
                data, self.extra = data[:left], data[left:]
                self.done = True
            self.left = left - len(data)
        return data

    def whole_chunk(self, data: bytes) -> bytes | None:
        """When the body is chunked, between chunks, and `data` is exactly one chunk of data
        (a stream's usual read: one event), that chunk's data; else None (feed() it)."""
        if self._buf or self._data or self._crlf or self._trailers or not self.chunked:
            return None
        eol = data.find(b"\r\n", 0, 18)
        if eol <= 0 or not data.endswith(b"\r\n") or not _HEX.fullmatch(data, 0, eol):
            return None
        size = int(data[:eol], 16)
        if not size or size != len(data) - eol - 4:
            return None
        return data[eol + 2:-2]

    @property
    def announced(self) -> int:
        """Bytes of data the current chunk has announced that are still to come."""
        return self._data

    @property
    def ends_with_connection(self) -> bool:
        """Whether the upstream's closing the connection is the body's proper end."""
        return not self.chunked and self.left is None

    def _chunks(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while pos < end:
            if self._data:                              # inside a chunk's data
                stop = min(end, pos + self._data)
                out.append(buf[pos:stop])
                self._data -= stop - pos
                self._crlf = not self._data
                pos = stop
                continue
            if self._crlf:                              # the CRLF that ends the data
                if end - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ValueError("chunk data not followed by CRLF")
                self._crlf = False
                pos += 2
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if end - pos > MAX_CHUNK_LINE:
                    raise ValueError("chunk size line too long")
                break
            line = buf[pos:eol]
            pos = eol + 2
            if self._trailers:
                if not line:                            # the end of the body
                    self.done, self.extra, pos = True, buf[pos:], end
                continue
            size = line.split(b";", 1)[0].strip()
            if not _HEX.fullmatch(size):
                raise ValueError("invalid chunk size")
            self._data = int(size, 16)
            self._trailers = not self._data
        self._buf = buf[pos:] if pos < end else b""
        return out[0] if len(out) == 1 else b"".join(out)


class StreamJob:
    """One stream body in the stream relay: both sockets, the body's reader, the transform,
    the bytes waiting for a slow client, its deadlines, and how it ended (`end`, set once)."""

    __slots__ = ("upstream", "client", "body", "transform", "chunked", "head", "out",
                 "paused", "read_timeout", "send_timeout", "read_by", "write_by", "owed", "sent",
                 "end", "error", "done", "up_mask", "client_mask", "mark", "received")

    def __init__(self, upstream: socket.socket, client: socket.socket, body: BodyReader,
                 transform: BodyTransform | None, chunked: bool, head: bytes,
                 read_timeout: float, send_timeout: float, now: float,
                 mark: Callable[[socket.socket, str], None]) -> None:
        self.upstream, self.client = upstream, client
        self.body, self.transform, self.chunked = body, transform, chunked
        self.head = head                # held until the first piece of the body goes with it
        self.out = bytearray()          # what the client has not taken yet
        self.paused = False             # the upstream is not read while `out` is full
        self.read_timeout, self.send_timeout = read_timeout, send_timeout
        self.read_by = now + read_timeout
        self.write_by = 0.0             # when the client must have taken `owed` more bytes
        self.owed = 0                   # what `out` held when write_by was set, less what went
        self.sent = False               # the head has gone (or is waiting in `out`)
        self.end: RelayEnd | None = None
        self.error: BaseException | None = None  # a bug, raised again in the handler's thread
        self.done = threading.Event()
        self.up_mask = self.client_mask = -1     # what epoll watches (-1: not registered)
        self.mark = mark
        self.received = 0               # bytes read from the upstream (see SocketReader.arrived)

    # -- from the upstream ------------------------------------------------------------------

    def take(self, data: bytes, now: float) -> None:
        """Bytes from the upstream: decoded, transformed, framed, sent or held. OSError: the
        client is gone; ValueError: the upstream's framing is broken."""
        self.read_by = now + self.read_timeout
        piece = self.body.whole_chunk(data)
        if piece is None:
            piece = self.body.feed(data)
        elif self.transform is None and self.chunked:
            return self.send(data, now)  # one whole chunk, relayed as it came
        if piece and self.transform is not None:
            piece = self.transform.feed(piece)
        if piece:
            self.send(frame_chunk(piece) if self.chunked else piece, now)
        if self.body.done:
            self.finish()

    def upstream_closed(self) -> None:
        if self.body.ends_with_connection:
            self.finish()
        else:
            self.stop(UPSTREAM_BROKE, "IncompleteRead")

    def finish(self) -> None:
        """The body is whole: what completes the answer (held bytes, the transform's rest,
        the last chunk) is the tail, written by the handler once the charge is closed."""
        rest = self.transform.finish() if self.transform is not None else b""
        if self.chunked:
            rest = (frame_chunk(rest) if rest else b"") + LAST_CHUNK
        self.end = RelayEnd(WHOLE, self.sent, tail=self.head + bytes(self.out) + rest)

    def stop(self, how: str, detail: str = "") -> None:
        """The stream ends short: what was held for the client goes before the error event."""
        held = held_back(self.transform, self.chunked) if how != CLIENT_GONE else b""
        self.end = RelayEnd(how, self.sent, detail, bytes(self.out) + held)

    # -- to the client ----------------------------------------------------------------------

    def send(self, data: bytes, now: float) -> None:
        """Send without waiting; what the client does not take now waits in `out`, and the
        upstream is paused while `out` holds more than STREAM_OUT_LIMIT."""
        if self.head:
            data, self.head, self.sent = self.head + data, b"", True
        if self.out:
            self.out += data
        else:
            try:
                sent = self.client.send(data, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == len(data):
                return
            self.out += memoryview(data)[sent:]
            self.write_by, self.owed = now + self.send_timeout, len(self.out)
            self.mark(self.client, WRITING)
        if len(self.out) > STREAM_OUT_LIMIT:
            self.paused = True

    def flush(self, now: float) -> None:
        """The client can take more."""
        try:
            sent = self.client.send(self.out, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        del self.out[:sent]
        self.owed -= sent
        if not self.out:
            self.mark(self.client, BUSY)
        elif self.owed <= 0:  # what was held has gone in time: the rest gets SEND_TIMEOUT
            self.write_by, self.owed = now + self.send_timeout, len(self.out)
        if self.paused and len(self.out) <= STREAM_OUT_LIMIT // 2:
            self.paused = False
            self.read_by = now + self.read_timeout  # (it was not silent: it was not read)

    def deadline_passed(self, now: float) -> bool:
        if self.out and now >= self.write_by:
            self.stop(CLIENT_GONE, "slow reader")
        elif not self.paused and now >= self.read_by:
            self.stop(UPSTREAM_SILENT, "timeout")
        return self.end is not None


_UP_EVENTS = select.EPOLLIN if hasattr(select, "epoll") else 0
_CLIENT_EVENTS = select.EPOLLRDHUP if hasattr(select, "epoll") else 0
_GONE_EVENTS = (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
                if hasattr(select, "epoll") else 0)
_WRITABLE = select.EPOLLOUT if hasattr(select, "epoll") else 0


class StreamRelay:
    """The thread that relays every stream body (see the section's note). relay() is called
    from a handler's thread and returns when the stream has ended, as relay() does; takes()
    says whether an answer can be relayed here. A client's hang-up (EPOLLRDHUP) ends its
    stream and shuts its upstream connection at once, which stops generation; a client that
    stops reading gets STREAM_OUT_LIMIT bytes held, then its upstream is no longer read (the
    model server feels the back-pressure, memory does not), and SEND_TIMEOUT later it is
    given up. An upstream silent for READ_TIMEOUT, or whose body breaks off, ends the stream
    with the bytes held so far for the client's last error event."""

    available = hasattr(select, "epoll")

    def __init__(self, send_timeout: float, clock: Callable[[], float] = time.monotonic,
                 mark: Callable[[socket.socket, str], None] = lambda sock, state: None) -> None:
        self.send_timeout = send_timeout
        self.clock = clock
        self.mark = mark
        self._epoll = select.epoll()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._epoll.register(self._wake_read, select.EPOLLIN)
        self._lock = threading.Lock()
        self._new: list[StreamJob] = []
        self._fds: dict[int, tuple[StreamJob, bool]] = {}   # fd -> (job, whether upstream)
        self._jobs: set[StreamJob] = set()
        self._closing = False
        self.relayed = 0        # streams taken so far
        self.switch_interval: float | None = None  # main() sets SWITCH_INTERVAL (see pace)
        self._usual_interval = sys.getswitchinterval()
        self._paced = False
        self._thread = threading.Thread(target=self._run, name="llm_proxy-streams",
                                        daemon=True)
        self._thread.start()

    @staticmethod
    def takes(answer: "Answer", client: socket.socket) -> bool:
        """Plain sockets on both sides, and nothing of the body read yet but into the
        connection's own buffer."""
        return (type(answer.conn.sock) is socket.socket and type(client) is socket.socket
                and answer.resp.fp is answer.conn.reader)

    def relay(self, answer: "Answer", client: socket.socket, head: bytes, framing: Framing,
              transform: BodyTransform | None, read_timeout: float) -> RelayEnd:
        """Relay one stream's body (relay()'s contract). What the upstream has already sent
        is taken here, in the handler's thread, and goes out with the head: the first event
        waits for no hand-off."""
        resp, conn = answer.resp, answer.conn
        with self._lock:
            self.relayed += 1
        job = StreamJob(conn.sock, client, BodyReader(bool(resp.chunked), resp.length),
                        transform, framing.kind == CHUNKED, head, read_timeout,
                        self.send_timeout, self.clock(), self.mark)
        resp.fp = None  # type: ignore[assignment]  # (read here from now on; closed when done)
        try:
            first = peek_now(conn.reader, conn.sock) or b""
        except OSError as exc:
            first = b""
            job.stop(UPSTREAM_BROKE, type(exc).__name__)
        try:
            if job.end is not None:
                pass
            elif first:
                conn.reader.read(len(first))
                job.take(first, self.clock())
            elif job.body.done:
                job.finish()
        except ValueError:
            job.stop(UPSTREAM_BROKE, "invalid chunked framing")
        except OSError:  # (the client's send)
            job.stop(CLIENT_GONE)
        if job.end is None:
            with self._lock:
                if self._closing:
                    raise RuntimeError("the stream relay is closed")
                self._new.append(job)
            self._wake()
            job.done.wait()
            if job.error is not None:
                raise job.error
        assert job.end is not None
        conn.raw.received += job.received  # (read here, not through the connection's reader)
        if job.end.how == CLIENT_GONE:
            shut(conn.sock)
        elif job.end.how == WHOLE and job.body.extra:
            resp.will_close = True  # bytes no request asked for: never reused
        return job.end

    def held(self) -> list[int]:
        """How many bytes each stream under way holds for its client (a copy)."""
        with self._lock:
            jobs = list(self._jobs)
        return [len(job.out) for job in jobs]

    def paused(self) -> int:
        """How many streams have their upstream paused for a slow client."""
        with self._lock:
            return sum(job.paused for job in self._jobs)

    def close(self) -> None:
        """Stop the thread once the streams it holds have ended (the server stops them)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._wake()
        self._thread.join(5)

    def running(self) -> bool:
        """Whether the relay's thread is still running (it ends after close())."""
        return self._thread.is_alive()

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                return self._loop()
            except Exception as exc:  # a bug: every stream ends, its handler raises it
                with self._lock:
                    jobs, self._new = list(self._jobs) + self._new, []
                for job in jobs:
                    job.error = exc
                    job.stop(UPSTREAM_BROKE, type(exc).__name__)
                    self._release(job)

    def _loop(self) -> None:
        poll, fds, clock = self._epoll.poll, self._fds, self.clock
        next_tick = 0.0
        while True:
            events = poll(RELAY_TICK if fds else -1)
            now = clock()
            woken = False
            for fd, mask in events:
                entry = fds.get(fd)
                if entry is None:  # the wake-up pipe (or a job that ended in this round)
                    woken = woken or fd == self._wake_read
                    continue
                job, upstream = entry
                try:
                    if upstream:
                        self._from_upstream(job, now)
                    elif mask & _GONE_EVENTS:
                        job.stop(CLIENT_GONE)
                    else:
                        try:
                            job.flush(now)
                        except OSError:
                            job.stop(CLIENT_GONE)
                except Exception as exc:  # a bug: the handler's thread raises it
                    job.error = exc
                    job.stop(UPSTREAM_BROKE, type(exc).__name__)
                if job.end is not None:
                    self._release(job)
                else:
                    self._watch(job)
            if woken:  # (after the round: its events are all old jobs')
                self._admit(now)
            if now >= next_tick:
                next_tick = now + RELAY_TICK
                for job in [j for j in self._jobs if j.deadline_passed(now)]:
                    self._release(job)
            self.pace()
            if self._closing and not self._jobs and not self._new:
                return self._shut_down()

    def pace(self) -> None:
        """While streams are relayed, the switch interval is `switch_interval`; otherwise the
        interpreter's usual one. This thread holds the interpreter lock but for its system
        calls, and a handler thread that wakes up (a new request, an answer's head) waits for
        it until the switch interval forces a hand-off: 5 ms by default, several times per
        request (at 0.5 ms the fan-out figure's time to first event p99 went from 21 to 12 ms).
        Without streams this thread sleeps in epoll, and the short interval only makes the
        handler threads hand the lock to one another more often: at 64 connections, 5 to 10 %
        more CPU per plain request (tools/bench_llm_proxy.py with wrk)."""
        busy = bool(self._fds)
        if self.switch_interval is not None and busy != self._paced:
            self._paced = busy
            sys.setswitchinterval(self.switch_interval if busy else self._usual_interval)

    @staticmethod
    def _from_upstream(job: StreamJob, now: float) -> None:
        try:
            data = job.upstream.recv(READ_CHUNK, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            return job.stop(UPSTREAM_BROKE, type(exc).__name__)
        if not data:
            return job.upstream_closed()
        job.received += len(data)
        try:
            job.take(data, now)
        except ValueError:
            job.stop(UPSTREAM_BROKE, "invalid chunked framing")
        except OSError:
            job.stop(CLIENT_GONE)

    def _admit(self, now: float) -> None:
        """New jobs into the epoll set."""
        try:
            os.read(self._wake_read, 4096)
        except BlockingIOError:
            pass
        with self._lock:
            new, self._new = self._new, []
        for job in new:
            job.read_by = now + job.read_timeout
            with self._lock:
                self._jobs.add(job)
            self._fds[job.upstream.fileno()] = (job, True)
            self._fds[job.client.fileno()] = (job, False)
            self._watch(job)

    def _watch(self, job: StreamJob) -> None:
        """Tell epoll what the job waits for now: the upstream's bytes unless paused, the
        client's hang-up, and room to write while bytes are held."""
        up = 0 if job.paused else _UP_EVENTS
        client = _CLIENT_EVENTS | _WRITABLE if job.out else _CLIENT_EVENTS
        try:
            if up != job.up_mask:
                self._set(job.upstream, up, job.up_mask < 0)
                job.up_mask = up
            if client != job.client_mask:
                self._set(job.client, client, job.client_mask < 0)
                job.client_mask = client
        except (OSError, ValueError) as exc:  # (a socket closed under it)
            job.stop(UPSTREAM_BROKE, type(exc).__name__)
            self._release(job)

    def _set(self, sock: socket.socket, mask: int, new: bool) -> None:
        if new:
            self._epoll.register(sock, mask)
        else:
            self._epoll.modify(sock, mask)

    def _release(self, job: StreamJob) -> None:
        """The job has ended: out of the epoll set; a client that went away has its upstream
        connection shut at once (generation stops); the handler's thread carries on."""
        with self._lock:
            self._jobs.discard(job)
        for sock, mask in ((job.upstream, job.up_mask), (job.client, job.client_mask)):
            if self._fds.pop(sock.fileno(), None) is not None and mask >= 0:
                try:
                    self._epoll.unregister(sock)
                except (OSError, ValueError):
                    pass
        if job.end is not None and job.end.how == CLIENT_GONE:
            shut(job.upstream)
        if job.out:
            self.mark(job.client, BUSY)
        job.done.set()

    def _shut_down(self) -> None:
        self._epoll.close()
        os.close(self._wake_read)
        os.close(self._wake_write)


def shut(sock: socket.socket) -> None:
    """Shut both directions of a connection now (its file descriptor is closed by its owner)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def response_headers(resp: _UpstreamResponse,
                     quota: Quota | None) -> list[tuple[str, str]]:
    """The upstream's headers minus hop-by-hop ones and those the proxy sets itself; with the
    proxy's X-RateLimit-* for a charged request."""
    dropped = NOT_FORWARDED_DOWN if quota is None else _NOT_FORWARDED_CHARGED
    received = resp.headers
    assert received is not None  # (begin() has read them)
    named = received.connection_tokens()
    if named:
        dropped = dropped | named
    headers = received.without(dropped)
    if quota is not None:
        headers += rate_limit_headers(quota)
    return headers


_NOT_FORWARDED_CHARGED = NOT_FORWARDED_DOWN | {n.lower() for n in RATE_LIMIT_HEADERS}
_STREAM_TYPE = re.compile(r"text/event-stream|application/x-ndjson", re.IGNORECASE)


def is_stream(resp: _UpstreamResponse) -> bool:
    """Whether the answer is generated while it is relayed (server-sent events, or Ollama's
    lines of JSON)."""
    return _STREAM_TYPE.search(resp.getheader("Content-Type") or "") is not None


class ClientSide(Protocol):
    """What relay_answer needs of the client's connection (ProxyHandler provides it)."""
    connection: socket.socket
    close_connection: bool
    request_version: str

    def response_head(self, ex: Exchange, status: int, reason: str,
                      headers: list[tuple[str, str]]) -> bytes: ...

    def write(self, ex: Exchange, data: bytes) -> None: ...


def relay_answer(ex: Exchange, answer: Answer, client: ClientSide, read_timeout: float,
                 metrics: "Metrics", streams: StreamRelay | None = None) -> bool:
    """Relay the upstream's answer (status, headers, body) and record how it ended in
    ex.ending. Returns whether the body was read whole (the upstream connection can be reused);
    the bytes that complete the answer are left in ex.tail, written once the charge is closed.

    Before anything went out, a failure is still a clean error (ProxyError); after, a stream
    gets its API's last error event and a terminated body, and the connection is closed. A
    client that went away raises ClientGone.
    """
    resp = answer.resp
    charge = ex.charge
    meter = charge.meter if charge is not None else None
    stream = is_stream(resp)
    if meter is not None:
        meter.begin(resp.status, resp.getheader("Content-Encoding"), stream)
    headers = response_headers(resp, charge.quota if charge is not None else None)
    framing = choose_framing(status=resp.status, method=ex.method,
                             http11=client.request_version == "HTTP/1.1",
                             upstream_length=None if resp.chunked else resp.length,
                             length_kept=meter is None or not meter.strip)
    if framing.kind == LENGTH:
        headers.append(("Content-Length", str(framing.length)))
    elif framing.kind == CHUNKED:
        headers.append(("Transfer-Encoding", "chunked"))
    elif framing.kind == CLOSE:
        client.close_connection = True
    head = client.response_head(ex, resp.status, resp.reason, headers)
    if framing.kind == NONE:
        resp.close()
        end = RelayEnd(WHOLE, tail=head)
    else:
        if stream and streams is not None and streams.takes(answer, client.connection):
            end = streams.relay(answer, client.connection, head, framing, meter, read_timeout)
            ex.head_sent = ex.head_sent or end.sent
        else:
            end = relay(resp, answer.conn.sock, lambda data: client.write(ex, data), head,
                        framing, meter, client.connection if stream else None, read_timeout)
    if end.how == WHOLE:
        _ended(ex, ANSWERED)
        ex.tail = end.tail
        return True
    if end.how == CLIENT_GONE:
        _ended(ex, LEFT)
        raise ClientGone()
    client.close_connection = True
    timed_out = end.how == UPSTREAM_SILENT
    metrics.inc("llm_proxy_upstream_errors_total", (("kind", "timeout" if timed_out else "broken"),))
    message = ("The proxy is shutting down; the response was cut short." if answer.cut else
               "The upstream server stopped sending the response." if timed_out else
               "The upstream server broke off the response.")
    if not end.sent:  # nothing went out yet: a plain error is still possible
        _ended(ex, NO_ANSWER)
        raise ProxyError(HTTPStatus.GATEWAY_TIMEOUT if timed_out else HTTPStatus.BAD_GATEWAY,
                         message, type="server_error",
                         code="upstream_timeout" if timed_out else "upstream_error")
    _ended(ex, BROKEN)
    ex.note = "cut short: the proxy is stopping" if answer.cut else \
        f"upstream broke off: {end.detail}"
    # What the stream relay held for the client goes first; a chunked stream then ends with its
    # API's last error event, any other body with the closed connection.
    last = frame_chunk(ex.api.broken_stream_event(message)) + LAST_CHUNK \
        if framing.kind == CHUNKED and stream else b""
    if end.tail or last:
        try:
            client.write(ex, end.tail + last)
        except ClientGone:
            pass  # the client is gone too; the connection closes either way
    return False


def _ended(ex: Exchange, ending: str) -> None:
    """Record how the upstream part ended; what the upstream's status said (FAILED, REFUSED)
    stays what it was."""
    if ex.ending not in (FAILED, REFUSED):
        ex.ending = ending


# ################################################################### local answers ####

# Routes the proxy answers itself (kind LOCAL or ADMIN in the route table, or a forwarded route
# whose `answer` may stand in for the upstream). Each is a function of the server, the exchange
# and the request's headers that returns the Reply; None lets a forwarded route go upstream.

def answer_health(server: "ProxyServer", ex: Exchange, headers: Headers) -> Reply:
    """{"ok": true, "quota": …, "usage": …, "store": …, "state": …} for the caller's bucket,
    without creating one. A caller without a key gets no quota when keys are required (a
    liveness probe). "ok" is false while requests are refused for want of the store (closed
    mode); "state" (when the state is kept: STATE_DB, or the ledger in Redis) says whether it
    is being written, and if not, for how long (why is for the admin: /admin/overview):
    requests go on, but a restart would not see what they changed."""
    answer: dict[str, object] = {"ok": True}
    store = server.store
    try:
        if client_key(headers) or not server.keys:
            who = identify(headers, server.keys, server.default_policy, ex.client,
                           server.config.trust_forwarded_for, server.calendar.wall())
            ex.label, ex.bucket_key = who.label, who.bucket_key
            policy = who.policy.bucket
            quota = store.peek(who.bucket_key, policy)
            answer["quota"] = {
                "limit": quota.limit, "remaining": quota.remaining,
                "reset_seconds": math.ceil(quota.reset_seconds),
                "refill_tokens": policy.refill_tokens,
                "refill_interval_seconds": policy.refill_interval,
            }
            answer["usage"] = store.usage(who.bucket_key)
    except StoreUnavailable:
        answer["ok"] = False
    answer["store"] = store.status()
    if server.writer is not None:
        answer["state"] = server.writer.status()
    return json_reply(HTTPStatus.OK, answer)


def is_admin(server: "ProxyServer", ex: Exchange, headers: Headers) -> bool:
    """Whether the request comes from the administrator: it carries ADMIN_API_KEY, or, when
    that is unset, it comes from this machine."""
    admin_key = server.config.admin_api_key
    if admin_key:
        return hmac.compare_digest(key_digest(client_key(headers)), key_digest(admin_key))
    # A request that came through another proxy (nginx on the same host, say) comes from
    # loopback whoever sent it: it is never "local". Nor is one for another host name: a web
    # page whose name was made to resolve to 127.0.0.1 (DNS rebinding) reaches the proxy from
    # this machine, but under its own name.
    return is_loopback(ex.client) and "X-Forwarded-For" not in headers \
        and "Forwarded" not in headers and is_loopback_host(headers.get("Host") or "")


_LOOPBACK_HOST = re.compile(r"(localhost|127(\.[0-9]{1,3}){3}|0\.0\.0\.0|\[::1\])(:[0-9]{1,5})?",
                            re.IGNORECASE)


def is_loopback_host(host: str) -> bool:
    """Whether a Host header names this machine (localhost, 127.x.y.z, 0.0.0.0 (which Linux
    connects to this machine), [::1], any port)."""
    return _LOOPBACK_HOST.fullmatch(host.strip()) is not None


def check_admin(server: "ProxyServer", ex: Exchange, headers: Headers) -> None:
    """Admin routes are for ADMIN_API_KEY holders, or, when it is unset, for clients on this
    machine only (anyone else gets 404, as if they did not exist)."""
    if is_admin(server, ex, headers):
        return
    if server.config.admin_api_key:
        raise ProxyError(HTTPStatus.UNAUTHORIZED, "This route needs the admin key.",
                         code="invalid_api_key")
    raise ProxyError(HTTPStatus.NOT_FOUND, f"Invalid URL ({ex.method} {ex.path}).",
                     code="unknown_url")


def same_origin(origin: str, host: str | None) -> bool:
    """Whether a request's Origin is the proxy's own page (the scheme it serves, http, and the
    Host the request was sent to): the dashboard's own writes. Any other origin is refused."""
    return host is not None and origin.strip().lower() in (
        "http://" + host.strip().lower(), "https://" + host.strip().lower())


def check_manager(server: "ProxyServer", ex: Exchange, headers: Headers) -> None:
    """Model management (pull, push, create, copy, delete) is forwarded for the administrator
    only; anyone else gets 403."""
    if not is_admin(server, ex, headers):
        raise ProxyError(HTTPStatus.FORBIDDEN, "Model management is for the administrator of "
                         "this proxy.", type="permission_error", code="admin_only")


def answer_metrics(server: "ProxyServer", ex: Exchange, headers: Headers) -> Reply:
    return Reply(HTTPStatus.OK, (("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),),
                 server.render_metrics().encode())


def answer_admin_keys(server: "ProxyServer", ex: Exchange, headers: Headers) -> Reply:
    return json_reply(HTTPStatus.OK, {"keys": key_report(server),
                                      "buckets_held": len(server.store),
                                      "store": server.store.status()})


def key_report(server: "ProxyServer") -> list[dict[str, object]]:
    """Every accepted key's name, balance, limit, next refill and counters; no secret."""
    report: list[dict[str, object]] = []
    store = server.store
    for digest, policy in server.keys.entries:
        quota = store.peek(policy.bucket_key(digest), policy.bucket)
        report.append({
            "name": policy.name or short_hash(digest), "disabled": policy.disabled,
            "limit": quota.limit, "balance": quota.remaining,
            "next_refill_seconds": math.ceil(quota.reset_seconds),
            "refill_tokens": policy.bucket.refill_tokens,
            "refill_interval_seconds": policy.bucket.refill_interval,
            "token_cost_mode": policy.token_cost_mode,
            "models": sorted(policy.models) if policy.models is not None else None,
            **key_settings(server, policy), **store.usage(policy.bucket_key(digest))})
    return report


def answer_models(server: "ProxyServer", ex: Exchange, headers: Headers) -> Reply | None:
    """With BASE_MODEL set, the model list is that one model; with several servers
    (UPSTREAMS_FILE), the models of those up and the aliases, as far as the caller's key may
    use them; else the upstream's."""
    model = server.config.base_model
    if not model:
        router = server.forwarder.router
        if not router.several:
            return None
        return json_reply(HTTPStatus.OK, {"object": "list", "data": [
            _model_object(name, router.owner(name)) for name in usable_models(server, ex)]})
    return json_reply(HTTPStatus.OK, {"object": "list", "data": [_model_object(model)]})


def usable_models(server: "ProxyServer", ex: Exchange) -> list[str]:
    """The models of the servers that are up, and the aliases, that the caller's key may use."""
    router = server.forwarder.router
    allowed = ex.policy.models if ex.policy is not None else None
    return [name for name in router.listed() if may_use(allowed, name, router.aliases)]


def _model_object(model: str, owner: str = "llm_proxy") -> dict[str, object]:
    return {"id": model, "object": "model", "created": 0, "owned_by": owner}


def answer_model(server: "ProxyServer", ex: Exchange, headers: Headers) -> Reply | None:
    """With BASE_MODEL set, /v1/models/{id} knows that one model only; else the upstream's."""
    model = server.config.base_model
    assert ex.route is not None  # (a local answer is for a route found)
    asked = ex.path[len(ex.route.path):]  # (the row covers /v1/models/{id})
    if not model:
        if not server.forwarder.router.several:
            return None
        if asked not in usable_models(server, ex):
            raise ProxyError(HTTPStatus.NOT_FOUND, f"The model '{asked}' does not exist.",
                             param="model", code="model_not_found")
        return json_reply(HTTPStatus.OK, _model_object(asked,
                                                       server.forwarder.router.owner(asked)))
    if asked != model:
        raise ProxyError(HTTPStatus.NOT_FOUND, f"The model '{asked}' does not exist.",
                         param="model", code="model_not_found")
    return json_reply(HTTPStatus.OK, _model_object(model))


def answer_tags(server: "ProxyServer", ex: Exchange, headers: Headers) -> Reply | None:
    """With BASE_MODEL set, Ollama's model list (/api/tags) is that one model (named with a tag,
    as Ollama's clients expect); else the upstream's."""
    model = server.config.base_model
    if not model:
        if not server.forwarder.router.several:
            return None
        return json_reply(HTTPStatus.OK, {"models": [_tag_object(name) for name in
                                                     usable_models(server, ex)]})
    return json_reply(HTTPStatus.OK, {"models": [_tag_object(model)]})


def _tag_object(model: str) -> dict[str, object]:
    name = model if ":" in model else model + ":latest"
    return {"name": name, "model": name, "modified_at": "1970-01-01T00:00:00Z", "size": 0,
            "digest": "", "details": {}}


def answer_ps(server: "ProxyServer", ex: Exchange, headers: Headers) -> Reply | None:
    """With several servers (UPSTREAMS_FILE), Ollama's running models (/api/ps) are the
    models of the servers up and the aliases the caller may use (which is loaded where is
    each server's business); else the upstream's."""
    if not server.forwarder.router.several:
        return None
    return json_reply(HTTPStatus.OK, {"models": [
        {**_tag_object(name), "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0}
        for name in usable_models(server, ex)]})


def answer_preflight(server: "ProxyServer", ex: Exchange, headers: Headers) -> Reply:
    """CORS preflight from an allowed origin (CorsPolicy refused any other before this):
    allow whatever the browser asks for (x-stainless-* included)."""
    asked = headers.get("Access-Control-Request-Headers", "")
    return Reply(HTTPStatus.NO_CONTENT, (
        ("Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE, OPTIONS"),
        ("Access-Control-Allow-Headers", header_safe(asked or "") or "Authorization, Content-Type"),
        ("Access-Control-Max-Age", "86400"),
    ), None)


def answer_usage(server: "ProxyServer", ex: Exchange, headers: Headers) -> Reply:
    """GET /v1/usage: a key about itself, and nothing else: its bucket, each calendar quota
    (used, limit, resets at), and its own usage today and this month, by model."""
    if not client_key(headers):
        raise ProxyError(HTTPStatus.UNAUTHORIZED, "GET /v1/usage needs your key (as a bearer "
                         "token or x-api-key).", code="invalid_api_key")
    who = identify(headers, server.keys, server.default_policy, ex.client,
                   server.config.trust_forwarded_for, server.calendar.wall())
    ex.label, ex.bucket_key = who.label, who.bucket_key
    store, calendar = server.store, server.calendar
    bucket_key, bucket, limits = who.bucket_key, who.policy.bucket, who.policy.calendar
    users = who.policy.users
    if users is not None:  # a front end asking for one of its users
        raw = (headers.get(users.header) if users.header else
               (urllib.parse.parse_qs(ex.query).get("user") or [""])[-1])
        ex.user = user_name(raw, users.source if users.header else 'the "user" parameter')
        if ex.user:
            bucket_key = user_bucket_key(who.bucket_key, ex.user)
            bucket, limits = users.bucket, users.calendar
    quota = store.peek(bucket_key, bucket)
    now = calendar.wall()
    periods = calendar.periods(now)
    quotas = store.calendar(bucket_key, limits, periods) if limits else ()
    day_start, month_start = calendar.start_of(periods.day), calendar.start_of(periods.month)
    usage: dict[str, dict[str, dict[str, int]]] = {"today": {}, "this_month": {}}
    if users is not None and not ex.user:  # the key's usage: its own work and its users'
        rows = [(e, c) for e, c in server.usage_rows(month_start, now + 3600)
                if split_user(e.key)[0] == who.bucket_key]
    else:
        rows = server.usage_rows(month_start, now + 3600, bucket_key)
    for entry, counts in rows:
        for span, since in (("today", day_start), ("this_month", month_start)):
            if entry.hour >= since - 3599:  # (an hour that began before midnight counts on)
                totals = usage[span].setdefault(entry.model, dict.fromkeys(LEDGER_FIELDS, 0))
                for field, value in zip(LEDGER_FIELDS, counts):
                    totals[field] += value
    return json_reply(HTTPStatus.OK, {
        "key": who.label, **({"user": ex.user} if ex.user else {}),
        "bucket": {"limit": quota.limit, "balance": quota.remaining,
                   "next_refill_seconds": math.ceil(quota.reset_seconds),
                   "refill_tokens": bucket.refill_tokens,
                   "refill_interval_seconds": bucket.refill_interval},
        "quotas": [{"name": q.name, "limit": q.limit, "used": q.used, "remaining": q.remaining,
                    "resets_at": _iso(now + q.reset_seconds, calendar.tz),
                    "resets_in_seconds": math.ceil(q.reset_seconds)} for q in quotas],
        "usage": {span: {"by_model": by_model,
                         "total": {f: sum(m[f] for m in by_model.values())
                                   for f in LEDGER_FIELDS}}
                  for span, by_model in usage.items()},
        "timezone": calendar.zone, "version": __version__})


def _iso(moment: float, tz: datetime.tzinfo) -> str:
    return datetime.datetime.fromtimestamp(round(moment), tz).isoformat()


def answer_admin_usage(server: "ProxyServer", ex: Exchange, headers: Headers) -> Reply:
    """GET /admin/usage?since=...&until=...&by=key|model|day|hour&key=NAME&format=json|csv:
    the usage report of `llm_proxy.py usage`, for the admin."""
    query = urllib.parse.parse_qs(ex.query)
    arg = lambda name, default=None: (query.get(name) or [default])[-1]  # noqa: E731
    by, form = arg("by", "key"), arg("format", "json")
    if by not in REPORT_GROUPS or form not in ("json", "csv"):
        raise ProxyError(HTTPStatus.BAD_REQUEST, "by must be key, user, model, day or hour and format "
                         "json or csv.")
    try:
        since, until = report_window(server.calendar, arg("since"), arg("until"))
    except ConfigError as err:
        raise ProxyError(HTTPStatus.BAD_REQUEST, str(err)) from None
    rows = server.usage_rows(since, until)
    name = arg("key")
    if name is not None:
        rows = [(e, c) for e, c in rows if e.name == name]
    report = usage_report(rows, by, server.calendar)
    if form == "csv":
        return Reply(HTTPStatus.OK, (("Content-Type", "text/csv; charset=utf-8"),),
                     format_report(report, by, "csv").encode())
    return json_reply(HTTPStatus.OK, {"since": _iso(since, server.calendar.tz),
                                      "until": _iso(until, server.calendar.tz), "by": by,
                                      "rows": report})


# -- managing keys (POST/PATCH/DELETE /admin/keys..., GET /admin/audit) ----------------------

#: keys that expire within this many days are marked on the dashboard
EXPIRING_SOON_DAYS = 7


def admin_who(server: "ProxyServer", ex: Exchange, headers: Headers) -> tuple[str, str]:
    """Who made a change through the API, and from where, for the audit trail: the admin key's
    holder ("admin") or, without ADMIN_API_KEY, "local"; the peer's address, and "dashboard"
    when the proxy's own page sent it."""
    who = "admin" if server.config.admin_api_key else "local"
    return who, ex.client + (" (dashboard)" if headers.get("Origin") else "")


def key_settings(server: "ProxyServer", policy: KeyPolicy) -> dict[str, object]:
    """What the keys file says of a key beyond its numbers (created_at, expires_at, priority,
    max_concurrent, note, and its whole entry for the dashboard's edit form)."""
    entry = server.key_entry(policy.name) if policy.name else None
    if entry is None:
        return {"priority": policy.priority, "max_concurrent": policy.max_concurrent}
    shown = public_entry(entry, policy, server.calendar.wall())
    return {"created_at": shown.get("created_at"), "expires_at": shown.get("expires_at"),
            "expired": shown.get("expired", False),
            "expires_soon": shown.get("expires_soon", False), "priority": policy.priority,
            "max_concurrent": policy.max_concurrent, "note": shown.get("note"),
            "entry": shown}


def public_entry(entry: Mapping[str, object], policy: KeyPolicy | None,
                 now: float) -> dict[str, object]:
    """A keys-file entry as the API shows it: its fields without digests, and whether it has
    expired or expires within EXPIRING_SOON_DAYS."""
    shown = {f: v for f, v in entry.items()
             if f not in ("key", "key_sha256", "previous_key_sha256", "bucket_sha256")}
    if policy is not None and policy.expires_at is not None:
        shown["expired"] = now >= policy.expires_at
        shown["expires_soon"] = now < policy.expires_at <= now + EXPIRING_SOON_DAYS * 86400
    return shown


def _policy_named(server: "ProxyServer", name: str) -> KeyPolicy | None:
    return next((p for _, p in server.keys.entries if p.name == name), None)


def answer_admin_key_create(server: "ProxyServer", ex: Exchange, headers: Headers) -> Reply:
    """POST /admin/keys {"name": ..., fields}: 201 with the entry and its new secret under
    "key" (shown this once); 409 for a taken name, 400 naming a bad field."""
    payload = parse_json_object(ex.body or b"{}")
    name = payload.pop("name", None)
    if not isinstance(name, str) or not name.strip():
        raise _bad_field("name", _FIELD_RULES["name"])
    fields = checked_fields(payload, server.calendar.tz, removable=False)
    now = server.calendar.wall()
    who, origin = admin_who(server, ex, headers)
    secret = server.change_keys(lambda entries: add_entry(entries, name, fields, now),
                                who, origin, "added", name, ["key", *sorted(fields)])
    entry = server.key_entry(name) or {}
    return json_reply(HTTPStatus.CREATED, {
        **public_entry(entry, _policy_named(server, name), now), "key": secret})


def answer_admin_key(server: "ProxyServer", ex: Exchange, headers: Headers) -> Reply:
    """PATCH /admin/keys/NAME (fields; null removes one), DELETE /admin/keys/NAME (204),
    POST /admin/keys/NAME/rotate {"grace_seconds": N} (a new secret; the old one works N
    seconds more)."""
    assert ex.route is not None
    rest = ex.path[len(ex.route.path):]  # (the row covers what is below it)
    rotate = ex.method == "POST" and rest.endswith("/rotate")
    name = rest[:-len("/rotate")] if rotate else rest
    if not name or (ex.method == "POST" and not rotate) or "/" in name:
        raise ProxyError(HTTPStatus.NOT_FOUND, f"Invalid URL ({ex.method} {ex.path}).",
                         code="unknown_url")
    who, origin = admin_who(server, ex, headers)
    now = server.calendar.wall()
    if ex.method == "DELETE":
        server.change_keys(lambda entries: delete_entry(entries, name), who, origin,
                           "removed", name, [])
        return Reply(HTTPStatus.NO_CONTENT, (), b"")
    payload = parse_json_object(ex.body or b"{}")
    if rotate:
        grace = payload.get("grace_seconds", 0)
        if set(payload) - {"grace_seconds"}:
            raise _bad_field(sorted(set(payload) - {"grace_seconds"})[0], "absent (rotate "
                             "takes only grace_seconds)")
        if type(grace) not in (int, float) or not 0 <= grace <= 366 * 86400:
            raise _bad_field("grace_seconds", "a number of seconds from 0 to 31622400")
        secret = server.change_keys(
            lambda entries: rotate_entry(entries, name, float(grace), now), who, origin,
            "rotated", name, ["key"] + (["previous_valid_until"] if grace else []))
        entry = server.key_entry(name) or {}
        return json_reply(HTTPStatus.OK, {**public_entry(entry, _policy_named(server, name),
                                                         now), "key": secret})
    fields = checked_fields(payload, server.calendar.tz, removable=True)
    server.change_keys(lambda entries: change_entry(entries, name, fields), who, origin,
                       "changed", name, sorted(fields))
    entry = server.key_entry(name) or {}
    return json_reply(HTTPStatus.OK, public_entry(entry, _policy_named(server, name), now))


def answer_admin_audit(server: "ProxyServer", ex: Exchange, headers: Headers) -> Reply:
    """GET /admin/audit?since=DATE&limit=N: the changes to the keys, newest first."""
    query = urllib.parse.parse_qs(ex.query)
    since_text = query["since"][-1] if query.get("since") else None
    limit_text = (query.get("limit") or ["100"])[-1]
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 10_000:
        raise ProxyError(HTTPStatus.BAD_REQUEST, "limit must be a whole number from 1 to "
                         "10000.", param="limit")
    since = 0.0
    if since_text is not None:
        try:
            since = report_window(server.calendar, since_text, None)[0]
        except ConfigError as err:
            raise ProxyError(HTTPStatus.BAD_REQUEST, str(err), param="since") from None
    rows = server.audit.rows(since, int(limit_text))
    return json_reply(HTTPStatus.OK, {"audit": [r.as_json(server.calendar.tz) for r in rows]})


# -- the pages' answers ---------------------------------------------------------------------

# Two pages: the operator's dashboard (GET /admin) and a key holder's usage page (GET /usage).
# Their HTML, CSS and scripts are constants (page assets, at the end of this file) served from
# the proxy's own paths under a policy that lets nothing in from anywhere else; what they show
# comes from JSON routes: GET /admin/overview (below) and GET /v1/usage (above).

#: Headers of every page and script: nothing from elsewhere, no framing, no guessing types,
#: nothing cached (the admin page's numbers are live, and the pages change with the proxy).
NOT_FRAMED = (("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
              ("Referrer-Policy", "no-referrer"))
PAGE_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                                "form-action 'none'"), *NOT_FRAMED, NO_STORE)


def answer_page(server: "ProxyServer", ex: Exchange, headers: Headers) -> Reply:
    """A page or one of its scripts. The dashboard itself is for whoever may see the admin
    routes: with ADMIN_API_KEY it is a login form anyone may load (the data needs the key);
    without, it exists only for this machine, as the admin routes do."""
    assert ex.route is not None  # (a local answer is for a route found)
    asset = ex.route.asset
    if asset == "admin.html" and not server.config.admin_api_key:
        check_admin(server, ex, headers)
    ex.cors = ""  # (for no other site's page)
    content_type, body = PAGE_ASSETS[asset]
    return Reply(HTTPStatus.OK, (("Content-Type", content_type), *PAGE_HEADERS),
                 body.encode())


def answer_no_icon(server: "ProxyServer", ex: Exchange, headers: Headers) -> Reply:
    """Browsers ask every site for an icon: there is none (204, not a 404 in their console)."""
    return Reply(HTTPStatus.NO_CONTENT, (("Cache-Control", "max-age=86400"),), None)


def answer_admin_overview(server: "ProxyServer", ex: Exchange, headers: Headers) -> Reply:
    """GET /admin/overview: what the dashboard shows, in one answer (see overview())."""
    return Reply(HTTPStatus.OK, (("Content-Type", "application/json"), *NOT_FRAMED),
                 json.dumps(overview(server)).encode())  # (no-store: a private route's)


def overview(server: "ProxyServer") -> dict[str, object]:
    """Every key with its bucket, quotas, today's and this month's use and its requests under
    way; each model's use today and this month; the upstream's health; requests per minute over the last hour; tokens per day over
    the last 30 days by key; the store; the version."""
    calendar, store = server.calendar, server.store
    now = calendar.wall()
    periods = calendar.periods(now)
    day_start, month_start = calendar.start_of(periods.day), calendar.start_of(periods.month)
    first_day = (datetime.datetime.fromtimestamp(now, calendar.tz).date()
                 - datetime.timedelta(days=29))
    days = [(first_day + datetime.timedelta(days=i)).isoformat() for i in range(30)]
    since = calendar.start_of(days[0])
    # The hours that are over do not change: their tally is kept, and only the last two hours
    # are read from the ledger at each look (a month of 20 keys and 3 models is 43,000 rows).
    recent = int(now // 3600 * 3600) - 3600
    tally = server.tally(recent, day_start, lambda: LedgerTally(
        day_start, month_start, since, calendar.tz).add(
            server.usage_rows(min(since, month_start), recent)))
    tally.add(server.usage_rows(recent, now + 3600))
    per_key, names, per_day, per_model = tally.per_key, tally.names, tally.per_day, tally.per_model
    in_flight = server.forwarded_in_flight()
    waiting: dict[str, int] = {}
    for gate in {server.gate, *server.forwarder.router.gates()} - {None}:
        for bucket, count in gate.waiting_by_key().items():  # type: ignore[union-attr]
            waiting[bucket] = waiting.get(bucket, 0) + count
    listed = [(policy.bucket_key(digest), policy.name or short_hash(digest), policy)
              for digest, policy in server.keys.entries]
    known = {bucket for bucket, _, _ in listed}
    listed += [(bucket, names.get(bucket) or bucket_name(bucket), server.default_policy)
               for bucket in sorted({*per_key, *in_flight} - known)
               if not split_user(bucket)[1]][:MAX_OVERVIEW_KEYS]
    keys = []
    for bucket, name, policy in listed:
        try:
            quota: Quota | None = store.peek(bucket, policy.bucket)
            quotas = store.calendar(bucket, policy.calendar, periods) if policy.calendar else ()
        except StoreUnavailable:  # (the store's card says so; the rest is still worth seeing)
            quota, quotas = None, ()
        spans = per_key.get(bucket, {"today": [0, 0, 0], "this_month": [0, 0, 0]})
        keys.append({
            "name": name, "disabled": policy.disabled,
            "limit": policy.bucket.capacity if quota is None else quota.limit,
            "balance": None if quota is None else quota.remaining,
            "next_refill_seconds": None if quota is None else math.ceil(quota.reset_seconds),
            "refill_tokens": policy.bucket.refill_tokens,
            "refill_interval_seconds": policy.bucket.refill_interval,
            **{span: dict(zip(("tokens", "requests", "limited"), spans[span]))
               for span in ("today", "this_month")},
            "quotas": [{"name": q.name, "limit": q.limit, "used": q.used,
                        "remaining": q.remaining, "resets_in_seconds": math.ceil(q.reset_seconds)}
                       for q in quotas],
            "in_flight": max(0, in_flight.get(bucket, 0) - waiting.get(bucket, 0)),
            "waiting": waiting.get(bucket, 0), **key_settings(server, policy)})
        if policy.users is not None:  # a front end's key: its users, under it
            keys[-1]["users"] = users_overview(server, bucket, policy.users, per_key, periods)
    first_minute, minutes = server.metrics.recent.window()
    stacked = sorted(per_day.items(), key=lambda item: -sum(item[1].values()))
    if len(stacked) > MAX_CHART_KEYS:
        other: dict[str, int] = {}
        for _, by_day in stacked[MAX_CHART_KEYS - 1:]:
            for day, tokens in by_day.items():
                other[day] = other.get(day, 0) + tokens
        stacked = stacked[:MAX_CHART_KEYS - 1] + [("other", other)]
    return {
        "version": __version__, "now": _iso(now, calendar.tz), "timezone": calendar.zone,
        "uptime_seconds": round(now - server.started),
        "store": store_report(server), "upstream": upstream_report(server, in_flight, waiting),
        "upstreams": servers_report(server), "aliases": dict(server.forwarder.router.aliases),
        "keys": keys,
        "audit": [row.as_json(server.calendar.tz) for row in server.audit.rows(0, 10)],
        "keys_file": {"path": server.config.keys_file,
                      "writable": bool(server.config.keys_file)
                      and not server.config.keys_file.endswith(".toml")},
        "models": [{"name": name, **{span: dict(zip(("tokens", "requests"), spans[span]))
                                     for span in ("today", "this_month")}}
                   for name, spans in sorted(per_model.items(),
                                             key=lambda item: -item[1]["this_month"][0])
                   ][:MAX_OVERVIEW_MODELS],
        "requests_per_minute": {
            "start": _iso(first_minute * 60, calendar.tz),
            "minutes": [{"requests": m.get("requests", 0), "limited": m.get("limited", 0),
                         "errors": m.get("errors", 0)} for m in minutes]},
        "tokens_per_day": {"days": days, "keys": [
            {"name": name, "tokens": [by_day.get(day, 0) for day in days]}
            for name, by_day in stacked]}}


MAX_OVERVIEW_USERS = 200  # users of a front end's key the dashboard lists (the most active)


def users_overview(server: "ProxyServer", key: str, users: UserPolicy,
                   per_key: Mapping[str, Mapping[str, list[int]]],
                   periods: Periods) -> list[dict[str, object]]:
    """A front end's users as the dashboard lists them: each one's bucket and quotas now, and
    tokens, requests and limited requests today and this month (the ledger's), the most
    tokens this month first."""
    zero = {"today": [0, 0, 0], "this_month": [0, 0, 0]}
    held = {k for k in per_key if split_user(k)[0] == key and split_user(k)[1]}
    try:
        held.update(server.store.users_of(key))
    except StoreUnavailable:
        pass
    ranked = sorted(held, key=lambda k: (-per_key.get(k, zero)["this_month"][0], k))
    found: list[dict[str, object]] = []
    for bucket in ranked[:MAX_OVERVIEW_USERS]:
        spans = per_key.get(bucket, zero)
        try:
            quota: Quota | None = server.store.peek(bucket, users.bucket)
            quotas = (server.store.calendar(bucket, users.calendar, periods)
                      if users.calendar else ())
        except StoreUnavailable:
            quota, quotas = None, ()
        found.append({
            "user": split_user(bucket)[1], "limit": users.bucket.capacity,
            "balance": None if quota is None else quota.remaining,
            **{span: dict(zip(("tokens", "requests", "limited"), spans[span]))
               for span in ("today", "this_month")},
            "quotas": [{"name": q.name, "limit": q.limit, "used": q.used,
                        "remaining": q.remaining} for q in quotas]})
    return found


class LedgerTally:
    """What the dashboard adds up from the usage ledger: per bucket key and per model, tokens,
    requests (and limited requests) today and this month; per key name, tokens per day over
    the last 30 days. An hour row counts towards the day its last second is in."""

    def __init__(self, day_start: float, month_start: float, since: float,
                 tz: datetime.tzinfo) -> None:
        self.day_start, self.month_start, self.since, self.tz = day_start, month_start, since, tz
        self.per_key: dict[str, dict[str, list[int]]] = {}    # bucket key -> span -> [t, r, l]
        self.names: dict[str, str] = {}                       # bucket key -> its name
        self.per_day: dict[str, dict[str, int]] = {}          # key name -> day -> tokens
        self.per_model: dict[str, dict[str, list[int]]] = {}  # model -> span -> [t, r]
        self._days: dict[int, str] = {}                       # hour -> its day

    def add(self, rows: Iterable[tuple[LedgerKey, Sequence[int]]]) -> "LedgerTally":
        day_start, month_start = self.day_start - 3599, self.month_start - 3599
        for entry, counts in rows:
            self.names.setdefault(entry.key, entry.name)
            requests, limited, tokens = counts[0], counts[1], counts[4]
            today = entry.hour >= day_start
            if entry.hour >= month_start:
                model = self.per_model.setdefault(entry.model, {"today": [0, 0],
                                                                "this_month": [0, 0]})
                owner, user = split_user(entry.key)  # (a user's row counts for its key too)
                held = [self.per_key.setdefault(k, {"today": [0, 0, 0], "this_month": [0, 0, 0]})
                        for k in ((entry.key, owner) if user else (entry.key,))]
                for span in ("today", "this_month") if today else ("this_month",):
                    model[span][0] += tokens
                    model[span][1] += requests
                    for spans in held:
                        totals = spans[span]
                        totals[0] += tokens
                        totals[1] += requests
                        totals[2] += limited
            if entry.hour >= self.since - 3599:
                day = self._days.get(entry.hour)
                if day is None:
                    day = self._days[entry.hour] = datetime.datetime.fromtimestamp(
                        entry.hour + 3599, self.tz).date().isoformat()
                by_day = self.per_day.setdefault(entry.name, {})
                by_day[day] = by_day.get(day, 0) + tokens
        return self

    def copy(self) -> "LedgerTally":
        other = LedgerTally(self.day_start, self.month_start, self.since, self.tz)
        other.per_key = {k: {s: list(v) for s, v in spans.items()}
                         for k, spans in self.per_key.items()}
        other.names = dict(self.names)
        other.per_day = {k: dict(v) for k, v in self.per_day.items()}
        other.per_model = {k: {s: list(v) for s, v in spans.items()}
                           for k, spans in self.per_model.items()}
        other._days = self._days
        return other


def bucket_name(bucket: str) -> str:
    """How a bucket key is shown: a key's short hash, an address as it is."""
    kind, _, rest = bucket.partition(":")
    return short_hash(rest) if kind == "key" else rest


MAX_OVERVIEW_KEYS = 200   # keys not in the keys file (open mode, by address) the dashboard lists
MAX_OVERVIEW_MODELS = 50  # models the dashboard lists (the most used this month)
MAX_CHART_KEYS = 8        # keys the tokens-per-day chart stacks (the rest as "other")


def store_report(server: "ProxyServer") -> dict[str, object]:
    status = server.store.status()
    redis = None
    if server.config.redis_url:
        parts = urllib.parse.urlsplit(server.config.redis_url)
        where = f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port
                                                               else "") + parts.path
        redis = {"url": where, "reachable": bool(status.get("reachable", True))}
    report = {"kind": status.get("backend", "memory"),
              "state_file": server.state.path if server.state is not None else None,
              "redis": redis, "ok": bool(status.get("reachable", True))
              or status.get("failure_mode") == "local", "buckets_held": len(server.store)}
    if server.writer is not None:
        report["state"] = server.writer.status(why=True)
    return report


def upstream_report(server: "ProxyServer", in_flight: Mapping[str, int],
                    waiting: Mapping[str, int]) -> dict[str, object]:
    """Whether the upstream takes a connection now (tried, within a second), what it said
    when last asked for its models (`probe`: UpstreamProbe, None when it was never asked), its
    time to first byte and latency (p50, p95: the histograms since start), its errors in the
    last hour by kind, and the requests at it and waiting for it."""
    upstream = server.forwarder.upstreams["v1"]
    connect_ms: float | None = None
    router = server.forwarder.router
    if router.several:  # (BASE_API_URL is not used: each server's health is in "upstreams")
        report: dict[str, object] = {"url": server.config.upstreams_file, "connect_ms": None,
                                     "reachable": any(s.up for s in router.servers),
                                     "probe": None}
    else:
        started = time.perf_counter()
        try:
            socket.create_connection((upstream.host, upstream.port),
                                     timeout=min(1.0, server.config.open_timeout)).close()
            connect_ms = round((time.perf_counter() - started) * 1000, 2)
        except OSError:
            pass
        report = {"url": f"{upstream.scheme}://{upstream.host_header}{upstream.base_path}",
                  "reachable": connect_ms is not None, "connect_ms": connect_ms,
                  "probe": server.probe.report()}
    for name, field in (("llm_proxy_upstream_ttfb_seconds", "ttfb_ms"),
                        ("llm_proxy_upstream_latency_seconds", "latency_ms")):
        (p50, p95), count = server.metrics.quantiles(name, 0.5, 0.95)
        report[field] = {"p50": None if p50 is None else round(p50 * 1000, 1),
                         "p95": None if p95 is None else round(p95 * 1000, 1), "count": count}
    _, minutes = server.metrics.recent.window()
    report["errors_last_hour"] = {kind: sum(m.get("upstream " + kind, 0) for m in minutes)
                                  for kind in ("timeout", "refused", "5xx", "broken", "invalid")}
    queued = sum(waiting.values())
    report["in_flight"], report["waiting"] = max(0, sum(in_flight.values()) - queued), queued
    return report


def servers_report(server: "ProxyServer") -> list[dict[str, object]]:
    """Each model server: its name and URL, whether it is up (else when it is probed next),
    its models, its requests in flight and waiting, its requests and failures since start,
    its time to first byte and latency (p50, p95)."""
    report = []
    metrics = server.metrics
    with metrics._lock:
        counters = {n: dict(metrics._counters.get(n, {})) for n in (
            "llm_proxy_upstream_requests_total", "llm_proxy_upstream_failures_total")}
    for s in server.forwarder.router.servers:
        v1 = s.upstreams["v1"]
        waiting = s.gate.waiting() if s.gate is not None else 0
        entry: dict[str, object] = {
            "name": s.name, "url": f"{v1.scheme}://{v1.host_header}{v1.base_path}",
            "up": s.up, "probe_in_seconds": None if s.up else s.health.retry_after(),
            "models": None if s.any_model else sorted(s.models),
            "in_flight": max(0, s.in_flight - waiting), "waiting": waiting,
            "max_concurrency": s.gate.limit if s.gate is not None else None,
            **{field: int(counters[name].get((("upstream", s.name),), 0)) for field, name in (
                ("requests", "llm_proxy_upstream_requests_total"),
                ("failures", "llm_proxy_upstream_failures_total"))}}
        for name, field in (("llm_proxy_upstream_ttfb_seconds", "ttfb_ms"),
                            ("llm_proxy_upstream_latency_seconds", "latency_ms")):
            (p50, p95), count = metrics.quantiles(f"{name}:{s.name}", 0.5, 0.95)
            entry[field] = {"p50": None if p50 is None else round(p50 * 1000, 1),
                            "p95": None if p95 is None else round(p95 * 1000, 1), "count": count}
        report.append(entry)
    return report


LOCAL_ANSWERS: dict[str, Callable[["ProxyServer", Exchange, Headers], Reply | None]] = {
    "health": answer_health, "metrics": answer_metrics, "admin_keys": answer_admin_keys,
    "models": answer_models, "model": answer_model, "tags": answer_tags, "ps": answer_ps,
    "usage": answer_usage, "admin_usage": answer_admin_usage,
    "preflight": answer_preflight, "page": answer_page, "overview": answer_admin_overview,
    "no_icon": answer_no_icon, "admin_key_create": answer_admin_key_create,
    "admin_key": answer_admin_key, "admin_audit": answer_admin_audit,
}


def busy_reply(route: Route, payload: dict | None, limit: int, as_message: bool) -> Reply:
    """Over MAX_CONCURRENT_PER_KEY: answered like an empty bucket, in its own words."""
    err = ProxyError(HTTPStatus.TOO_MANY_REQUESTS, "Too many requests at once for this key "
                     f"(at most {limit}); wait for one to finish.", type="requests",
                     code="concurrency_limit_exceeded",
                     headers=[("Retry-After", "1"), ("retry-after-ms", "1000")])
    return route.api.limited(err, "too many requests at once for this key, wait for one to "
                             "finish", route, payload,
                             as_message=as_message and route.message_limit,
                             created=int(time.time()))


def limited_reply(route: Route, payload: dict, quota: Quota, as_message: bool,
                  calendar: Calendar | None = None, subject: str = "this key") -> Reply:
    """An empty bucket or a spent calendar quota: the limit text (naming what ran out and
    when it comes back, in words) as an assistant message, or the 429. `subject` is whose
    limit it is: "this key", or "you" (a front end's user, whose figures the quota holds)."""
    text = (LIMIT_TEXTS[quota.limited_by].format(reset_text(quota.wait_seconds, calendar))
            if quota.limited_by in LIMIT_TEXTS else limit_message(quota.wait_seconds))
    err = ProxyError(HTTPStatus.TOO_MANY_REQUESTS,
                     f"Rate limit reached for {subject}: {text}. Please try again in "
                     f"{math.ceil(quota.wait_seconds)}s.", type="requests",
                     code="rate_limit_exceeded",
                     headers=rate_limit_headers(quota) + retry_headers(
                         quota.wait_seconds, route.api.honoured_retry_after),
                     wait=quota.wait_seconds)
    return route.api.limited(err, text, route, payload,
                             as_message=as_message and route.message_limit,
                             created=int(time.time()))


def never_admitted_reply(route: Route, payload: dict, err: "NeverAdmitted",
                         as_message: bool) -> Reply:
    """A request that costs more than its key can ever pay: in message mode, on a route whose
    limit can be a message, said as the limit (a chat UI or an agent shows it as the answer);
    otherwise the 400 that names the figures."""
    if not (as_message and route.message_limit):
        return route.api.error(err)
    return route.api.limited(err, err.text, route, payload, as_message=True,
                             created=int(time.time()))


# ######################################################################### handler ####

class ProxyHandler(BaseHTTPRequestHandler):
    """HTTP in and out for one client connection, and dispatch by the route table.

    Each request gets an Exchange; the handler reads the request, looks its route up, and either
    writes a local answer or takes it through admission (Charge), the Forwarder and the relay.
    Its one error boundary is `_serve`: a ProxyError becomes an error in the route's API shape,
    or, once the response head is out, a closed connection.

    Replaced from BaseHTTPRequestHandler (CPython 3.10-3.13 Lib/http/server.py), and why:
    - setup(): the connection is read through SocketReader (kernel timeouts, see
      set_io_timeout), with KEEPALIVE_TIMEOUT as the limit of any one read or write.
    - handle_one_request(): follows the base class's; adds the client deadlines (the request
      line and headers must arrive within CLIENT_HEADER_TIMEOUT however slowly they trickle)
      and the request line limit (MAX_HEADER_BYTES, else 414).
    - parse_request(): only "METHOD target HTTP/1.x"; headers read by read_headers, which
      refuses what could smuggle a request (the email parser is slow and lenient).
    - send_error(): errors as JSON in the API's shape instead of an HTML page.
    - log_request(), log_message(): the access log is written once per request, from the
      Exchange, by the server's AccessLog.
    Not used: send_response() and the header-writing methods (answers are written whole by
    _send, or head and first piece together by the relay), hence no server_version either: the
    proxy adds no Server header of its own.
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True      # headers and small SSE events must not wait for ACKs
    server: "ProxyServer"
    rfile: io.BufferedReader            # (setup(): a BufferedReader over SocketReader)
    #: read by read_headers (parse_request), not by the email parser the base class uses
    headers: "Headers"  # type: ignore[assignment]  # (the base declares email.message.Message)
    #: who the last request on this connection was, and from what (see _identify)
    _known: "tuple[KeyRing, KeyPolicy, str | None, str | None, Identity] | None" = None

    def setup(self) -> None:
        """The connection's reader and writer (StreamRequestHandler's), reading through
        SocketReader, with KEEPALIVE_TIMEOUT as the limit of any one read or write."""
        super().setup()
        self.rfile.close()  # socketserver's; the socket stays open
        self.rfile = io.BufferedReader(SocketReader(self.connection), CLIENT_READ_BUFFER)
        set_io_timeout(self.connection, self.server.config.keepalive_timeout)
        # a new connection has CLIENT_HEADER_TIMEOUT, not KEEPALIVE_TIMEOUT, to start its request
        self.server.deadlines.set(self, self.server.config.client_header_timeout)

    def handle_one_request(self) -> None:
        """One request on this connection, within the client timeouts.

        An idle kept-alive connection waits KEEPALIVE_TIMEOUT for the next request's first
        byte. From then on the request line and headers must all arrive within
        CLIENT_HEADER_TIMEOUT, however slowly they trickle in (slowloris): the server's deadline
        thread cuts the connection's reading side when the time is up.
        """
        server = self.server
        config, deadlines, cap = server.config, server.deadlines, server.cap
        try:
            cap.mark(self.connection, IDLE)
            first = self.rfile.peek(1)
            if not first:
                self.close_connection = True  # the client closed its idle connection
                return
            watched = b"\r\n\r\n" not in first  # (a head that came whole needs no deadline)
            cap.mark(self.connection, READING if watched else BUSY)  # (whole: being served)
            if watched:
                deadlines.set(self, config.client_header_timeout)
            self.raw_requestline = self.rfile.readline(config.max_header_bytes + 1)
            if len(self.raw_requestline) > config.max_header_bytes:
                self.requestline, self.request_version, self.command = "", "", ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline.endswith(b"\n"):
                self.close_connection = True  # cut off (or cut by the deadline)
                return
            if not self.parse_request():
                return
            if watched:
                deadlines.set(self, None)
                cap.mark(self.connection, BUSY)
            if self.command not in HANDLED_METHODS:
                self.send_error(HTTPStatus.NOT_IMPLEMENTED)
                return
            self._serve()
            if server.draining:
                self.close_connection = True
        except (TimeoutError, socket.timeout, ConnectionError):
            self.close_connection = True
        finally:
            deadlines.set(self, None)

    def parse_request(self) -> bool:
        """Parse the request line and headers into command, path, request_version, headers.

        http.server's contract (on failure the error response has been sent), with the header
        parser above. Only "METHOD target HTTP/1.x" is accepted: an HTTP/0.9 line has no
        headers, and http.server would wait for them.
        """
        self.close_connection = True
        self.requestline = self.raw_requestline.decode("latin-1").rstrip("\r\n")
        plain = _PLAIN_REQUEST_LINE.fullmatch(self.requestline)
        if plain is not None:  # (the usual line: the checks below, passed at once)
            self.command, self.path, self.request_version = plain.groups()
            return self._read_request_headers(plain.group(3) == "HTTP/1.1")
        self.command = None  # type: ignore[assignment]  # (as the base's own parse_request)
        self.request_version = "HTTP/1.0"
        words = self.requestline.split()
        if not words:
            return False
        self.command = words[0]
        if len(words) != 3:
            self.send_error(HTTPStatus.BAD_REQUEST)
            return False
        version = words[2]
        numbers = _HTTP_VERSION.fullmatch(version)
        if numbers is None:
            self.send_error(HTTPStatus.BAD_REQUEST)
            return False
        major, minor = numbers.groups()
        if int(major) != 1:
            self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED)
            return False
        self.path, self.request_version = words[1], version
        return self._read_request_headers(int(minor) >= 1)

    def _read_request_headers(self, http11: bool) -> bool:
        """The headers of a request whose line was read (parse_request's contract)."""
        try:
            self.headers = read_headers(
                self.rfile, self.server.config.max_header_bytes)
        except HeaderError as err:
            self.send_error(err.status)
            return False
        except EOFError:
            return False
        tokens = self.headers.connection_tokens()
        self.close_connection = "close" in tokens or (not http11 and "keep-alive" not in tokens)
        if http11 and len(self.headers.get_all("Host") or ()) != 1:
            self.send_error(HTTPStatus.BAD_REQUEST)  # RFC 9112 section 3.2: exactly one Host
            return False
        return True  # (Expect: 100-continue is answered once the key and size are checked)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (malformed request line, headers too long, unsupported
        method) as OpenAI-shaped JSON instead of an HTML page; the connection is closed."""
        ex = Exchange(self.command or "", "", self.client_address[0])
        self.close_connection = True
        status = HTTPStatus(code)
        text = {HTTPStatus.BAD_REQUEST: "Malformed HTTP request.",
                HTTPStatus.NOT_IMPLEMENTED: f"Method not supported: {loggable(self.command or '')}."}
        self._fail(ex, ProxyError(status, text.get(status, status.phrase + ".")))
        self.server.log_access(ex)

    def log_request(self, code: object = "-", size: object = "-") -> None:
        pass  # the access log is written once per request, from the Exchange

    def log_message(self, format: str, *args: object) -> None:
        self.server.log(loggable(format % args))

    # -- the error boundary -----------------------------------------------------------------

    def _serve(self) -> None:
        """One request, start to end. The charge closes here, in one place, however the
        request ended, and before the bytes that complete the answer (or the error) are
        written: by the time a client has its whole answer, what it cost is settled. Then the
        access line is written."""
        ex = Exchange(self.command, self.path, self.client_address[0])
        server = self.server
        server.request_started(ex)
        failure: ProxyError | None = None
        try:
            try:
                ex.length = request_framing(self.headers)
                expect = self.headers.get("Expect")
                ex.expects_continue = (expect is not None and expect.lower() == "100-continue"
                                       and self.request_version == "HTTP/1.1")
                self._dispatch(ex)
            except ProxyError as err:
                failure = err
            except ClientGone:
                self.close_connection = True
                ex.status = ex.status if ex.head_sent else 499
                ex.note = ex.note or "client closed"
            except (KeyboardInterrupt, SystemExit, MemoryError):
                raise
            except Exception as exc:  # a bug: answer 500, log one line, keep serving
                failure = self._internal_error(ex, exc, "handling")
            finally:
                failure = self._close_charge(ex) or failure
            if failure is not None:
                self._fail(ex, failure)
            elif ex.tail:
                self._finish_answer(ex)
        finally:
            server.request_finished(ex)
            server.log_access(ex)

    def _close_charge(self, ex: Exchange) -> ProxyError | None:
        """Close the request's charge (Charge.close), inside the error boundary: a failure
        there is answered like any other bug (None: closed, or nothing to close). The charge
        then stays held, its tokens taken, and the access line says so."""
        charge = ex.charge
        if charge is None:
            return None
        try:
            charge.close(ex.ending)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as exc:
            ex.note = f"charge not closed: {type(exc).__name__}; its tokens stay held"
            return self._internal_error(ex, exc, "closing the charge of")
        ex.note = ex.note or charge.note
        return None

    def _internal_error(self, ex: Exchange, exc: Exception, doing: str) -> ProxyError:
        """An exception that is not the client's doing nor the upstream's: one log line, and
        the 500 to answer with (once the answer's head is out, a closed connection)."""
        self.server.log(f"error: {type(exc).__name__} while {doing} "
                        f"{loggable(ex.method)} {loggable(ex.path or '?')}")
        return ProxyError(HTTPStatus.INTERNAL_SERVER_ERROR, "The proxy failed to handle the "
                          "request.", type="server_error", close=True)

    def _finish_answer(self, ex: Exchange) -> None:
        """Write the bytes that complete a relayed answer (its charge is closed by now). If
        the client has gone before any of it went out, the log says 499, not the status it
        never got."""
        try:
            self.write(ex, ex.tail)
        except ClientGone:
            self.close_connection = True
            ex.status = ex.status if ex.head_sent else 499
            ex.note = "client closed"

    def _fail(self, ex: Exchange, err: ProxyError) -> None:
        """Send `err` in the route's API shape, unless the response head is already out (then
        the connection closes). The access log says what the client really got."""
        if err.close or ex.head_sent:
            self.close_connection = True
        if ex.head_sent:
            return
        try:
            self._reply(ex, ex.api.error(err))
        except ClientGone:
            self.close_connection = True
            ex.status, ex.note = 499, "client closed"

    # -- dispatch ---------------------------------------------------------------------------

    def _dispatch(self, ex: Exchange) -> None:
        origin = self.headers.get("Origin")
        try:
            ex.cors = self.server.cors.lines(
                origin, self.headers.get("Host") if origin is not None else None)
            ex.path, ex.query = normalize_path(self.path)
            route = self.server.routes.find(ex.method, ex.path)
        except ProxyError:  # (refused in the shape of the API its path names, as it stands)
            ex.api = api_of_path(ex.path)
            raise
        ex.route, ex.api = route, route.api
        if route.kind in (ADMIN, MANAGE):  # never for another site's page: no CORS, no Origin
            ex.cors = ""
            if (origin is not None and not (route.kind == ADMIN and same_origin(
                    origin, self.headers.get("Host")))) \
                    or self.headers.get("Sec-Fetch-Site") in CROSS_SITE:
                raise ProxyError(HTTPStatus.FORBIDDEN, "Admin routes do not answer web pages.",
                                 type="permission_error", code="origin_not_allowed")
        if route.kind in (LOCAL, ADMIN):
            if route.kind == ADMIN:
                check_admin(self.server, ex, self.headers)
                if ex.method in ("POST", "PATCH"):  # (a change to the keys: its JSON body)
                    ex.body = self._read_body(ex)
            reply = LOCAL_ANSWERS[route.answer](self.server, ex, self.headers)
            assert reply is not None
            if route.private:
                reply = dataclasses.replace(reply, headers=(*reply.headers, NO_STORE))
            return self._reply(ex, reply)
        self._forward(ex)

    def _forward(self, ex: Exchange) -> None:
        """A forwarded route: who is asking, what they send, whether it is charged and
        admitted, then the upstream and the relay."""
        server, config, route = self.server, self.server.config, ex.route
        assert route is not None
        if "via" in self.headers and any(server.via in hop
                                         for hop in self.headers.get_all("Via", ())):
            raise ProxyError(HTTPStatus.LOOP_DETECTED, "This request came back to the proxy it "
                             "was sent from: BASE_API_URL points at the proxy itself.",
                             type="server_error", code="loop_detected")
        if route.kind == MANAGE:  # the administrator's: forwarded free, after the check
            check_manager(server, ex, self.headers)
            ex.body, ex.label = self._read_body(ex), "admin"
            if server.forwarder.router.several:
                self._choose_model(ex, server.forwarder.router, None)
            return self._forward_upstream(ex, ex.body, None)
        who = self._identify(server)
        ex.bucket_key, ex.policy, ex.label = who.bucket_key, who.policy, who.label
        ex.body = self._read_body(ex)
        policy = who.policy
        charged = route.charges(policy)
        if charged:
            ex.payload = parse_json_object(ex.body)
            if route.kind == GENERATE:
                ex.ask = route.api.read(ex.payload, route, policy.response_token_reserve)
        router = server.forwarder.router
        if policy.models is not None and ex.method == "POST":
            check_model(ex.payload if charged else policed_json(ex.body), policy.models,
                        router.aliases)
        if policy.users is not None and charged:
            ex.user = read_user(policy.users, self.headers, ex.payload)
            if ex.user and policy.users.models is not None and ex.method == "POST":
                check_model(ex.payload, policy.users.models, router.aliases, "This user")
        if route.answer:
            reply = LOCAL_ANSWERS[route.answer](server, ex, self.headers)
            if reply is not None:
                return self._reply(ex, reply)
        if router.several:  # (a model no server serves, or whose servers are all down: free)
            self._choose_model(ex, router, ex.payload if charged else None)
        slots = server.key_slots
        as_message = policy.limit_response == "message"
        counted = self._key_slot(ex, policy)
        if counted is None:
            ex.charge = Charge.declined(None)
            return self._reply(ex, busy_reply(route, ex.payload,
                                              policy.max_concurrent or slots.limit, as_message))
        try:
            if charged:
                assert ex.payload is not None
                try:
                    ex.charge = admit(ex, server.store, server.metrics, server.calendar)
                except NeverAdmitted as err:
                    return self._reply(ex, never_admitted_reply(route, ex.payload, err,
                                                                as_message))
                if ex.charge.state == "declined":
                    assert ex.charge.quota is not None
                    return self._reply(ex, limited_reply(route, ex.payload, ex.charge.quota,
                                                         as_message, server.calendar,
                                                         "you" if split_user(ex.charge.key)[1]
                                                         else "this key"))
                body, fallback = upstream_body(ex, config.base_model)
            else:
                body, fallback = ex.body, None
            self._forward_upstream(ex, body, fallback)
        finally:
            if counted:
                slots.leave(ex.bucket_key)

    def _identify(self, server: "ProxyServer") -> Identity:
        """identify(), remembered for this connection's next requests that present the same
        key to the same key ring and default policy (a client sends the same key on a
        kept-alive connection: no hash, no lookup). Expiry is checked every time; a caller
        known by its address, or a key in a rotation's grace, is looked up every time."""
        headers, keys, default = self.headers, server.keys, server.default_policy
        auth, api_key = headers.get("Authorization"), headers.get("x-api-key")
        known = self._known
        if known is not None and known[0] is keys and known[1] is default \
                and known[2] == auth and known[3] == api_key:
            if known[4].policy.expires_at is not None:
                check_expiry(known[4].policy, server.calendar.wall())
            return known[4]
        who = identify(headers, keys, default, self.client_address[0],
                       server.config.trust_forwarded_for, server.calendar.wall())
        if not who.bucket_key.startswith("ip:") and not who.policy.previous_digest:
            self._known = (keys, default, auth, api_key, who)
        return who

    def _key_slot(self, ex: Exchange, policy: KeyPolicy) -> bool | None:
        """Whether the request may go on under its key's cap on requests in flight: None
        (refused) beyond MAX_CONCURRENT_PER_KEY; beyond the key's own max_concurrent it waits
        its turn, up to UPSTREAM_QUEUE_TIMEOUT (None after that). Else whether it was counted
        in the key's requests in flight, and so whether leave() must follow: a request let in
        uncounted (no cap when it came) must not take a count another one holds, as it would
        once the key gained a max_concurrent meanwhile."""
        slots = self.server.key_slots
        if policy.max_concurrent is None:
            if not slots.limit:
                return False
            return True if slots.enter(ex.bucket_key) else None
        outcome = slots.wait(ex.bucket_key, policy.max_concurrent,
                             self.server.config.upstream_queue_timeout,
                             lambda: peer_closed(self.connection))
        if outcome == "gone":
            raise ClientGone()
        return True if outcome == "ok" else None

    def _choose_model(self, ex: Exchange, router: Router, payload: dict | None) -> None:
        """Several servers (UPSTREAMS_FILE): the model the request's server must serve, an
        alias's target written into the body (and so into the ledger), before anything is
        charged: ProxyError 404 for a model no server serves, 400 for a request with a body
        but no model, 503 when every server of the model is down. A request without a body
        (GET /api/version) may go to any server."""
        sent = payload if payload is not None else json_object(ex.body) if ex.body else None
        field = model_field(sent, ex.api)
        model = sent.get(field) if sent is not None else None
        if not isinstance(model, str) or not model:
            model = None
            if not ex.body:
                return
        ex.model = router.resolve(model)
        if sent is not None and ex.model != model:
            sent[field] = ex.model
            ex.body = json.dumps(sent).encode()
        router.check_up(ex.model)

    def _forward_upstream(self, ex: Exchange, body: bytes, fallback: bytes | None) -> None:
        """To the model's server; to another of its servers when the first provably did not
        run the request (it refused the connection, or answered 502/503/529 before any byte
        reached the client), each server tried at most once. The model's body and the
        charge are the same whichever server runs it."""
        router = self.server.forwarder.router
        tried: list[ModelServer] = []
        while True:
            server = router.pick(ex.model, tried)
            tried.append(server)
            ex.server = server
            try:
                if self._forward_to(ex, server, body, fallback, tried):
                    return
            finally:
                router.release(server)

    def _forward_to(self, ex: Exchange, server: ModelServer, body: bytes,
                    fallback: bytes | None, tried: Sequence[ModelServer]) -> bool:
        """Send the request to one server and relay its answer; False, with nothing sent to
        the client, when it is to go to another server instead (see _forward_upstream)."""
        forwarder, router = self.server.forwarder, self.server.forwarder.router
        assert ex.route is not None
        pool, target = forwarder.target(ex.route, ex.path, ex.query, server)
        peer = self.client_address[0]

        def head(data: bytes) -> str:
            return upstream_head(ex.method, target, self.headers, peer, pool,
                                 data, ex.api, self.server.via)

        with forwarder.turn(ex, self.connection, server):
            try:
                answer = forwarder.send(ex, pool, head, body, fallback, self.connection, server)
            except UpstreamUnreachable:
                if router.alternative(ex.model, tried):
                    ex.note = f"{server.name} unreachable, sent to another server"
                    return False  # (never connected: nothing was sent)
                raise
            if answer.resp.status in FAILOVER_STATUSES and router.alternative(ex.model, tried):
                forwarder.finish(answer, whole=False)
                ex.ending = NOT_SENT
                ex.note = f"{server.name} answered {answer.resp.status}, sent to another server"
                return False
            meter = ex.charge.meter if ex.charge is not None else None
            if answer.usage_asked and meter is not None:
                meter.strip = meter.expects_usage = True  # (what it adds is taken out again)
                if isinstance(meter, UsageMeter):
                    meter.counts_asked = ex.counts_asked
            whole = False
            try:
                whole = relay_answer(ex, answer, self, pool.read_timeout, self.server.metrics,
                                     self.server.streams)
            finally:
                forwarder.finish(answer, whole)
        return True

    # -- reading the body -------------------------------------------------------------------

    def _has_body(self) -> bool:
        headers = getattr(self, "headers", None)  # absent when the request line was malformed
        if headers is None:
            return False
        return bool(headers.get("Content-Length", "0").strip() not in ("", "0")
                    or headers.get("Transfer-Encoding"))

    def _read_body(self, ex: Exchange) -> bytes:
        """The whole request body, within MAX_BODY_BYTES (decided from Content-Length before
        reading), its framing checked before the request was routed (request_framing). A
        client that waits for 100 Continue is told to go on only now, its key and size
        accepted: one told 401 or 413 never sends the body."""
        config, deadlines = self.server.config, self.server.deadlines
        limit, length = config.max_body_bytes, ex.length
        if length is not None and length > limit:
            raise ProxyError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"Request body is {length} bytes; the limit is {limit}.",
                             code="request_too_large", close=True)
        if ex.expects_continue and length != 0:
            ex.expects_continue = False
            try:
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                raise ClientGone() from None
        if length and self._arrived(length):
            ex.body_read = True  # (it came with the head: no wait, no deadline)
            return self.rfile.read(length)
        if length != 0:
            self.server.cap.mark(self.connection, READING)
            deadlines.set(self, config.client_body_timeout)
        body = self._read_chunked(limit) if length is None else self._read_exactly(length)
        deadlines.set(self, None)
        self.server.cap.mark(self.connection, BUSY)
        ex.body_read = True
        return body

    def _arrived(self, length: int) -> bool:
        """Whether `length` bytes of the body are here already, found out without waiting."""
        try:
            return len(peek_now(self.rfile, self.connection) or b"") >= length
        except OSError:
            return False  # (the read that follows says what happened)

    def _cut_off(self) -> Exception:
        """Why a body read came up short: the deadline thread (408) or the client (gone)."""
        if self.server.deadlines.passed(self):
            return ProxyError(HTTPStatus.REQUEST_TIMEOUT, "The request body took too long to "
                              "arrive.", close=True)
        return ClientGone()

    def _read_exactly(self, length: int) -> bytes:
        try:
            body = self.rfile.read(length) if length else b""
        except (socket.timeout, TimeoutError):
            raise ProxyError(HTTPStatus.REQUEST_TIMEOUT, "Timed out reading the request body.",
                             close=True) from None
        except OSError:
            raise self._cut_off() from None
        if len(body) < length:
            raise self._cut_off()
        return body

    def _read_chunked(self, limit: int) -> bytes:
        """A chunked request body, decoded by BodyReader from what the client has sent, taking
        from the connection only the body's bytes (a pipelined request may follow it)."""
        reader, parts, total = BodyReader(True, None), [], 0
        while not reader.done:
            try:
                data = self.rfile.peek(READ_CHUNK)
            except (socket.timeout, TimeoutError):
                raise ProxyError(HTTPStatus.REQUEST_TIMEOUT, "Timed out reading the request "
                                 "body.", close=True) from None
            except OSError:
                raise self._cut_off() from None
            if not data:
                raise self._cut_off()
            try:
                piece = reader.feed(data)
            except ValueError:
                raise ProxyError(HTTPStatus.BAD_REQUEST, "Invalid chunked body.",
                                 close=True) from None
            self.rfile.read(len(data) - len(reader.extra))
            total += len(piece)
            if total + reader.announced > limit:
                raise ProxyError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                 f"Request body is over the limit of {limit} bytes.",
                                 code="request_too_large", close=True)
            parts.append(piece)
        return b"".join(parts)

    # -- writing ----------------------------------------------------------------------------

    def _reply(self, ex: Exchange, reply: Reply) -> None:
        self._send(ex, reply.status, list(reply.headers), reply.body)

    def _send(self, ex: Exchange, status: int, headers: list[tuple[str, str]],
              body: bytes | None) -> None:
        """A complete response in one write (head and body coalesced). A request body left
        unread would be taken for the next request, so such a connection is closed."""
        if not ex.body_read and self._has_body():
            self.close_connection = True
        if not any(n == "Date" for n, _ in headers):
            headers.append(("Date", formatdate(usegmt=True)))
        if body is not None and status != HTTPStatus.NO_CONTENT:
            headers.append(("Content-Length", str(len(body))))
        head = self.response_head(ex, status, HTTPStatus(status).phrase, headers)
        self.write(ex, head + (body or b"") if ex.method != "HEAD" else head)

    def response_head(self, ex: Exchange, status: int, reason: str,
                      headers: list[tuple[str, str]]) -> bytes:
        """The status line and headers (CORS and Connection: close added here)."""
        ex.status = status
        lines = [f"{self.protocol_version} {status} {reason}", *map(_FIELD_LINE, headers)]
        if ex.cors:
            lines.append(ex.cors)
        if self.close_connection:
            lines.append("Connection: close")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("latin-1", "replace")

    def write(self, ex: Exchange, data: bytes) -> None:
        """Write to the client; ClientGone if it has gone away. A write the socket takes at
        once costs one call; one that has to wait must finish within SEND_TIMEOUT as a whole,
        however the client trickles its reading (a slow reader cannot hold a thread longer)."""
        sock = self.connection
        try:
            sent = sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            raise ClientGone() from None
        if sent < len(data):
            server = self.server
            server.cap.mark(sock, WRITING)
            server.deadlines.set(self, server.config.send_timeout, writing=True)
            try:
                sock.sendall(memoryview(data)[sent:])
            except OSError:
                raise ClientGone() from None
            finally:
                server.deadlines.set(self, None)
                server.cap.mark(sock, BUSY)
        ex.head_sent = True


#: Sec-Fetch-Site values of a request a browser makes for another site's page (the proxy's own
#: pages' requests say same-origin; a typed address, none).
CROSS_SITE = frozenset({"cross-site", "same-site"})
HANDLED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_HTTP_VERSION = re.compile(r"HTTP/([0-9]{1,2})\.([0-9]{1,2})")  # ASCII digits only
#: A request line parse_request takes as it is: a method, a target, HTTP/1.0 or 1.1, each
#: parted by one space (anything else goes the long way, with its checks).
_PLAIN_REQUEST_LINE = re.compile(r"([A-Z]+) ([!-~]+) (HTTP/1\.[01])")



# #################################################################### server parts ####

# What the server is made of besides the request pipeline, one job each: metrics, the log,
# the connection cap, the client deadlines, the keys-file watcher, and the upstream probe.

def _label_value(value: str) -> str:
    """Escape a label value for the Prometheus text format."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


#: a status's label in llm_proxy_requests_total, by its hundreds ("2xx")
_STATUS_CLASSES = tuple(("status", f"{hundreds}xx") for hundreds in range(10))


class Metrics:
    """Counters and histograms, rendered in the Prometheus text exposition format by hand.

    Methods for the caller: inc(), observe(), key(), render(). Per-key series are capped at
    MAX_KEY_SERIES distinct keys (further keys count under key="other"), so an open proxy
    flooded with random keys cannot grow them without bound.
    """

    MAX_KEY_SERIES = 1000
    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
    HELP = {
        "llm_proxy_requests_total": ("counter", "Requests answered, by key, route and status class."),
        "llm_proxy_limited_requests_total": ("counter", "Requests refused because the key's bucket was empty."),
        "llm_proxy_tokens_charged_total": ("counter", "Tokens taken from buckets (after refunds and settlement)."),
        "llm_proxy_upstream_errors_total": ("counter", "Upstream failures by kind: refused, timeout, 5xx, invalid, broken."),
        "llm_proxy_key_reloads_total": ("counter", "Keys file reloads by result."),
        "llm_proxy_upstream_requests_total": ("counter", "Requests sent to each model server."),
        "llm_proxy_upstream_failures_total": ("counter", "Requests to each model server that failed: no connection, a reset, no answer in time, or a 502/503/504/529."),
        "llm_proxy_upstreams_reloads_total": ("counter", "Upstreams file reloads by result."),
        "llm_proxy_store_outages_total": ("counter", "Times the shared Redis store became unreachable."),
        "llm_proxy_store_up": ("gauge", "1 while the bucket store is reachable (always 1 in memory)."),
        "llm_proxy_state_written": ("gauge", "0 while the state (STATE_DB, or the ledger in Redis) cannot be written; else 1."),
        "llm_proxy_requests_in_flight": ("gauge", "Requests being handled now."),
        "llm_proxy_buckets": ("gauge", "Buckets held in memory (keys that are not full)."),
        "llm_proxy_keys": ("gauge", "Keys accepted (keys file and PROXY_API_KEYS)."),
        "llm_proxy_upstream_ttfb_seconds": ("histogram", "Time from sending a request upstream to its response head."),
        "llm_proxy_upstream_latency_seconds": ("histogram", "Time from sending a request upstream to the end of its response."),
    }

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        self._histograms: dict[str, list[float]] = {}
        self._keys: set[str] = set()
        #: the last hour, minute by minute: requests, limited, errors, upstream errors by kind
        self.recent = RecentMinutes(wall, self._lock)

    def key(self, label: str) -> str:
        """The key label to use: `label`, or "other" once MAX_KEY_SERIES keys are in use.
        (A label in use is read without a call where it matters: count_request.)"""
        if label in self._keys:
            return label
        with self._lock:
            if len(self._keys) >= self.MAX_KEY_SERIES:
                return "other"
            self._keys.add(label)
        return label

    def inc(self, name: str, labels: tuple[tuple[str, str], ...] = (), value: float = 1) -> None:
        with self._lock:
            series = self._counters.setdefault(name, {})
            series[labels] = series.get(labels, 0) + value
        if name == "llm_proxy_upstream_errors_total":
            self.recent.add("upstream " + labels[0][1])

    def count_request(self, label: str, route: str, status: int, cost: int | None,
                      forwarded: bool = False, limited: bool = False) -> None:
        """A request answered: llm_proxy_requests_total and the tokens charged, and, for a
        forwarded route, this minute's requests (limited, errors), in one go."""
        key = label if label in self._keys else self.key(label)
        labels = (("key", key), ("route", route), _STATUS_CLASSES[status // 100])
        with self._lock:
            series = self._counters.setdefault("llm_proxy_requests_total", {})
            series[labels] = series.get(labels, 0) + 1
            if cost:
                series = self._counters.setdefault("llm_proxy_tokens_charged_total", {})
                series[labels[:1]] = series.get(labels[:1], 0) + cost
            if forwarded:  # (the minute read under the lock: minutes are appended in order)
                counts = self.recent.counts(self.recent.minute())
                counts["requests"] += 1
                counts["limited"] += limited
                counts["errors"] += status >= 500

    def observe(self, name: str, seconds: float) -> None:
        index = bisect.bisect_left(self.BUCKETS, seconds)  # the first bound >= seconds
        with self._lock:
            counts = self._histograms.get(name)
            if counts is None:
                counts = self._histograms[name] = [0.0] * (len(self.BUCKETS) + 3)
            counts[index] += 1  # (index len(BUCKETS): above every bound)
            counts[-2] += seconds
            counts[-1] += 1

    def quantiles(self, name: str, *qs: float) -> tuple[tuple[float | None, ...], int]:
        """Quantiles of a histogram (in seconds; None while it is empty), interpolated within
        their bucket as Prometheus's histogram_quantile does, and how many it counted."""
        with self._lock:
            counts = list(self._histograms.get(name, ()))
        if not counts or not counts[-1]:
            return tuple(None for _ in qs), 0
        total, found = counts[-1], []
        for q in qs:
            rank, seen, lower = q * total, 0.0, 0.0
            for bound, count in zip((*self.BUCKETS, math.inf), counts):
                if count and seen + count >= rank:
                    upper = bound if bound != math.inf else lower
                    found.append(lower + (upper - lower) * (rank - seen) / count)
                    break
                seen, lower = seen + count, bound
        return tuple(found), int(total)

    def histogram_lines(self, name: str, text: str,
                        series: Sequence[tuple[tuple[tuple[str, str], ...], str]]) -> list[str]:
        """A labelled histogram in the text format: each (labels, key) read from the histogram
        observed under `key` (one per model server)."""
        lines = [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
        with self._lock:
            found = [(labels, list(self._histograms.get(key, ()))) for labels, key in series]
        for labels, counts in found:
            lines += self._histogram(name, counts or [0.0] * (len(self.BUCKETS) + 3), labels)
        return lines

    def _histogram(self, name: str, counts: Sequence[float],
                   labels: tuple[tuple[str, str], ...] = ()) -> list[str]:
        """One histogram's series (cumulative buckets, sum, count) in the text format."""
        inner = "".join(f'{k}="{_label_value(v)}",' for k, v in labels)
        lines, cumulative = [], 0.0
        for bound, count in zip(self.BUCKETS, counts):
            cumulative += count
            lines.append(f'{name}_bucket{{{inner}le="{bound}"}} {_number(cumulative)}')
        lines.append(f'{name}_bucket{{{inner}le="+Inf"}} {_number(counts[-1])}')
        lines.append(f"{name}_sum{_labels(labels)} {counts[-2]!r}")
        lines.append(f"{name}_count{_labels(labels)} {_number(counts[-1])}")
        return lines

    def render(self, gauges: Mapping[str, float]) -> str:
        lines: list[str] = []
        with self._lock:
            counters = {n: dict(v) for n, v in self._counters.items()}
            histograms = {n: list(v) for n, v in self._histograms.items()}
        for name, (kind, text) in self.HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if kind == "gauge":
                lines.append(f"{name} {_number(gauges.get(name, 0))}")
            elif kind == "counter":
                for labels, value in sorted(counters.get(name, {}).items()):
                    lines.append(f"{name}{_labels(labels)} {_number(value)}")
            else:
                lines += self._histogram(name, histograms.get(
                    name, [0.0] * (len(self.BUCKETS) + 3)))
        return "\n".join(lines) + "\n"


def upstream_metric_lines(metrics: Metrics, router: "Router") -> list[str]:
    """Each model server's gauges (in flight, waiting, up) and its time to first byte and
    latency histograms (its requests and failures are counters of Metrics); none without
    UPSTREAMS_FILE (the upstream metrics are BASE_API_URL's)."""
    servers = router.servers if router.several else ()
    lines: list[str] = []
    if not servers:
        return lines
    for name, text, value in (
            ("llm_proxy_upstream_in_flight", "Requests at each model server now.",
             lambda s: s.in_flight - (s.gate.waiting() if s.gate is not None else 0)),
            ("llm_proxy_upstream_waiting", "Requests waiting for their turn at each model server.",
             lambda s: s.gate.waiting() if s.gate is not None else 0),
            ("llm_proxy_upstream_up", "1 while a model server is up (0: down, being probed).",
             lambda s: int(s.up))):
        lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
        lines += [f'{name}{{upstream="{_label_value(s.name)}"}} {_number(value(s))}'
                  for s in servers]
    for name, text in (("llm_proxy_upstream_server_ttfb_seconds",
                        "Time from sending a request to a model server to its response head."),
                       ("llm_proxy_upstream_server_latency_seconds",
                        "Time from sending a request to a model server to the end of its response.")):
        stored = name.replace("_server", "")
        lines += metrics.histogram_lines(name, text, [
            ((("upstream", s.name),), f"{stored}:{s.name}") for s in servers])
    return lines


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in labels) + "}"


class RecentMinutes:
    """Counts per minute of wall-clock time over the last hour (requests, limited requests,
    errors, upstream errors by kind), for the dashboard's last-hour figures: a dict per minute;
    what is older than an hour falls off. Guarded by the lock it is given (Metrics's: a request
    is counted there and here under one lock)."""

    MINUTES = 60

    def __init__(self, wall: Callable[[], float] = time.time,
                 lock: threading.Lock | None = None) -> None:
        self._wall = wall
        self._lock = lock or threading.Lock()
        self._minutes: collections.deque[tuple[int, dict[str, int]]] = collections.deque(
            maxlen=self.MINUTES)

    def minute(self) -> int:
        return int(self._wall() // 60)

    def counts(self, minute: int) -> dict[str, int]:
        """The counts of `minute` (the current one), to add to; the caller holds the lock."""
        minutes = self._minutes
        if not minutes or minutes[-1][0] != minute:
            minutes.append((minute, {"requests": 0, "limited": 0, "errors": 0}))
        return minutes[-1][1]

    def add(self, name: str, count: int = 1) -> None:
        with self._lock:
            counts = self.counts(self.minute())
            counts[name] = counts.get(name, 0) + count

    def window(self) -> tuple[int, list[dict[str, int]]]:
        """(the first minute, as epoch minutes; each of the last 60 minutes' counts, the
        current one last)."""
        last = self.minute()
        first = last - self.MINUTES + 1
        with self._lock:
            held = {minute: dict(counts) for minute, counts in self._minutes}
        return first, [held.get(minute, {}) for minute in range(first, last + 1)]


class AccessLog:
    """The log: one line per request (written from its Exchange) and operational messages
    (errors, reloads), as text or, with LOG_FORMAT=json, one JSON object per line. Lines are
    written whole under a lock; a log that cannot be written never takes a request down.

    Each line is written as it comes, by the request's own thread. Written in batches from a
    thread of its own (tried), the log cost 7 % less CPU per request at 64 connections, but
    the p99 latency there went from 50 to 350 ms (850 ms at 100 connections): the threads
    queueing on this lock, while one writes, are threads not contending for the interpreter
    lock, and without that queue the threads that come back from short system calls take the
    interpreter lock again and again ahead of those that wait for it."""

    def __init__(self, stream: typing.TextIO, json_lines: bool) -> None:
        self._stream = stream
        self._json = json_lines
        self._lock = threading.Lock()
        self._second, self._stamp = -1, ""

    def message(self, text: str) -> None:
        if self._json:
            self._write(json.dumps({"time": self._timestamp(), "message": text}))
        else:
            self._write(f"{self._timestamp()} {text}")

    def access(self, ex: Exchange, cost: int | None, duration_ms: float) -> None:
        method = ex.method if ex.method in HANDLED_METHODS else loggable(ex.method or "-")
        client = ex.client  # (the peer's address, as the socket gives it)
        path, remaining = loggable(ex.path or "-"), ex.remaining
        server = ex.server  # (named with UPSTREAMS_FILE; BASE_API_URL's line is as it was)
        upstream = server.name if server is not None and not server.any_model else None
        if self._json:
            self._write(json.dumps({
                "time": self._timestamp(), "client": client, "key": ex.label,
                **({"user": ex.user} if ex.user else {}), "method": method,
                "path": path, "status": ex.status, "cost": cost, "remaining": remaining,
                "duration_ms": round(duration_ms, 1), **({"upstream": upstream} if upstream else {}),
                **({"note": ex.note} if ex.note else {})}))
            return
        self._write(
            f"{self._timestamp()} {client} key={loggable(ex.label)}"
            # (a front end's user: quoted and escaped as JSON, a name may hold spaces)
            + (f" user={json.dumps(ex.user)}" if ex.user else "")
            + f" \"{method} {path}\" {ex.status} "
            f"cost={'-' if cost is None else cost} "
            f"remaining={'-' if remaining is None else remaining} {duration_ms:.1f}ms"
            + (f" upstream={upstream}" if upstream else "") + (f" ({ex.note})" if ex.note else ""))

    def _write(self, line: str) -> None:
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                pass  # a closed or full log must not take requests down with it

    def _timestamp(self) -> str:
        now = int(time.time())
        if now != self._second:  # one strftime a second, not one a line
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
            self._second = now
        return self._stamp


#: What a client connection is doing (ConnectionCap.mark).
IDLE, READING, BUSY, WRITING = "idle", "reading", "busy", "writing"
#: A connection reading its request or waiting on a write this long is stalled: a normal client
#: sends its request head at once and reads what it asked for.
STALLED_SECONDS = 1.0


class ConnectionCap:
    """At most MAX_CONNECTIONS client connections at once, and what each is doing.

    Each connection is `idle` (waiting for a request: new, or kept alive between requests),
    `reading` its request, `busy` (being served) or `writing` to a client that does not take
    the answer at once, since when (mark(), called by the connection's own thread: a record
    is written by that thread only, and read here to choose whom to close). A connection that
    arrives at the cap makes room, as nginx does: the oldest idle connection is closed, else
    the one stalled longest (reading or writing for STALLED_SECONDS or more), so a flood of
    silent or slow connections cannot keep a real client out. Only when none is idle or
    stalled is the newcomer refused, with a 503 written at once without waiting on it.
    Methods for the caller: admit(), leave(), mark(), refuse(); `count`.
    """

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        self._records: dict[socket.socket, list] = {}  # socket -> [state, since]
        self._closing: set[socket.socket] = set()       # closed to make room, not yet gone
        self._refused: collections.deque[tuple[float, socket.socket]] = collections.deque()

    @property
    def count(self) -> int:
        return len(self._records)

    def admit(self, sock: socket.socket) -> bool:
        """Take a new connection, making room if the cap is reached; False: refuse it."""
        with self._lock:
            if len(self._records) - len(self._closing) >= self.limit:
                victim = self._victim()
                if victim is None:
                    return False
                self._closing.add(victim)
                try:
                    victim.shutdown(socket.SHUT_RDWR)  # its thread wakes up and ends
                except OSError:
                    pass  # already going
            self._records[sock] = [IDLE, self._clock()]
            return True

    def _victim(self) -> socket.socket | None:
        """The oldest idle connection, else the one stalled longest."""
        now = self._clock()
        idle = stalled = None
        for sock, (state, since) in self._records.items():
            if sock in self._closing:
                continue
            if state == IDLE:
                if idle is None or since < idle[1]:
                    idle = (sock, since)
            elif state in (READING, WRITING) and now - since >= STALLED_SECONDS:
                if stalled is None or since < stalled[1]:
                    stalled = (sock, since)
        chosen = idle or stalled
        return chosen[0] if chosen is not None else None

    def states(self) -> list[str]:
        """What each connection is doing now (idle, reading, busy, writing)."""
        with self._lock:
            return [state for state, _ in self._records.values()]

    def mark(self, sock: socket.socket, state: str) -> None:
        record = self._records.get(sock)
        if record is not None:
            record[0], record[1] = state, self._clock()

    def leave(self, sock: socket.socket) -> None:
        with self._lock:
            self._records.pop(sock, None)
            self._closing.discard(sock)

    def refuse(self, sock: socket.socket, answer: bytes) -> None:
        """Answer `answer` and end the connection, without waiting on the client: the answer
        is written if the socket takes it, and the socket is half-closed. It is closed for good
        a moment later (by a later refusal, or close()): closing a socket whose request is still
        arriving would send a reset, which makes the client drop the answer unread."""
        try:
            sock.setblocking(False)
            sock.send(answer)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the client is gone or its buffer is full: it is closed either way
        now = self._clock()
        with self._lock:
            self._refused.append((now, sock))
            done = []
            while self._refused and (now - self._refused[0][0] >= STALLED_SECONDS
                                     or len(self._refused) > LISTEN_BACKLOG):
                done.append(self._refused.popleft()[1])
        for old in done:
            old.close()

    def close(self) -> None:
        with self._lock:
            refused, self._refused = list(self._refused), collections.deque()
        for _, sock in refused:
            sock.close()


def canned_503(message: str, code: str) -> bytes:
    body = error_body(message, "server_error", code)
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))


TOO_MANY_CONNECTIONS = canned_503("Too many connections to the proxy. Please try again shortly.",
                                  "too_many_connections")
SHUTTING_DOWN = canned_503("The proxy is shutting down. Please try again shortly.",
                           "shutting_down")


class ClientDeadlines:
    """Time limits on clients that a socket timeout cannot enforce: a client that trickles a
    byte now and then succeeds at every read, and one that takes a byte now and then at every
    write. set() gives a handler until a deadline to finish reading (or, writing=True, the
    write it is blocked in); a thread checks every DEADLINE_CHECK_SECONDS and cuts the
    connection of a handler whose deadline has passed (its reading side, or both sides for a
    write), so its blocked call returns at once (passed() then says why)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._deadlines: dict[ProxyHandler, tuple[float, int]] = {}
        self._expired: set[ProxyHandler] = set()
        self._closing = threading.Event()
        threading.Thread(target=self._enforce, name="llm_proxy-deadlines", daemon=True).start()

    def set(self, handler: "ProxyHandler", seconds: float | None, writing: bool = False) -> None:
        """From now, `handler` has `seconds` to finish (None: no deadline)."""
        if seconds is None and handler not in self._deadlines and handler not in self._expired:
            return  # nothing to clear: only the handler's own thread adds entries for it
        with self._lock:
            if seconds is None:
                self._deadlines.pop(handler, None)
            else:
                how = socket.SHUT_RDWR if writing else socket.SHUT_RD
                self._deadlines[handler] = (self._clock() + seconds, how)
            self._expired.discard(handler)

    def passed(self, handler: "ProxyHandler") -> bool:
        with self._lock:
            return handler in self._expired

    def close(self) -> None:
        self._closing.set()

    def _enforce(self) -> None:
        while not self._closing.wait(DEADLINE_CHECK_SECONDS):
            now = self._clock()
            with self._lock:
                late = [(h, how) for h, (deadline, how) in self._deadlines.items()
                        if deadline <= now]
                for handler, _ in late:
                    del self._deadlines[handler]
                    self._expired.add(handler)
            for handler, how in late:
                try:
                    handler.connection.shutdown(how)
                except OSError:
                    pass  # already closed


class KeysWatcher:
    """Reloads the keys file when it changes (checked every `interval` seconds) and when asked
    (request(), safe from a signal handler), in its own thread, off the request path; in
    either case only once the file has stayed unchanged for `settle` seconds of `clock`. A
    file rewritten in place is empty or half-written while its writer works: loaded then, a
    disabled key missing its `disabled = true` would be let in with the default limits.

    Methods for the caller: request(), close(); check() makes one look at once (what the
    thread does every `interval` seconds).
    """

    def __init__(self, path: str, reload: Callable[[], bool], interval: float,
                 clock: Callable[[], float] = time.monotonic,
                 settle: float = KEYS_SETTLE_SECONDS, name: str = "llm_proxy-keys") -> None:
        self._path = path
        self._reload = reload
        self._interval = interval
        self._clock = clock
        self._settle = settle
        self._loaded = self._looked = _file_signature(path)  # (what start-up read)
        self._changed_at = clock() - settle   # when the file last looked different
        self._wanted = False                   # a reload is due once the file has settled
        self._asked = threading.Event()
        self._closing = threading.Event()
        threading.Thread(target=self._watch, name=name, daemon=True).start()

    def request(self) -> None:
        self._asked.set()

    def loaded(self, signature: tuple[int, int, int] | None) -> None:
        """The proxy has just loaded the file as it wrote it (`signature`, taken when it did,
        under the folder's lock): no reload due for that version. Another writer's version,
        even one that came in between, differs from it and is reloaded."""
        self._loaded = self._looked = signature
        self._wanted = False

    def close(self) -> None:
        self._closing.set()
        self._asked.set()

    def check(self, asked: bool = False) -> bool:
        """One look at the file: reload it if it changed since it was loaded (or a reload was
        asked) and it has looked the same for `settle` seconds. Whether it was read."""
        now, current = self._clock(), _file_signature(self._path)
        if current != self._looked:
            self._looked, self._changed_at = current, now
        self._wanted = self._wanted or asked or current != self._loaded
        if not self._wanted or now - self._changed_at < self._settle:
            return False
        self._loaded, self._wanted = current, False
        self._reload()
        return True

    def _watch(self) -> None:
        while not self._closing.is_set():
            asked = self._asked.wait(self._interval)
            self._asked.clear()
            if self._closing.is_set():
                return
            self.check(asked)


def _file_signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


#: The start-up line names this many of the upstream's models and counts the rest.
PROBE_NAMED_MODELS = 5
#: The dashboard holds at most this many model names (the upstream decides how many it lists).
PROBE_MAX_MODELS = 100
#: The largest model list read (Ollama with every model pulled is a few KB).
PROBE_MAX_BYTES = 4 * 1024 * 1024
#: A dashboard that reads a finding older than this has the upstream asked again (in the
#: background).
PROBE_REFRESH_SECONDS = 30.0
#: What to check when the upstream does not answer, or answers GET /models with a refusal or
#: with something that is not a model list.
NOT_ANSWERING_HINT = "is the model server running, and is BASE_API_URL right?"
WRONG_URL_HINT = "is BASE_API_URL right (it ends with the API's /v1)?"
PROBE_HINTS: dict[int, str] = {HTTPStatus.UNAUTHORIZED: "is BASE_API_KEY right?",
                               HTTPStatus.FORBIDDEN: "is BASE_API_KEY right?",
                               HTTPStatus.NOT_FOUND: WRONG_URL_HINT}


@dataclass(frozen=True)
class UpstreamFinding:
    """What the upstream said when asked for its models: whether it answered, the models it
    listed (None: no list could be read), and otherwise the problem and what to check."""
    url: str
    answering: bool
    models: tuple[str, ...] | None = None
    problem: str = ""
    hint: str = ""

    def line(self) -> str:
        """The start-up line: what was found, in words."""
        if not self.answering:
            return f"upstream {self.url} is not answering ({self.problem}): {self.hint}"
        if self.models is None:
            return (f"upstream {self.url} answers, but {self.problem}"
                    + (f": {self.hint}" if self.hint else ""))
        if not self.models:
            return f"upstream {self.url} answers, and lists no models"
        named = ", ".join(loggable(name) for name in self.models[:PROBE_NAMED_MODELS])
        more = len(self.models) - PROBE_NAMED_MODELS
        return (f"upstream {self.url} answers with {len(self.models)} "
                f"model{'s' if len(self.models) != 1 else ''} ({named}"
                + (f" and {more} more" if more > 0 else "") + ")")

    def report(self) -> dict[str, object]:
        """The same, for the dashboard."""
        return {"answering": self.answering,
                "model_count": None if self.models is None else len(self.models),
                "models": None if self.models is None else list(self.models[:PROBE_MAX_MODELS]),
                "problem": self.problem or None, "hint": self.hint or None}


def model_names(body: bytes) -> tuple[str, ...] | None:
    """The model ids of an OpenAI model list ({"data": [{"id": ...}]}), None if it is not one."""
    try:
        listing = json.loads(body)
    except ValueError:
        return None
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list):
        return None
    return tuple(str(m["id"]) for m in data if isinstance(m, dict) and "id" in m)


class UpstreamProbe:
    """Asks the upstream for its models (GET {BASE_API_URL}/models, each socket operation
    bounded by OPEN_TIMEOUT) in a thread of its own, so that neither the start nor a request
    ever waits for it, and keeps what it found for the dashboard.

    Methods for the caller: start(announce) (one look in the background, unless one is under
    way; `announce` is given the finding's line), report() (the last finding, None before the
    first; a finding older than PROBE_REFRESH_SECONDS is looked at again in the background),
    look() (one look now, in the caller's thread).
    """

    def __init__(self, upstream: Upstream, api_key: str, timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._upstream = upstream
        self._api_key = api_key
        self._timeout = timeout
        self._clock = clock
        self.url = f"{upstream.scheme}://{upstream.host_header}{upstream.base_path}"
        self._lock = threading.Lock()
        self._looking = False
        self._found: tuple[float, UpstreamFinding] | None = None

    def start(self, announce: Callable[[str], None] | None = None) -> bool:
        with self._lock:
            if self._looking:
                return False
            self._looking = True
        threading.Thread(target=self._run, args=(announce,), name="llm_proxy-probe",
                         daemon=True).start()
        return True

    def report(self) -> dict[str, object] | None:
        with self._lock:
            found = self._found
        if found is None:
            return None
        age = self._clock() - found[0]
        if age >= PROBE_REFRESH_SECONDS:
            self.start()
        return {**found[1].report(), "checked_seconds_ago": round(age, 1)}

    def _run(self, announce: Callable[[str], None] | None) -> None:
        finding = self.look()
        with self._lock:
            self._found, self._looking = (self._clock(), finding), False
        if announce is not None:
            announce(finding.line())

    def look(self) -> UpstreamFinding:
        path = self._upstream.base_path + "/models"
        try:
            status, reason, body = self._get(path)
        except (socket.timeout, TimeoutError):
            return self._silent(f"no answer within {_number(self._timeout)} s")
        except ssl.SSLError as err:
            return self._silent(f"TLS: {getattr(err, 'verify_message', '') or err.reason}")
        except OSError as err:
            return self._silent(err.strerror or type(err).__name__)
        except http.client.HTTPException as err:
            return self._silent(f"not an HTTP answer ({type(err).__name__})")
        if not 200 <= status < 300:
            return UpstreamFinding(self.url, True, None, f"GET {path} answered {status} {reason}",
                                   PROBE_HINTS.get(status, ""))
        models = model_names(body)
        if models is None:
            return UpstreamFinding(self.url, True, None, f"GET {path} gave no model list",
                                   WRONG_URL_HINT)
        return UpstreamFinding(self.url, True, models)

    def _silent(self, problem: str) -> UpstreamFinding:
        return UpstreamFinding(self.url, False, None, problem, NOT_ANSWERING_HINT)

    def _get(self, path: str) -> tuple[int, str, bytes]:
        u = self._upstream
        conn = (http.client.HTTPSConnection(u.host, u.port, timeout=self._timeout,
                                            context=ssl.create_default_context())
                if u.scheme == "https" else
                http.client.HTTPConnection(u.host, u.port, timeout=self._timeout))
        try:
            conn.request("GET", _quoted_path(path), headers={
                "Accept": "application/json",
                **({"Authorization": f"Bearer {self._api_key}"} if self._api_key else {})})
            resp = conn.getresponse()
            return resp.status, resp.reason, resp.read(PROBE_MAX_BYTES)
        finally:
            conn.close()


# ########################################################################## server ####

class ProxyServer(ThreadingHTTPServer):
    """The proxy: a threading HTTP server assembled from its parts (config, keys, bucket store,
    metrics, log, connection cap, client deadlines, keys watcher, forwarder).

    Methods for the caller: serve_forever(), stop() (from any thread, e.g. a signal handler),
    drain(timeout), server_close(), reload_keys(), reload_upstreams(), request_key_reload(),
    check_upstream(). Tunables: request_queue_size (the listen backlog; the default of 5 drops
    handshakes under bursts), daemon_threads; and, for tests, the clocks, the keys watcher's
    key_check_interval and keys_settle_seconds (KeysWatcher; the upstreams file's watcher uses
    them too), and health_check_interval (how often the Router's tick() runs, with
    UPSTREAMS_FILE).
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, config: Config, *, store: "BucketStore | None" = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 log_stream: typing.TextIO | None = None, handler: type = ProxyHandler,
                 key_check_interval: float = 1.0,
                 keys_settle_seconds: float = KEYS_SETTLE_SECONDS,
                 health_check_interval: float = 0.5) -> None:
        self.config = config
        self.access_log = AccessLog(log_stream if log_stream is not None else sys.stderr,
                                    config.log_format == "json")
        self.metrics = Metrics(wall)
        self.started = wall()
        self.default_policy = config.default_policy
        self.key_entries = read_keys_file(config.keys_file) if config.keys_file else []
        self.keys = load_key_ring(config, raw=self.key_entries)  # ConfigError: invalid file
        self.keys_file = KeysFile(config.keys_file, config) if config.keys_file else None
        self._keys_lock = threading.Lock()  # (one reload or change at a time)
        self._cli_seen: set[AuditRow] = set()  # (see _record_hand_edit)
        upstreams = (read_upstreams_file(config.upstreams_file, config)  # ConfigError: invalid
                     if config.upstreams_file else None)
        self.store = store if store is not None else make_store(config, self.log, self.metrics,
                                                                clock)
        self.calendar = Calendar(config.quota_timezone, wall)
        self.ledger = Ledger(config.ledger_retention_days)
        self.state: StateFile | None = None
        self.writer: StateWriter | None = None
        #: at exit, what the state could not take, in words ("": everything was written)
        self.unwritten = ""
        if state_path(config) and isinstance(self.store, MemoryBucketStore):
            self.state = StateFile(state_path(config))  # ConfigError: it cannot be used
            try:
                self.state.load(self.store, wall())
            except ConfigError:
                self.state.close()
                raise
        gate = (FairGate(config.max_upstream_concurrency, config.fair_queue,
                         config.priority_max_wait_seconds, clock)
                if config.max_upstream_concurrency else None)
        self.routes = RouteTable(DEFAULT_ROUTES + tuple(extra_route(*row)
                                                        for row in config.extra_routes))
        self.cors = CorsPolicy(config.cors_origins,
                               bool(config.keys_file or config.proxy_api_keys))
        self.forwarder = Forwarder(config, gate, self.metrics, upstreams, clock)
        self.forwarder.router.tick()  # (UPSTREAMS_FILE: the model lists it does not give)
        self.probe = UpstreamProbe(self.forwarder.upstreams["v1"], config.base_api_key,
                                   config.open_timeout, clock)
        self.key_slots = KeySlots(config.max_concurrent_per_key)
        #: the requests being handled now (a set's own calls: no lock needed to change it)
        self.exchanges: set[Exchange] = set()
        self._tally: tuple[float, float, LedgerTally] | None = None  # (see tally())
        self._tally_lock = threading.Lock()
        self._idle = threading.Condition()  # (told when no request is in flight: see drain)
        self._draining_waits = False
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        self.cap = ConnectionCap(config.max_connections, clock)
        self.streams = (StreamRelay(config.send_timeout, mark=self.cap.mark)
                        if config.stream_relay == "loop" and StreamRelay.available else None)
        self.draining = False
        #: this process's name in Via headers (RFC 9110 section 7.6.3): a request that already
        #: carries it has come round in a loop
        self.via = "llm_proxy-" + secrets.token_hex(4)
        self.deadlines = ClientDeadlines()
        self.upstreams_watcher = (KeysWatcher(config.upstreams_file, self.reload_upstreams,
                                              key_check_interval, clock, keys_settle_seconds,
                                              name="llm_proxy-upstreams")
                                  if config.upstreams_file else None)
        self.health_checks = (Ticker(self.forwarder.router.tick, health_check_interval,
                                     "llm_proxy-health") if config.upstreams_file else None)
        if self.state is not None:
            # (a state file is kept for the memory store only: see above)
            self.writer = StateWriter(self.state, self.store, self.ledger,  # type: ignore[arg-type]
                                      config.state_flush_seconds, self.log, wall)
        elif isinstance(self.store, RedisBucketStore):  # the ledger is shared there
            self.redis_ledger = self.store.ledger(config.ledger_retention_days)
            self.writer = StateWriter(self.redis_ledger, None, self.ledger,
                                      config.state_flush_seconds, self.log, wall)
        self.audit = AuditTrail(self.state, self.writer.flushing if self.state is not None
                                and self.writer is not None else None, self.log)
        self.keys_watcher = (  # (after the audit trail, which a reload writes to)
            KeysWatcher(config.keys_file, self.reload_keys, key_check_interval, clock,
                        keys_settle_seconds)
            if config.keys_file else None)
        # Last: when binding fails, socketserver calls server_close(), which closes every
        # part above (OSError: the address cannot be used; the caller says so in one line).
        super().__init__((config.host, config.port), handler)

    @property
    def pool(self) -> UpstreamPool:
        return self.forwarder.pool

    @property
    def gate(self) -> FairGate | None:
        return self.forwarder.gate

    @property
    def connections(self) -> int:
        return self.cap.count

    # -- connections (socketserver's hooks) -------------------------------------------------

    def process_request(self, request: typing.Any, client_address: object) -> None:
        """One thread per connection, up to MAX_CONNECTIONS (the cap makes room by closing idle
        or stalled connections, else refuses with a 503); a 503 while shutting down. (The
        request is the connection's socket: socketserver's type also allows a datagram's.)"""
        if self.draining:
            self.cap.refuse(request, SHUTTING_DOWN)
            return
        if not self.cap.admit(request):
            self.cap.refuse(request, TOO_MANY_CONNECTIONS)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.cap.leave(request)
            raise

    def process_request_thread(self, request: typing.Any, client_address: object) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.cap.leave(request)

    def handle_error(self, request: object, client_address: object) -> None:
        """socketserver prints a traceback here; log one line instead. A client resetting its
        connection between requests is ordinary and not logged."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        self.log(f"error: {type(exc).__name__} on connection from {client_address}")

    # -- requests in flight, the log --------------------------------------------------------

    def request_started(self, ex: Exchange) -> None:
        self.exchanges.add(ex)

    def request_finished(self, ex: Exchange) -> None:
        """The request is done. The last one in flight tells drain() when it waits: drain
        looks under the condition's lock, so a wake-up cannot fall between its look and its
        wait."""
        self.exchanges.discard(ex)
        if not self.exchanges and self._draining_waits:
            with self._idle:
                self._idle.notify_all()

    def tally(self, until: float, day_start: float,
              make: Callable[[], LedgerTally]) -> LedgerTally:
        """A copy of the ledger's tally of the hours before `until` (made again when `until`
        or the day moves on), for the dashboard to add the last hours to."""
        with self._tally_lock:
            if self._tally is None or self._tally[:2] != (until, day_start):
                self._tally = (until, day_start, make())
            return self._tally[2].copy()

    def forwarded_in_flight(self) -> dict[str, int]:
        """Forwarded requests being handled now (waiting for their turn included), by bucket
        key."""
        counts: dict[str, int] = {}
        for ex in list(self.exchanges):
            if ex.route is not None and ex.route.kind not in (LOCAL, ADMIN) and ex.bucket_key:
                counts[ex.bucket_key] = counts.get(ex.bucket_key, 0) + 1
        return counts

    @property
    def requests_in_flight(self) -> int:
        return len(self.exchanges)

    def log(self, message: str) -> None:
        """An operational message (errors, reloads), in the configured LOG_FORMAT."""
        self.access_log.message(message)

    def log_access(self, ex: Exchange) -> None:
        """The access-log line, the request's metrics and its row of the usage ledger, once
        per request."""
        elapsed = (time.perf_counter() - ex.started) * 1000
        cost = ex.cost
        charge, route = ex.charge, ex.route
        if charge is not None and route is not None and route.kind in (GENERATE, EMBED):
            model = ex.payload.get("model") if ex.payload is not None else None
            hour = int(self.calendar.wall() // 3600 * 3600)
            self.ledger.record(hour, user_bucket_key(ex.bucket_key, ex.user) if ex.user
                               else ex.bucket_key, ex.label,
                               model if isinstance(model, str) else "", route.kind,
                               (1, int(charge.state == "declined"), charge.prompt_tokens,
                                charge.completion_tokens, charge.cost))
        self.metrics.count_request(ex.label, ex.route_label, ex.status, cost,
                                   route is not None and route.kind not in (LOCAL, ADMIN),
                                   charge is not None and charge.state == "declined")
        self.access_log.access(ex, cost, elapsed)  # (last: a line says all is done)

    def usage_rows(self, since: float, until: float,
                   key: str | None = None) -> list[tuple[LedgerKey, list[int]]]:
        """The usage ledger's rows of hours from `since` to before `until` (of one bucket
        key): what the state file holds and what it has not taken yet."""
        if self.writer is None:
            return self.ledger.rows(since, until, key)
        with self.writer.flushing:  # (not while a flush moves rows from here to there)
            if self.state is not None:
                # (through the writer's own connection, which the lock keeps to one thread: a
                # file deleted under the proxy is still the one it wrote)
                kept = ledger_rows(self.state.db, since, until, key)
            else:
                try:
                    kept = self.redis_ledger.rows(since, until, key)
                except self.redis_ledger.errors:
                    kept = []  # Redis is away: what this instance has not written yet
            return kept + self.ledger.rows(since, until, key)

    def render_metrics(self) -> str:
        return self.metrics.render({"llm_proxy_requests_in_flight": len(self.exchanges),
                                    "llm_proxy_buckets": len(self.store),
                                    "llm_proxy_keys": len(self.keys),
                                    "llm_proxy_store_up": 1 if self.store.status().get(
                                        "reachable", True) else 0,
                                    "llm_proxy_state_written": 0 if self.writer is not None
                                    and self.writer.problem is not None else 1}) \
            + "".join(line + "\n" for line in upstream_metric_lines(self.metrics,
                                                                     self.forwarder.router))

    # -- keys -------------------------------------------------------------------------------

    @property
    def key_entries(self) -> list[dict]:
        """The keys file's entries as last loaded (what a hand edit is compared with)."""
        return self._key_entries

    @key_entries.setter
    def key_entries(self, entries: list[dict]) -> None:
        self._key_entries = entries
        self._entry_named = {e.get("name"): e for e in entries}

    def key_entry(self, name: str) -> dict | None:
        """The keys file's entry named `name`, as last loaded."""
        return self._entry_named.get(name)

    def reload_keys(self) -> bool:
        """Read the keys file again. An invalid file leaves the keys in force as they were.
        Balances live in the store under each key's digest, so they carry over; a lowered
        max_tokens clamps them at the next request. What a hand edit changed is recorded in
        the audit trail."""
        with self._keys_lock:
            try:
                entries = read_keys_file(self.config.keys_file)
                ring = load_key_ring(self.config, pause=lambda: time.sleep(0.0005),
                                     raw=entries)
            except ConfigError as err:
                self.metrics.inc("llm_proxy_key_reloads_total", (("result", "error"),))
                self.log(f"keys file not reloaded, the keys in force stay: {err}")
                return False
            self._record_hand_edit(entries)
            self.keys = ring  # one assignment: a request sees the old ring or the new one
        self.metrics.inc("llm_proxy_key_reloads_total", (("result", "ok"),))
        self.log(f"keys file reloaded: {len(ring)} keys")
        return True

    def check_upstream(self) -> None:
        """Ask the upstream for its models in the background and log what it said in one line
        (the first run's "is anything there?"); the dashboard shows the same."""
        self.probe.start(self.log)

    def _record_hand_edit(self, entries: list[dict]) -> None:
        """Audit rows for what the keys file holds that was not loaded last (a hand edit).
        A change `llm_proxy.py keys` made is in the trail already (the command line records
        it before its rename): not recorded twice."""
        now = self.calendar.wall()
        changes = entry_changes(self.key_entries, entries)
        recorded = self._cli_rows() if changes else []
        for action, name, fields in changes:
            mine = next((r for r in recorded if r.key == name and
                         {"rotated": "changed"}.get(r.action, r.action) == action), None)
            if mine is not None:
                recorded.remove(mine)
                self._cli_seen.add(mine)
                continue
            self.audit.record(AuditRow(now, "file", self.config.keys_file, action, name,
                                       tuple(fields)))
        self.key_entries = entries

    def _cli_rows(self) -> list[AuditRow]:
        """The command line's audit rows not yet matched with a change seen at a reload."""
        try:
            rows = self.audit.rows(0, 200)
        except sqlite3.Error:
            return []
        return [r for r in reversed(rows) if r.who == "cli" and r not in self._cli_seen]

    def change_keys(self, apply: Callable[[list[dict]], object], who: str, origin: str,
                    action: str, name: str, fields: Iterable[str]) -> object:
        """Make a change to the keys file (KeysFile.change) and put it in force at once (not
        after KEYS_SETTLE_SECONDS: the proxy wrote the file whole); the audit row says who
        did it, from where. What apply returned (a new secret, shown once)."""
        if self.keys_file is None:
            raise ProxyError(HTTPStatus.CONFLICT, "Keys are managed in KEYS_FILE, which is not "
                             "set: start the proxy with KEYS_FILE=keys.json (a file that does "
                             "not exist yet is made at the first change).",
                             code="no_keys_file")
        with self._keys_lock:
            result, before, after = self.keys_file.change(apply)
            self._record_hand_edit(before)
            self.keys = load_key_ring(self.config, raw=after)
            self.key_entries = after
        if self.keys_watcher is not None:
            self.keys_watcher.loaded(self.keys_file.written)
        if action == "changed":  # the fields that did change, not all that were sent
            fields = next((f for _, n, f in entry_changes(before, after) if n == name), [])
        self.audit.record(AuditRow(self.calendar.wall(), who, origin, action, name,
                                   tuple(fields)))
        self.metrics.inc("llm_proxy_key_reloads_total", (("result", "ok"),))
        return result

    def request_key_reload(self) -> None:
        """Reload the keys file (and the upstreams file) soon, off the request path (safe
        from a signal handler: SIGHUP)."""
        if self.keys_watcher is not None:
            self.keys_watcher.request()
        if self.upstreams_watcher is not None:
            self.upstreams_watcher.request()

    def reload_upstreams(self) -> bool:
        """Read the upstreams file again. An invalid file leaves the servers in force as they
        were; a server whose entry is unchanged keeps its connections, queue and health."""
        try:
            spec = read_upstreams_file(self.config.upstreams_file, self.config)
        except ConfigError as err:
            self.metrics.inc("llm_proxy_upstreams_reloads_total", (("result", "error"),))
            self.log(f"upstreams file not reloaded, the upstreams in force stay: {err}")
            return False
        router = self.forwarder.router
        router.apply(spec)
        router.tick()  # (the model lists of the new servers that give none in the file)
        self.metrics.inc("llm_proxy_upstreams_reloads_total", (("result", "ok"),))
        self.log(f"upstreams file reloaded: {len(spec.upstreams)} upstreams, "
                 f"{len(spec.aliases)} aliases")
        return True

    # -- stopping ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop taking requests (safe from a signal handler: shutdown() runs elsewhere): new
        connections get a 503 until serve_forever() returns, kept-alive ones are closed after
        their request."""
        self.draining = True
        threading.Thread(target=self.shutdown, name="llm_proxy-shutdown", daemon=True).start()

    def drain(self, timeout: float) -> bool:
        """Wait until no request is in flight, at most `timeout` seconds. (The flag is set
        before the look: a request that ends after the look sees it and tells.)"""
        with self._idle:
            self._draining_waits = True
            return self._idle.wait_for(lambda: not self.exchanges, timeout)

    def stop_listening(self) -> None:
        """Close the listening socket, so that new connections are refused by the system; those
        already waiting in its backlog are answered 503 first rather than reset."""
        self.socket.setblocking(False)
        try:
            while True:
                sock, _ = self.socket.accept()
                self.cap.refuse(sock, SHUTTING_DOWN)
        except OSError:
            pass  # (BlockingIOError: nothing more is waiting)
        self.socket.close()

    def cut_short(self) -> int:
        """End what is still in flight at the end of the drain: every answer being relayed is
        cut (a stream gets its API's last error event), every queued request is turned away.
        How many answers were cut."""
        return self.forwarder.cut()

    def server_close(self) -> None:
        self.deadlines.close()
        self.cap.close()
        if self.writer is not None:
            lost = self.writer.stop()  # the last write: what changed since the last flush
            if lost:
                self.unwritten = lost
                self.log(f"error: at exit, {lost}")
        if self.keys_watcher is not None:
            self.keys_watcher.close()
        if self.upstreams_watcher is not None:
            self.upstreams_watcher.close()
        if self.health_checks is not None:
            self.health_checks.close()
        super().server_close()
        if self.streams is not None:
            self.streams.close()
        self.forwarder.close()

    @property
    def url(self) -> str:
        host, port = typing.cast("tuple[str, int]", self.server_address[:2])
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"


# ############################################################################# CLI ####

def points_at_itself(config: Config, server: ProxyServer) -> bool:
    """Whether an upstream is this proxy's own listening address (a mistyped port)."""
    port = server.server_address[1]
    own = {"0.0.0.0", "::", str(server.server_address[0])}
    for upstream in [u for s in server.forwarder.router.servers for u in s.upstreams.values()]:
        if upstream.port != port:
            continue
        try:
            found = {str(info[4][0]) for info in socket.getaddrinfo(upstream.host, port)}
        except OSError:
            continue
        if any(ip in own or ip.startswith("127.") or ip == "::1" for ip in found):
            return True
    return False


def describe(config: Config, server: ProxyServer) -> list[str]:
    upstream = Upstream.from_url(config.base_api_url)
    mode = (f"{config.request_token_cost} per request" if config.token_cost_mode == "request"
            else f"{config.token_cost_mode}, reserve {config.response_token_reserve}")
    router = server.forwarder.router
    return [
        f"llm_proxy {__version__} listening on {server.url}",
        (f"upstreams ({config.upstreams_file}, reloaded on change and SIGHUP): " + ", ".join(
            f"{s.name} {s.spec.url}" for s in router.servers)
         + f"; {len(router.aliases)} aliases" if router.several else
         f"upstream {upstream.scheme}://{upstream.host}:{upstream.port}")
        + (f", model rewritten to {config.base_model}" if config.base_model else ""),
        f"buckets: {config.max_tokens} tokens, +{config.refill_tokens} every "
        f"{_number(config.refill_interval_seconds)} s; cost: {mode}; limit answer: "
        f"{config.limit_response}; store: "
        + (f"redis (prefix {config.redis_prefix}, failure mode {config.redis_failure_mode})"
           if config.redis_url else "memory") + "; keys: "
        + (f"{len(server.keys)} accepted" if server.keys else "any (open)")
        + (f" (keys file {config.keys_file}, reloaded on change and SIGHUP)"
           if config.keys_file else ""),
        "state: " + (f"{server.state.path} (SQLite, written every "
                     f"{_number(config.state_flush_seconds)} s)" if server.state is not None
                     else "balances, quotas and the usage ledger in Redis" if config.redis_url
                     else "memory only (STATE_DB=off): a restart starts every bucket full")
        + "; quotas: " + (", ".join(
            f"{value} {label}" for value, label in (
                (config.tokens_per_day, "tokens a day"),
                (config.tokens_per_month, "tokens a month"),
                (config.requests_per_day, "requests a day")) if value is not None)
            + f" ({config.quota_timezone})" if config.default_policy.calendar else "none"),
    ]


def start_as_module() -> None:
    """`python3 llm_proxy.py`: start again at once, in the same process (exec: the same pid,
    the same open files), as this file imported as a module, and so without the memory a
    script keeps. CPython holds a script's parse tree for as long as the script runs, and it
    is what keeps the compiler's memory from going back to the system (with it, 50 MiB from
    the start; without it and give_back_start_memory, 30); a module's tree is freed once it
    is compiled (and its compiled form cached, where __pycache__ can be written). The command
    line names this file and keeps the interpreter's options. Not under a debugger, a profiler
    or a frozen build, nor off POSIX, nor for a copy whose name cannot be imported
    (/usr/local/bin/llm-proxy): there the script runs on as it started. Returns only where it
    does not start again."""
    script = os.path.abspath(__file__)
    module, extension = os.path.splitext(os.path.basename(script))
    if __spec__ is not None or os.name != "posix" or getattr(sys, "frozen", False) \
            or not sys.executable or sys.gettrace() is not None \
            or sys.getprofile() is not None or extension != ".py" or not module.isidentifier():
        return
    given = getattr(sys, "orig_argv", [])
    options = given[1:given.index(sys.argv[0], 1)] if sys.argv[0] in given[1:] else []
    start = (f"import os, runpy, sys; script = {script!r}; "
             "sys.path.insert(0, os.path.dirname(script)); "
             f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    try:
        os.execv(sys.executable, [sys.executable, *options, "-c", start, *sys.argv[1:]])
    except OSError:
        return  # (the script runs on as it started)


def give_back_start_memory() -> None:
    """Return to the system what starting took and no longer uses (compiling this file
    takes some 20 MiB, freed once done but kept by the C allocator): glibc's malloc_trim.
    Elsewhere (another C library, no ctypes) nothing happens."""
    try:
        import ctypes
        trim = ctypes.CDLL(None).malloc_trim
    except (ImportError, OSError, AttributeError):
        return
    trim(0)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["keygen"]:
        return keygen_main(argv[1:])
    if argv[:1] == ["usage"]:
        return usage_main(argv[1:], environ)
    if argv[:1] == ["keys"]:
        return keys_main(argv[1:], environ)
    if argv[:1] == ["audit"]:
        return audit_main(argv[1:], environ)
    try:
        config = Config.from_env(environ, argv)
    except ConfigError as err:
        print(f"llm_proxy: {err}", file=sys.stderr)
        return 2
    try:
        server = ProxyServer(config)
    except ConfigError as err:
        print(f"llm_proxy: {err}", file=sys.stderr)
        return 2
    except socket.gaierror as err:  # a well-formed name that names no address
        print(f"llm_proxy: HOST {config.host} is not an address of this machine "
              f"({err.strerror or err})", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"llm_proxy: cannot listen on {config.host}:{config.port}: {err.strerror or err}",
              file=sys.stderr)
        return 1
    warnings = config.warnings() + (
        ["BASE_API_URL is this proxy's own address: every request would come back to it "
         "(each is answered 508 Loop Detected)"] if points_at_itself(config, server) else [])
    for line in describe(config, server) + [f"warning: {w}" for w in warnings]:
        print(line, file=sys.stderr, flush=True)
    server.check_upstream()
    if server.streams is not None:
        server.streams.switch_interval = SWITCH_INTERVAL  # (while streams are relayed)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.stop())
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: server.request_key_reload())
    give_back_start_memory()
    status = 0
    try:
        server.serve_forever()
        server.stop_listening()
        if not server.drain(config.drain_timeout):
            cut = server.cut_short()
            server.drain(SHUTDOWN_CUT_SECONDS)
            print(f"llm_proxy: DRAIN_TIMEOUT passed with requests in flight: {cut} answers "
                  "were cut short", file=sys.stderr)
            status = 1
    finally:
        server.server_close()
    if server.unwritten:
        status = 1  # (server_close logged what a restart will not see)
    print("llm_proxy: stopped", file=sys.stderr)
    return status


def usage_main(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """python3 llm_proxy.py usage: the usage report, read from the state file (while the
    proxy runs, too) or from Redis."""
    parser = _ArgumentParser(prog="llm_proxy.py usage",
                             description="Print the usage report from the proxy's state.")
    parser.add_argument("--since", help="from this date (2026-11-01) or date and time, in "
                        "QUOTA_TIMEZONE (default: the start of this month)")
    parser.add_argument("--until", help="up to this date or date and time, excluded "
                        "(default: now)")
    parser.add_argument("--by", choices=REPORT_GROUPS, default="key")
    parser.add_argument("--key", metavar="NAME", help="only this key (its name)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    try:
        args, rest = parser.parse_known_args(argv)
        config = Config.from_env(environ, rest)
        calendar = Calendar(config.quota_timezone)
        since, until = report_window(calendar, args.since, args.until)
        path = state_path(config)
        if config.redis_url:
            rows = redis_ledger_rows(config, since, until)
        elif not path:
            raise ConfigError("STATE_DB is off: there is no usage to report")
        else:
            rows = read_ledger(path, since, until)
    except ConfigError as err:
        print(f"llm_proxy usage: {err}", file=sys.stderr)
        return 2
    if args.key is not None:
        rows = [(e, c) for e, c in rows if e.name == args.key]
    print(format_report(usage_report(rows, args.by, calendar), args.by, args.format), end="")
    return 0


def keygen_main(argv: Sequence[str]) -> int:
    parser = _ArgumentParser(prog="llm_proxy.py keygen",
                             description="Print a new random key and its keys-file entry.")
    parser.add_argument("--name", required=True, help="the key's name in logs and metrics")
    try:
        args = parser.parse_args(argv)
    except ConfigError as err:
        print(f"llm_proxy keygen: {err}", file=sys.stderr)
        return 2
    print(keygen(args.name), end="")
    return 0


#: keys add's options: --flag -> the entry field it sets (and how its text is read)
_KEY_OPTIONS = (("max_tokens", int), ("refill_tokens", int), ("refill_interval_seconds", float),
                ("request_token_cost", int), ("tokens_per_day", int), ("tokens_per_month", int),
                ("requests_per_day", int), ("max_concurrent", int), ("max_output_tokens", int),
                ("max_reserve_tokens", int), ("token_cost_mode", str), ("limit_response", str),
                ("priority", str), ("note", str))


def cli_origin() -> str:
    """Where a change by the command line comes from, for the audit trail: user@host."""
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or str(os.getuid()) \
        if hasattr(os, "getuid") else "?"
    return f"{user}@{socket.gethostname()}"


def field_value(field: str, text: str) -> object:
    """A `keys set` value: null removes the field; numbers, true/false and lists
    (models=a,b) as the field wants them; anything else a string."""
    if text == "null":
        return None
    if field == "models":
        return [m.strip() for m in text.split(",") if m.strip()]
    if field == "disabled":
        return {"true": True, "false": False}.get(text, text)
    if field == "refill_interval_seconds":
        with contextlib.suppress(ValueError):
            return float(text) if "." in text else int(text)
    if field in _ENTRY_FIELDS and _ENTRY_FIELDS[field](1):
        with contextlib.suppress(ValueError):
            return int(text)
    return text


def keys_main(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """python3 llm_proxy.py keys add|list|set|disable|enable|delete|rotate: change KEYS_FILE
    in place, whether the proxy runs or not (a running proxy reloads it)."""
    parser = _ArgumentParser(prog="llm_proxy.py keys", description="Manage the keys in "
                             "KEYS_FILE (the proxy, if it runs, takes the change at its next "
                             "look at the file).")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="a new key; its secret is printed once")
    add.add_argument("name")
    for field, kind in _KEY_OPTIONS:
        add.add_argument("--" + field.replace("_", "-"), dest=field, type=kind)
    add.add_argument("--models", help="comma-separated model names it may use")
    add.add_argument("--expires", dest="expires_at",
                     help="2027-01-31 or 2027-01-31T18:00 (QUOTA_TIMEZONE unless an offset)")
    commands.add_parser("list", help="the keys, without secrets")
    change = commands.add_parser("set", help="change fields: field=value (null removes one)")
    change.add_argument("name")
    change.add_argument("assignments", nargs="+", metavar="field=value")
    for name in ("disable", "enable", "delete"):
        commands.add_parser(name).add_argument("name")
    rotate = commands.add_parser("rotate", help="a new secret; the old one works --grace s")
    rotate.add_argument("name")
    rotate.add_argument("--grace", type=float, default=0.0, help="seconds (default 0)")
    try:
        args, rest = parser.parse_known_args(argv)
        config = Config.from_env(environ, rest)
        if not config.keys_file:
            raise ConfigError("KEYS_FILE is not set: say which file holds the keys")
    except ConfigError as err:
        print(f"llm_proxy keys: {err}", file=sys.stderr)
        return 2
    editor = KeysFile(config.keys_file, config)
    if args.command == "list":
        return _list_keys(editor, config)
    try:
        secret = _change_by_cli(editor, config, args)
    except (ProxyError, ConfigError) as err:
        print(f"llm_proxy keys: {getattr(err, 'message', err)}", file=sys.stderr)
        return 1
    if secret:
        print(f"key (give it to {args.name}; it is not stored anywhere, and not shown again): "
              f"{secret}")
    else:
        print(f"{args.command}: {args.name}")
    return 0


def _change_by_cli(editor: KeysFile, config: Config, args: argparse.Namespace) -> str:
    """Make the change `args` asks for, record it (state file, if kept), and return the new
    secret ("" for none)."""
    tz, now, name = time_zone(config.quota_timezone), time.time(), args.name
    action, secret = "changed", ""
    fields: list[str] = []
    written: list[AuditRow] = []

    def record() -> None:  # before the rename: a proxy that reloads finds the row there
        if written:
            return
        row = AuditRow(now, "cli", cli_origin(), action, name, tuple(fields))
        path = state_path(config)
        if path and not config.redis_url:
            append_audit_file(path, row)
        written.append(row)
        print(row.line(), file=sys.stderr)

    editor.before_rename = record
    if args.command == "add":
        given = {field: getattr(args, field) for field, _ in _KEY_OPTIONS}
        given["expires_at"] = args.expires_at
        given["models"] = field_value("models", args.models) if args.models else None
        checked = checked_fields({f: v for f, v in given.items() if v is not None}, tz, False)
        action, fields = "added", ["key", *sorted(checked)]
        secret = str(editor.change(lambda entries: add_entry(entries, name, checked, now))[0])
    elif args.command == "set":
        pairs = [a.partition("=") for a in args.assignments]
        bad = [a for a, sep, _ in pairs if not sep]
        if bad:
            raise ConfigError(f"{bad[0]}: write field=value")
        changes = checked_fields({f: field_value(f, v) for f, _, v in pairs}, tz, True)
        fields = sorted(changes)
        editor.change(lambda entries: change_entry(entries, name, changes))
    elif args.command in ("disable", "enable"):
        fields = ["disabled"]
        editor.change(lambda entries: change_entry(entries, name,
                                                   {"disabled": args.command == "disable"}))
    elif args.command == "delete":
        action = "removed"
        editor.change(lambda entries: delete_entry(entries, name))
    elif args.command == "rotate":
        if not 0 <= args.grace <= 366 * 86400:
            raise ConfigError("--grace must be from 0 to 31622400 seconds")
        action, fields = "rotated", ["key"]
        secret = str(editor.change(lambda entries: rotate_entry(entries, name, args.grace,
                                                                 now))[0])
    return secret


def _list_keys(editor: KeysFile, config: Config) -> int:
    try:
        entries = editor.read()
    except ConfigError as err:
        print(f"llm_proxy keys: {err}", file=sys.stderr)
        return 2
    for entry in entries:
        shown = {f: v for f, v in public_entry(entry, None, 0).items() if f != "name"}
        print(f"{entry.get('name')}  " + " ".join(f"{f}={json.dumps(v)}"
                                                  for f, v in shown.items()))
    if not entries:
        print(f"no keys in {config.keys_file}")
    return 0


def audit_main(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """python3 llm_proxy.py audit: the changes to the keys, newest first, from the state
    file (while the proxy runs, too)."""
    parser = _ArgumentParser(prog="llm_proxy.py audit",
                             description="Print the audit trail of changes to the keys.")
    parser.add_argument("--since", help="from this date or date and time, in QUOTA_TIMEZONE")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--format", choices=("table", "json"), default="table")
    try:
        args, rest = parser.parse_known_args(argv)
        config = Config.from_env(environ, rest)
        calendar = Calendar(config.quota_timezone)
        since = report_window(calendar, args.since, None)[0] if args.since else 0.0
        path = state_path(config)
        if not path or config.redis_url:
            raise ConfigError("the audit trail is kept in STATE_DB, which is off here (the "
                              "proxy's log has each change as an audit: line)")
        rows = read_audit_file(path, since, max(1, args.limit))
    except ConfigError as err:
        print(f"llm_proxy audit: {err}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps([r.as_json(calendar.tz) for r in rows], indent=2))
        return 0
    print("when                       who    from                      action   key  fields")
    for r in rows:
        shown = r.as_json(calendar.tz)
        print(f"{shown['at']:<26} {r.who:<6} {r.origin:<25} {r.action:<8} {r.key}  "
              f"{', '.join(r.fields)}")
    return 0

# ##################################################################### page assets ####

# The pages' HTML, style and scripts (see "the pages' answers"): plain, no framework, nothing
# loaded from elsewhere. Whatever came from a client is set as text (textContent), never as
# markup.

def page_html(*, page: str, title: str, header: str, login_title: str, key_id: str,
              key_label: str, button: str, notes: str, content: str) -> str:
    """A page's HTML: its head (the proxy's own style and scripts: pages.js, then the page's),
    the header, the sign-in form, and the dashboard around `content`."""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<meta name="referrer" content="no-referrer">
<title>llm_proxy &middot; {title}</title>
<link rel="stylesheet" href="/ui/style.css">
<script src="/ui/pages.js" defer></script>
<script src="/ui/{page}.js" defer></script>
</head>
<body>
<header class="top">
  <h1>llm_proxy <span class="sub">{page}</span></h1>
  <span id="version" class="meta"></span>
{header}  <span class="spacer"></span>
  <span id="updated" class="meta"></span>
  <button id="signout" type="button" hidden>Sign out</button>
</header>
<main>
  <p id="loading" class="meta">Loading&hellip;</p>

  <section id="login" class="panel login" aria-labelledby="login-title" hidden>
    <h2 id="login-title">{login_title}</h2>
    <form id="login-form" novalidate>
      <label for="{key_id}">{key_label}</label>
      <div class="row">
        <input id="{key_id}" name="{key_id}" type="password" autocomplete="current-password"
               spellcheck="false" autocapitalize="off" required>
        <button type="submit" class="primary">{button}</button>
      </div>
      <p id="login-error" class="error" role="alert" aria-live="assertive"></p>
    </form>
    <p class="meta">The key is kept in this tab only (session storage) and sent as a bearer
      token; it is forgotten when the tab closes or you sign out.</p>
  </section>

  <section id="dashboard" hidden>
{notes}    <p id="status" class="status" role="status" aria-live="polite"></p>

    <div id="content" hidden>
{content}    </div>
  </section>
</main>
</body>
</html>
"""


ADMIN_HTML = page_html(
    page="admin", title="admin", header='  <span id="uptime" class="meta"></span>\n',
    login_title="Sign in", key_id="admin-key", key_label="Admin key", button="Sign in",
    notes='    <p id="local-note" class="note" hidden>Admin by this machine, no key needed.</p>\n',
    content="""\
      <h2 class="visually-hidden">Summary</h2>
      <div id="cards" class="cards"></div>

      <h2 id="keys-title">Keys</h2>
      <div class="table-wrap">
        <table id="keys" aria-labelledby="keys-title">
          <thead>
            <tr>
              <th scope="col">Key</th>
              <th scope="col" class="n">Balance</th>
              <th scope="col">Next refill</th>
              <th scope="col" class="n">Tokens today</th>
              <th scope="col" class="n">Tokens this month</th>
              <th scope="col" class="n">Requests today</th>
              <th scope="col" class="n">Limited today</th>
              <th scope="col" class="n">In flight</th>
              <th scope="col" class="n">Waiting</th>
              <th scope="col">Manage</th>
            </tr>
          </thead>
          <tbody></tbody>
        </table>
      </div>
      <p class="meta phone-only">Swipe the table sideways for more columns.</p>
      <p id="no-keys" class="meta" hidden>No keys are configured.</p>

      <section id="manage" class="panel" aria-labelledby="manage-title">
        <h2 id="manage-title">New key</h2>
        <p id="manage-readonly" class="note" hidden></p>
        <div id="secret-box" class="secret" role="alert" hidden>
          <p><strong>Copy this key now.</strong> It is shown only this once and is not stored
            anywhere: if it is lost, rotate the key to get a new one.</p>
          <p><code id="secret-value"></code>
            <button type="button" id="copy-secret">Copy</button>
            <button type="button" id="hide-secret">Done</button></p>
          <p id="copy-status" class="meta" aria-live="polite"></p>
        </div>
        <form id="key-form" class="key-form">
          <input type="hidden" id="kf-editing" value="">
          <label>Name <input id="kf-name" required maxlength="200" autocomplete="off"></label>
          <label>Bucket size (max_tokens) <input id="kf-max_tokens" type="number" min="1"></label>
          <label>Refill tokens <input id="kf-refill_tokens" type="number" min="1"></label>
          <label>Refill every (s) <input id="kf-refill_interval_seconds" type="number" min="0" step="any"></label>
          <label>Tokens per day <input id="kf-tokens_per_day" type="number" min="1"></label>
          <label>Tokens per month <input id="kf-tokens_per_month" type="number" min="1"></label>
          <label>Requests per day <input id="kf-requests_per_day" type="number" min="1"></label>
          <label>Models (comma-separated) <input id="kf-models" autocomplete="off"></label>
          <label>Expires <input id="kf-expires_at" placeholder="2027-01-31 or 2027-01-31T18:00" autocomplete="off"></label>
          <label>Priority <select id="kf-priority"><option value="">normal (default)</option>
            <option value="high">high</option><option value="normal">normal</option>
            <option value="low">low</option></select></label>
          <label>Max concurrent <input id="kf-max_concurrent" type="number" min="1"></label>
          <label>Note <input id="kf-note" maxlength="1000" autocomplete="off"></label>
          <p><button type="submit" id="kf-submit">Create key</button>
            <button type="button" id="kf-cancel" hidden>Cancel</button></p>
        </form>
        <p id="manage-status" class="meta" role="status"></p>
      </section>

      <h2 id="audit-title">Recent changes to keys</h2>
      <div class="table-wrap">
        <table id="audit" aria-labelledby="audit-title">
          <thead>
            <tr>
              <th scope="col">When</th><th scope="col">Who</th><th scope="col">From</th>
              <th scope="col">What</th><th scope="col">Key</th><th scope="col">Fields</th>
            </tr>
          </thead>
          <tbody></tbody>
        </table>
      </div>
      <p id="no-audit" class="meta" hidden>No changes recorded yet.</p>

      <h2 id="models-title">Models</h2>
      <div class="table-wrap">
        <table id="models" aria-labelledby="models-title">
          <thead>
            <tr>
              <th scope="col">Model</th>
              <th scope="col" class="n">Tokens today</th>
              <th scope="col" class="n">Requests today</th>
              <th scope="col" class="n">Tokens this month</th>
              <th scope="col" class="n">Requests this month</th>
            </tr>
          </thead>
          <tbody></tbody>
        </table>
      </div>
      <p id="no-models" class="meta" hidden>No requests this month.</p>

      <section id="servers-section" hidden>
      <h2 id="servers-title">Model servers</h2>
      <div class="table-wrap">
        <table id="servers" aria-labelledby="servers-title">
          <thead>
            <tr>
              <th scope="col">Server</th>
              <th scope="col">State</th>
              <th scope="col">Models</th>
              <th scope="col" class="n">In flight</th>
              <th scope="col" class="n">Waiting</th>
              <th scope="col" class="n">Requests / failures</th>
              <th scope="col" class="n">TTFB p50 / p95</th>
              <th scope="col" class="n">Latency p50 / p95</th>
            </tr>
          </thead>
          <tbody></tbody>
        </table>
      </div>
      <p id="aliases" class="meta"></p>
      </section>

      <div class="charts">
        <section class="panel chart-box" aria-labelledby="tokens-title">
          <h2 id="tokens-title">Tokens per day, last 30 days</h2>
          <figure>
            <svg id="tokens-chart" class="chart" role="img" aria-label="Tokens per day"></svg>
            <figcaption>
              <ul id="tokens-legend" class="legend"></ul>
            </figcaption>
          </figure>
        </section>
        <section class="panel chart-box" aria-labelledby="minutes-title">
          <h2 id="minutes-title">Requests per minute, last hour</h2>
          <figure>
            <svg id="minutes-chart" class="chart" role="img" aria-label="Requests per minute"></svg>
            <figcaption>
              <ul id="minutes-legend" class="legend"></ul>
            </figcaption>
          </figure>
        </section>
      </div>
""")

USAGE_HTML = page_html(
    page="usage", title="your usage", header="", login_title="See your usage",
    key_id="api-key", key_label="Your API key", button="Show usage", notes="",
    content="""\
      <p class="keyline">Key <strong id="key-name"></strong></p>

      <div class="cards wide">
        <section class="panel" aria-labelledby="bucket-title">
          <h2 id="bucket-title">Balance</h2>
          <div id="bucket"></div>
        </section>
        <section class="panel" aria-labelledby="quotas-title">
          <h2 id="quotas-title">Quotas</h2>
          <div id="quotas"></div>
        </section>
      </div>

      <div class="charts">
        <section class="panel" aria-labelledby="today-title">
          <h2 id="today-title">Today by model</h2>
          <ul id="today-chart" class="hbars" aria-labelledby="today-title"></ul>
        </section>
        <section class="panel" aria-labelledby="month-title">
          <h2 id="month-title">This month by model</h2>
          <ul id="month-chart" class="hbars" aria-labelledby="month-title"></ul>
        </section>
      </div>

      <h2 id="totals-title">Totals</h2>
      <div class="table-wrap narrow">
        <table id="totals" class="totals" aria-labelledby="totals-title">
          <thead>
            <tr><th scope="col"></th><th scope="col" class="n">Today</th>
                <th scope="col" class="n">This month</th></tr>
          </thead>
          <tbody></tbody>
        </table>
      </div>
      <p id="zone" class="meta"></p>
""")



PAGE_CSS = r"""/* llm_proxy pages: shared stylesheet (served at /ui/style.css) */
:root {
  color-scheme: light dark;
  --bg: #f4f5f7; --fg: #1b2230; --muted: #5a6677; --card: #ffffff; --line: #dde2e8;
  --track: #e6e9ee; --accent: #2d6cdf; --ok: #23803a; --warn: #a35a00; --bad: #c0352b;
  --k0: #4e79a7; --k1: #f28e2b; --k2: #59a14f; --k3: #b07aa1;
  --k4: #e0b93a; --k5: #76b7b2; --k6: #e15759; --k7: #9c755f; --kother: #a0a8b2;
  --req: #4e79a7; --limited: #f28e2b; --errors: #d62f2f;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #111418; --fg: #e2e6ec; --muted: #9aa5b3; --card: #1a1f26; --line: #2d343e;
    --track: #2b323c; --accent: #6d9cff; --ok: #5cc97a; --warn: #f0a546; --bad: #ff7b6e;
    --kother: #6c7581; --req: #6b96c9; --errors: #f06262;
  }
}
*, *::before, *::after { box-sizing: border-box; }
[hidden] { display: none !important; }
html { -webkit-text-size-adjust: 100%; text-size-adjust: 100%; }
body {
  margin: 0; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  overflow-wrap: anywhere;
}
.visually-hidden {
  position: absolute; width: 1px; height: 1px; margin: -1px; padding: 0; border: 0;
  overflow: hidden; clip: rect(0 0 0 0); white-space: nowrap;
}

/* header */
header.top {
  display: flex; flex-wrap: wrap; align-items: center; gap: 4px 12px;
  padding: 8px 16px; background: var(--card); border-bottom: 1px solid var(--line);
}
header.top h1 { margin: 0; font-size: 17px; font-weight: 700; letter-spacing: -0.01em; }
header.top h1 .sub { font-weight: 400; color: var(--muted); }
.spacer { flex: 1 1 0; }
.meta { color: var(--muted); font-size: 12px; }
header.top .meta:empty { display: none; }
.phone-only { display: none; }

main { max-width: 1240px; margin: 0 auto; padding: 12px 16px 40px; }
h2 { font-size: 14px; font-weight: 650; margin: 18px 0 8px; }
.panel h2 { margin-top: 0; }
.panel, .card, .table-wrap {
  background: var(--card); border: 1px solid var(--line); border-radius: 8px;
}
.panel { padding: 12px 14px; }

/* controls */
button {
  font: inherit; padding: 5px 12px; border-radius: 6px; cursor: pointer;
  border: 1px solid var(--line); background: var(--card); color: var(--fg);
}
button:hover { border-color: var(--muted); }
button.primary { background: var(--accent); border-color: var(--accent); color: #fff; }
button:disabled { opacity: 0.6; cursor: progress; }
button:focus-visible, input:focus-visible { outline: 2px solid var(--accent); outline-offset: 1px; }
input[type="password"] {
  font: inherit; flex: 1 1 12em; min-width: 0; padding: 5px 8px;
  border: 1px solid var(--line); border-radius: 6px; background: var(--bg); color: var(--fg);
}
.login { max-width: 460px; margin: 32px auto; }
.login label { display: block; font-weight: 600; margin-bottom: 4px; }
.row { display: flex; flex-wrap: wrap; gap: 8px; }
.error { color: var(--bad); min-height: 1.45em; margin: 6px 0 0; }
.error:empty { min-height: 0; }

/* notes and status */
.note {
  margin: 0 0 10px; padding: 6px 10px; border-radius: 6px; font-size: 13px;
  background: var(--card); border: 1px dashed var(--line); color: var(--muted);
}
.status { margin: 0 0 10px; font-size: 13px; }
.status:empty { display: none; }
.status.warn { color: var(--warn); }
.status.bad { color: var(--bad); }
.keyline { margin: 0 0 10px; font-size: 15px; }

/* summary cards */
.cards { display: grid; gap: 10px; grid-template-columns: repeat(auto-fill, minmax(175px, 1fr)); }
.cards.wide { grid-template-columns: repeat(auto-fit, minmax(min(100%, 340px), 1fr)); align-items: start; }
.card { padding: 9px 12px; border-left-width: 4px; }
.card h3 {
  margin: 0 0 2px; font-size: 11px; font-weight: 600; color: var(--muted);
  text-transform: uppercase; letter-spacing: 0.04em;
}
.card .big { margin: 0; font-size: 18px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .small { margin: 2px 0 0; font-size: 12px; color: var(--muted); }
.card.ok { border-left-color: var(--ok); }
.card.warn { border-left-color: var(--warn); }
.card.bad { border-left-color: var(--bad); }
.card.bad .big { color: var(--bad); }

/* tables */
.table-wrap { overflow-x: auto; -webkit-overflow-scrolling: touch; }
table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td {
  padding: 6px 10px; text-align: left; vertical-align: middle; white-space: nowrap;
  border-bottom: 1px solid var(--line);
}
tbody tr:last-child td, tbody tr:last-child th { border-bottom: 0; }
thead th { font-size: 12px; font-weight: 600; color: var(--muted); white-space: normal; min-width: 4.5em; }
th.n, td.n { text-align: right; }
td.name { font-weight: 600; white-space: normal; min-width: 9em; max-width: 18em; }
tr.disabled td { color: var(--muted); }
tr.disabled td.name::after {
  content: "disabled"; display: inline-block; margin-left: 6px; padding: 0 6px;
  border: 1px solid var(--line); border-radius: 9px; font-size: 11px; font-weight: 400;
}
tr.disabled .bar .fill { background: var(--muted); }
.table-wrap.narrow { max-width: 560px; }
.sub-line { display: block; font-size: 11px; color: var(--muted); }
.badge { display: inline-block; font-size: 11px; padding: 0 6px; border-radius: 8px; }
.badge.warn { background: #fff3cd; color: #6b4e00; }
tr.expired td.name { text-decoration: line-through; }
td.actions { white-space: nowrap; }
thead th { overflow-wrap: normal; }
td.actions button.small { font-size: 12px; padding: 2px 6px; margin-right: 2px; }
.key-form { display: grid; grid-template-columns: repeat(auto-fill, minmax(14em, 1fr)); gap: 8px 12px; }
.key-form label { display: flex; flex-direction: column; font-size: 12px; gap: 2px; }
.secret { border: 2px solid #b58100; padding: 8px 12px; margin-bottom: 10px; }
.secret code { font-size: 14px; word-break: break-all; user-select: all; }
#manage { margin-top: 16px; }
tr.user td { font-size: 12px; }
td.user-name { padding-left: 18px; max-width: 22em; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
table.totals th[scope="row"] { font-weight: 400; }

/* bars with their numbers */
.bar {
  display: inline-block; vertical-align: middle; width: 84px; height: 8px; margin-right: 6px;
  background: var(--track); border-radius: 4px; overflow: hidden;
}
.bar.under { display: block; width: 100%; min-width: 64px; height: 4px; margin: 3px 0 0; }
.bar.big { display: block; width: 100%; height: 10px; margin: 4px 0; border-radius: 5px; }
.bar .fill { display: block; height: 100%; background: var(--accent); }
.bar.low .fill { background: var(--warn); }
.bar.high .fill { background: var(--bad); }

/* usage page blocks */
.figure { margin: 0; font-size: 20px; font-weight: 650; font-variant-numeric: tabular-nums; }
.figure .of { font-size: 14px; font-weight: 400; color: var(--muted); }
.quota { margin-bottom: 12px; }
.quota:last-child { margin-bottom: 0; }
.quota-head { display: flex; flex-wrap: wrap; justify-content: space-between; gap: 0 8px; }
.quota-head strong { font-weight: 600; }
.hbars {
  list-style: none; margin: 0; padding: 0; display: grid; gap: 2px 10px;
  grid-template-columns: minmax(5em, max-content) minmax(40px, 1fr) max-content;
}
.hbars li {
  display: grid; grid-column: 1 / -1; grid-template-columns: subgrid;
  align-items: center; padding: 3px 0;
}
.hbars .model-name { max-width: 14em; }
.hbars .model-name { font-weight: 600; }
.hbars .bar { width: 100%; height: 12px; margin: 0; }
.hbars .num { font-size: 12px; color: var(--muted); font-variant-numeric: tabular-nums; text-align: right; }
.hbars li.empty { display: block; color: var(--muted); }

/* charts */
.charts { display: grid; gap: 12px; grid-template-columns: minmax(0, 1fr); margin-top: 16px; }
@media (min-width: 980px) { .charts { grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); } }
figure { margin: 0; }
svg.chart { display: block; max-width: 100%; height: auto; }
svg.chart text { fill: var(--muted); font-size: 11px; font-family: inherit; }
svg.chart .grid { stroke: var(--line); stroke-width: 1; }
svg.chart .axis { stroke: var(--muted); stroke-width: 1; }
svg.chart .seg { stroke: var(--card); stroke-width: 0.5; }
svg.chart .minute { fill: var(--req); }
svg.chart .limited { fill: var(--limited); }
svg.chart .errors { fill: var(--errors); }
svg.chart g:hover rect { opacity: 0.8; }
.legend {
  display: flex; flex-wrap: wrap; gap: 2px 14px; list-style: none;
  margin: 6px 0 0; padding: 0; font-size: 12px;
}
.legend li { display: block; }
.legend .swatch { margin-right: 5px; vertical-align: -1px; }
.legend .num { margin-left: 5px; color: var(--muted); font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; flex: none; width: 10px; height: 10px; border-radius: 2px; }
.k0 { fill: var(--k0); background: var(--k0); }
.k1 { fill: var(--k1); background: var(--k1); }
.k2 { fill: var(--k2); background: var(--k2); }
.k3 { fill: var(--k3); background: var(--k3); }
.k4 { fill: var(--k4); background: var(--k4); }
.k5 { fill: var(--k5); background: var(--k5); }
.k6 { fill: var(--k6); background: var(--k6); }
.k7 { fill: var(--k7); background: var(--k7); }
.kother { fill: var(--kother); background: var(--kother); }
.swatch.minute { background: var(--req); }
.swatch.limited { background: var(--limited); }
.swatch.errors { background: var(--errors); }

/* phones */
@media (max-width: 560px) {
  header.top { padding: 8px 12px; }
  header.top h1 { order: -3; }
  #signout { order: -2; margin-left: auto; padding: 3px 10px; }
  .spacer { order: -1; flex-basis: 100%; height: 0; }
  .phone-only { display: block; margin: 4px 0 0; }
  thead th { white-space: nowrap; }
  main { padding: 10px 12px 32px; }
  .cards { grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 8px; }
  .card { padding: 8px 10px; }
  .card .big { font-size: 16px; }
  .hbars { grid-template-columns: minmax(0, 1fr) max-content; }
  .hbars .model-name { grid-column: 1 / -1; max-width: none; }
  .login { margin: 16px auto; }
}
"""

PAGES_JS = r"""// llm_proxy pages: what the dashboard and the usage page share (served at /ui/pages.js and
// loaded before each page's own script): DOM helpers that put text in as text only, number and
// time formats, bars, and the session (a key kept in sessionStorage, the sign-in form, the
// refresh every few seconds).
'use strict';
const Page = (() => {
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const NUM = new Intl.NumberFormat('en-US');
  const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];

  // ---- DOM helpers: text goes in as text nodes only ----
  function build(node, attrs, children) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === 'style' || name.startsWith('on')) throw new Error('attribute not allowed: ' + name);
      if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  const el = (tag, attrs, ...children) => build(document.createElement(tag), attrs, children);
  const svg = (tag, attrs, ...children) => build(document.createElementNS(SVG_NS, tag), attrs, children);
  const $ = (id) => document.getElementById(id);
  const setText = (id, text) => { $(id).textContent = text; };
  const hide = (hidden, ...ids) => ids.forEach((id) => { $(id).hidden = hidden; });
  const setStatus = (text, tone) => { $('status').textContent = text; $('status').className = 'status ' + (tone || ''); };

  // ---- formatting ----
  const num = (n) => (typeof n === 'number' && Number.isFinite(n) ? NUM.format(Math.round(n)) : '\u2014');
  function duration(seconds) {
    const s = Math.max(0, Math.floor(seconds || 0));
    if (s < 60) return s + ' s';
    if (s < 3600) return Math.floor(s / 60) + ' min';
    if (s < 86400) return Math.floor(s / 3600) + ' h';
    return Math.floor(s / 86400) + ' d';
  }
  const pad = (n) => String(n).padStart(2, '0');
  const clock = (d) => `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  function bar(value, limit, tone, size) {
    const frac = limit > 0 ? Math.min(1, Math.max(0, value / limit)) : 0;
    const fill = el('span', {class: 'fill'});
    fill.style.width = (frac * 100).toFixed(1) + '%';
    return el('span', {class: ['bar', size, tone].filter(Boolean).join(' '), 'aria-hidden': 'true'}, fill);
  }

  // ---- the session ----
  // opts: storageKey (sessionStorage), input (the key field's id), path (the JSON route), every
  // (ms between refreshes), emptyKey (said for an empty field), ends (statuses that end the
  // session), probe (first try without a key: on a proxy without an admin key, this machine
  // needs none), show(data, local) (draws the page's own parts).
  function session(opts) {
    const state = {key: null, local: false, at: null, timer: 0};

    async function get(key) {
      const headers = key ? {Authorization: 'Bearer ' + key} : {};
      const res = await fetch(opts.path, {headers, cache: 'no-store', credentials: 'same-origin'});
      return {status: res.status, body: await res.json().catch(() => null)};
    }
    const messageOf = (r) => (r.body && r.body.error && typeof r.body.error.message === 'string'
      ? r.body.error.message : `The proxy answered ${r.status}.`);

    function showLogin(message) {
      clearTimeout(state.timer);
      Object.assign(state, {key: null, local: false, at: null});
      hide(true, 'loading', 'dashboard', 'content', 'signout');
      setText('updated', '');
      setText('login-error', message || '');
      $('login').hidden = false;
      $(opts.input).focus();
    }

    function shown(data) {
      state.at = new Date();
      hide(true, 'loading', 'login');
      hide(false, 'dashboard', 'content');
      $('signout').hidden = state.local;
      setText('version', data.version ? 'v' + data.version : '');
      setText('updated', 'updated ' + clock(state.at));
      setStatus('', '');
      opts.show(data, state.local);
    }

    function failed(message) {
      const since = state.at ? ` Showing what came at ${clock(state.at)}.` : '';
      hide(true, 'loading');
      hide(false, 'dashboard');
      $('signout').hidden = state.local;
      setStatus(`Refresh failed at ${clock(new Date())}: ${message}${since}`, 'warn');
    }

    function schedule() {
      clearTimeout(state.timer);
      state.timer = setTimeout(refresh, opts.every);
    }

    async function refresh() {
      clearTimeout(state.timer);
      let r;
      try {
        r = await get(state.key);
      } catch (err) {
        r = {status: 0, body: {error: {message: 'the proxy could not be reached'}}};
      }
      if (r.status === 200 && r.body) {
        try { shown(r.body); } catch (err) { failed(`the answer could not be shown (${err.message})`); }
      } else if (opts.ends.includes(r.status)) {
        sessionStorage.removeItem(opts.storageKey);
        showLogin(state.local ? '' : messageOf(r));
        return;
      } else {
        failed(messageOf(r));
      }
      schedule();
    }

    async function onLogin(event) {
      event.preventDefault();
      const input = $(opts.input);
      const button = event.target.querySelector('button[type="submit"]');
      const key = input.value.trim();
      if (!key) { setText('login-error', opts.emptyKey); return; }
      setText('login-error', '');
      button.disabled = true;
      let r;
      try {
        r = await get(key);
      } catch (err) {
        r = {status: 0, body: {error: {message: 'The proxy could not be reached (or the key has characters a header cannot carry).'}}};
      } finally {
        button.disabled = false;
      }
      if (r.status === 200 && r.body) {
        sessionStorage.setItem(opts.storageKey, key);
        Object.assign(state, {key, local: false});
        input.value = '';
        shown(r.body);
        schedule();
      } else {
        setText('login-error', messageOf(r));
        input.select();
      }
    }

    const signOut = () => { sessionStorage.removeItem(opts.storageKey); showLogin(''); };

    // A change (POST, PATCH, DELETE) with the session's key in its header, from this page's
    // own origin (the browser says so in Origin, which the proxy checks); then a refresh.
    async function send(method, path, body) {
      const headers = state.key ? {Authorization: 'Bearer ' + state.key} : {};
      if (body !== undefined) headers['Content-Type'] = 'application/json';
      let r;
      try {
        const res = await fetch(path, {method, headers, cache: 'no-store', credentials: 'same-origin',
          body: body === undefined ? undefined : JSON.stringify(body)});
        r = {status: res.status, body: res.status === 204 ? null : await res.json().catch(() => null)};
      } catch (err) {
        r = {status: 0, body: {error: {message: 'the proxy could not be reached'}}};
      }
      r.ok = r.status >= 200 && r.status < 300;
      r.message = r.ok ? '' : messageOf(r);
      if (r.ok) refresh();
      return r;
    }

    async function start() {
      $('login-form').addEventListener('submit', onLogin);
      $('signout').addEventListener('click', signOut);
      const saved = sessionStorage.getItem(opts.storageKey);
      if (saved) {
        state.key = saved;
        await refresh();
        return;
      }
      if (opts.probe) {
        try {
          const r = await get(null);
          if (r.status === 200 && r.body) {
            state.local = true;
            shown(r.body);
            schedule();
            return;
          }
        } catch (err) { /* unreachable: ask for a key */ }
      }
      showLogin('');
    }

    return {start, send};
  }

  return {el, svg, $, setText, num, duration, pad, clock, MONTHS, bar, session};
})();
"""

ADMIN_JS = r"""// llm_proxy admin dashboard (served at /ui/admin.js, after /ui/pages.js). Data: GET
// /admin/overview.
'use strict';
(() => {
  const {el, svg, $, setText, num, duration, clock, MONTHS, bar} = Page;
  const COMPACT = new Intl.NumberFormat('en-US', {notation: 'compact', maximumFractionDigits: 1});
  const DOT = ' \u00b7 ';
  let latest = null;
  let redraw = 0;

  function ms(value) {
    if (typeof value !== 'number') return '\u2014';
    if (value < 10) return value.toFixed(1) + ' ms';
    if (value < 1000) return Math.round(value) + ' ms';
    return (value / 1000).toFixed(value < 100000 ? 1 : 0) + ' s';
  }
  function day(iso) {
    const [, m, d] = String(iso).split('-').map(Number);
    return MONTHS[m - 1] ? `${MONTHS[m - 1]} ${d}` : String(iso);
  }

  // ---- summary cards ----
  function card(title, big, small, tone) {
    return el('div', {class: 'card' + (tone ? ' ' + tone : '')},
      el('h3', {}, title), el('p', {class: 'big'}, big),
      [].concat(small).filter(Boolean).map((line) => el('p', {class: 'small'}, line)));
  }

  // what the upstream said when last asked for its models (the start-up line's words)
  function probeLine(p) {
    if (!p) return null;
    if (!p.answering) return `not answering (${p.problem}): ${p.hint}`;
    if (!p.models) return p.problem + (p.hint ? `: ${p.hint}` : '');
    if (!p.model_count) return 'no models listed';
    const named = p.models.slice(0, 5).join(', ');
    const more = p.model_count > 5 ? ` and ${num(p.model_count - 5)} more` : '';
    return `${num(p.model_count)} model${p.model_count === 1 ? '' : 's'}: ${named}${more}`;
  }

  function renderCards(d) {
    const up = d.upstream || {};
    const store = d.store || {};
    const errs = up.errors_last_hour || {};
    const errTotal = Object.values(errs).reduce((a, b) => a + (Number(b) || 0), 0);
    const pair = (t) => (t ? `${ms(t.p50)} / ${ms(t.p95)}` : '\u2014');
    const count = (t) => (t ? `p50 / p95${DOT}${num(t.count)} requests` : '');
    const redis = store.redis
      ? 'Redis ' + (store.redis.reachable ? 'reachable' : 'unreachable') : null;
    const unwritten = store.state && !store.state.written;
    const storeTone = store.ok === false || unwritten || (store.redis && !store.redis.reachable) ? 'bad' : 'ok';
    const servers = (d.upstreams || []).filter((s) => s.models !== null);  // UPSTREAMS_FILE's
    const down = servers.filter((s) => !s.up);
    $('cards').replaceChildren(
      servers.length
        ? card('Model servers', `${num(servers.length - down.length)} of ${num(servers.length)} up`,
          down.length ? down.map((s) => `${s.name} down`).join(DOT) : 'all up', down.length ? 'bad' : 'ok')
        : card('Upstream', up.reachable ? 'reachable' : 'unreachable',
          [up.reachable ? `connect ${ms(up.connect_ms)}` : 'cannot connect', up.url,
            probeLine(up.probe)],
          up.reachable && (!up.probe || up.probe.models) ? 'ok' : 'bad'),
      card('Time to first byte', pair(up.ttfb_ms), count(up.ttfb_ms)),
      card('Latency', pair(up.latency_ms), count(up.latency_ms)),
      card('Errors, last hour', num(errTotal),
        Object.entries(errs).map(([kind, n]) => `${kind} ${num(n)}`).join(DOT), errTotal > 0 ? 'warn' : 'ok'),
      card('Requests now', `${num(up.in_flight)} in flight`, `${num(up.waiting)} waiting for their turn`,
        up.waiting > 0 ? 'warn' : null),
      card('Store', store.kind || '\u2014', [
        store.ok === false ? 'refusing requests: store unavailable' : null,
        unwritten ? 'state not written: ' + store.state.problem : null,
        store.state_file ? 'state file ' + store.state_file : store.kind === 'redis' ? null : 'memory only',
        redis, store.redis && store.redis.url ? store.redis.url : null,
        typeof store.buckets_held === 'number' ? `${num(store.buckets_held)} buckets held` : null,
      ], storeTone));
  }

  // ---- key table ----
  function quotaCell(used, quota) {
    if (!quota) return el('td', {class: 'n'}, num(used));
    const frac = quota.limit > 0 ? used / quota.limit : 0;
    return el('td', {class: 'n'}, `${num(used)} / ${num(quota.limit)}`,
      bar(used, quota.limit, frac >= 0.9 ? 'high' : null, 'under'));
  }

  function keyRow(k) {
    const quotas = Object.fromEntries((k.quotas || []).map((q) => [q.name, q]));
    const today = k.today || {};
    const month = k.this_month || {};
    const full = k.balance >= k.limit;
    const low = k.limit > 0 && k.balance / k.limit < 0.1;
    const every = `+${num(k.refill_tokens)} every ${duration(k.refill_interval_seconds)}`;
    const lifetime = [k.priority && k.priority !== 'normal' ? `priority ${k.priority}` : null,
      k.max_concurrent ? `at most ${num(k.max_concurrent)} at once` : null,
      k.expires_at ? (k.expired ? `expired ${k.expires_at}` : `expires ${k.expires_at}`) : null].filter(Boolean);
    return el('tr', {class: [k.disabled ? 'disabled' : null, k.expires_soon ? 'expiring' : null,
      k.expired ? 'expired' : null].filter(Boolean).join(' ') || null, 'data-key': k.name},
      el('td', {class: 'name'}, k.name, lifetime.length ? el('span', {class: 'sub-line'}, lifetime.join(DOT)) : null,
        k.expires_soon ? el('span', {class: 'badge warn'}, 'expires within 7 days') : null),
      el('td', {class: 'n'}, `${num(k.balance)} / ${num(k.limit)}`, bar(k.balance, k.limit, low ? 'low' : null, 'under')),
      el('td', {}, full ? 'full' : 'in ' + duration(k.next_refill_seconds), el('span', {class: 'sub-line'}, every)),
      quotaCell(today.tokens, quotas.tokens_per_day),
      quotaCell(month.tokens, quotas.tokens_per_month),
      quotaCell(today.requests, quotas.requests_per_day),
      el('td', {class: 'n'}, num(today.limited)),
      el('td', {class: 'n'}, num(k.in_flight)),
      el('td', {class: 'n'}, num(k.waiting)),
      el('td', {class: 'actions'}, k.entry && writable ? manageButtons(k) : null));
  }

  // ---- managing keys (POST/PATCH/DELETE /admin/keys, through the session's send) ----
  const FIELDS = ['max_tokens', 'refill_tokens', 'refill_interval_seconds', 'tokens_per_day',
    'tokens_per_month', 'requests_per_day', 'models', 'expires_at', 'priority', 'max_concurrent', 'note'];
  let session = null;
  let writable = false;

  function manageButtons(k) {
    const button = (label, action) => {
      const b = el('button', {type: 'button', class: 'small', 'data-action': action}, label);
      b.addEventListener('click', () => act(action, k));
      return b;
    };
    return [button('Edit', 'edit'), button(k.disabled ? 'Enable' : 'Disable', k.disabled ? 'enable' : 'disable'),
      button('Rotate', 'rotate'), button('Delete', 'delete')];
  }

  function say(text, tone) {
    setText('manage-status', text);
    $('manage-status').className = 'meta ' + (tone || '');
  }

  function showSecret(name, secret) {
    setText('secret-value', secret);
    setText('copy-status', `The new key of ${name}.`);
    $('secret-box').hidden = false;
  }

  async function act(action, k) {
    const path = '/admin/keys/' + encodeURIComponent(k.name);
    let r;
    if (action === 'edit') return startEdit(k);
    if (action === 'enable' || action === 'disable') {
      r = await session.send('PATCH', path, {disabled: action === 'disable'});
    } else if (action === 'rotate') {
      if (!window.confirm(`Give ${k.name} a new key? The old one stops working in an hour.`)) return;
      r = await session.send('POST', path + '/rotate', {grace_seconds: 3600});
      if (r.ok) showSecret(k.name, r.body.key);
    } else if (action === 'delete') {
      if (!window.confirm(`Delete the key ${k.name}? Requests with it will get 401. Its usage stays in the reports.`)) return;
      r = await session.send('DELETE', path);
    }
    say(r.ok ? `${k.name}: ${action === 'delete' ? 'deleted' : action + 'd'}.` : r.message, r.ok ? 'ok' : 'warn');
  }

  function formValues(editing) {
    const values = {};
    for (const field of FIELDS) {
      const raw = $('kf-' + field).value.trim();
      const type = $('kf-' + field).type;
      if (raw === '') { if (editing) values[field] = null; continue; }
      if (field === 'models') values[field] = raw.split(',').map((m) => m.trim()).filter(Boolean);
      else if (type === 'number') values[field] = Number(raw);
      else values[field] = raw;
    }
    return values;
  }

  function startEdit(k) {
    const entry = k.entry || {};
    $('kf-editing').value = k.name;
    $('kf-name').value = k.name;
    $('kf-name').disabled = true;
    for (const field of FIELDS) {
      const value = entry[field];
      $('kf-' + field).value = value === undefined || value === null ? '' : Array.isArray(value) ? value.join(', ') : String(value);
    }
    setText('manage-title', 'Edit key ' + k.name);
    setText('kf-submit', 'Save changes');
    $('kf-cancel').hidden = false;
    $('manage').scrollIntoView();
  }

  function resetForm() {
    $('key-form').reset();
    $('kf-editing').value = '';
    $('kf-name').disabled = false;
    setText('manage-title', 'New key');
    setText('kf-submit', 'Create key');
    $('kf-cancel').hidden = true;
  }

  async function onSubmit(event) {
    event.preventDefault();
    const editing = $('kf-editing').value;
    const values = formValues(Boolean(editing));
    const name = editing || $('kf-name').value.trim();
    const r = editing
      ? await session.send('PATCH', '/admin/keys/' + encodeURIComponent(editing), values)
      : await session.send('POST', '/admin/keys', {name, ...values});
    if (!r.ok) { say(r.message, 'warn'); return; }
    resetForm();
    say(editing ? `${name}: saved.` : `${name}: created.`, 'ok');
    if (!editing) showSecret(name, r.body.key);
  }

  async function copySecret() {
    const text = $('secret-value').textContent;
    try {
      await navigator.clipboard.writeText(text);
      setText('copy-status', 'Copied.');
    } catch (err) {
      const range = document.createRange();
      range.selectNodeContents($('secret-value'));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      setText('copy-status', 'Selected: press Ctrl+C (or \u2318C) to copy.');
    }
  }

  function renderAudit(rows) {
    $('audit').tBodies[0].replaceChildren(...rows.map((r) => el('tr', {},
      el('td', {}, String(r.at).replace('T', ' ')), el('td', {}, r.who), el('td', {}, r.from),
      el('td', {}, r.action), el('td', {class: 'name'}, r.key), el('td', {}, (r.fields || []).join(', ')))));
    $('no-audit').hidden = rows.length > 0;
  }

  function renderManage(file) {
    writable = Boolean(file && file.writable);
    $('key-form').hidden = !writable;
    $('manage-readonly').hidden = writable;
    setText('manage-readonly', !file || !file.path
      ? 'Keys are managed here when the proxy runs with KEYS_FILE (for example KEYS_FILE=keys.json).'
      : `${file.path} is TOML, which the proxy reads but cannot write: convert it to JSON to manage keys here.`);
  }

  // a front end's users, each under its key (a name is the front end's text: set as text)
  function userRow(u) {
    const quotas = Object.fromEntries((u.quotas || []).map((q) => [q.name, q]));
    const today = u.today || {};
    const month = u.this_month || {};
    const low = u.limit > 0 && u.balance / u.limit < 0.1;
    return el('tr', {class: 'user'},
      el('td', {class: 'name user-name', title: u.user}, '\u21b3 ' + u.user),
      el('td', {class: 'n'}, `${num(u.balance)} / ${num(u.limit)}`, bar(u.balance, u.limit, low ? 'low' : null, 'under')),
      el('td', {}, 'user'),
      quotaCell(today.tokens, quotas.tokens_per_day),
      quotaCell(month.tokens, quotas.tokens_per_month),
      quotaCell(today.requests, quotas.requests_per_day),
      el('td', {class: 'n'}, num(today.limited)),
      el('td', {}), el('td', {}));
  }

  function renderKeys(keys) {
    $('keys').tBodies[0].replaceChildren(...keys.flatMap((k) => [keyRow(k), ...(k.users || []).map(userRow)]));
    $('no-keys').hidden = keys.length > 0;
  }

  // ---- model table ----
  function renderModels(models) {
    $('models').tBodies[0].replaceChildren(...models.map((m) => {
      const today = m.today || {};
      const month = m.this_month || {};
      return el('tr', {}, el('td', {class: 'name'}, m.name === '' ? '(no model named)' : m.name),
        el('td', {class: 'n'}, num(today.tokens)), el('td', {class: 'n'}, num(today.requests)),
        el('td', {class: 'n'}, num(month.tokens)), el('td', {class: 'n'}, num(month.requests)));
    }));
    $('no-models').hidden = models.length > 0;
  }

  // ---- model servers (UPSTREAMS_FILE; BASE_API_URL alone has the Upstream card) ----
  function renderServers(servers, aliases) {
    const several = servers.length > 1 || servers.some((s) => s.models !== null);
    $('servers-section').hidden = !several;
    if (!several) return;
    const pair = (t) => (t ? `${ms(t.p50)} / ${ms(t.p95)}` : '\u2014');
    $('servers').tBodies[0].replaceChildren(...servers.map((s) => el('tr', {},
      el('td', {class: 'name'}, s.name, el('br'), el('span', {class: 'meta'}, s.url)),
      el('td', {}, s.up ? 'up' : `down, probed in ${num(s.probe_in_seconds)} s`),
      el('td', {}, (s.models || []).join(', ') || '\u2014'),
      el('td', {class: 'n'}, num(s.in_flight)), el('td', {class: 'n'}, num(s.waiting)),
      el('td', {class: 'n'}, `${num(s.requests)} / ${num(s.failures)}`),
      el('td', {class: 'n'}, pair(s.ttfb_ms)), el('td', {class: 'n'}, pair(s.latency_ms)))));
    const names = Object.entries(aliases || {}).map(([alias, target]) => `${alias} \u2192 ${target}`);
    setText('aliases', names.length ? 'Aliases: ' + names.join(DOT) : 'No aliases.');
  }

  // ---- charts (inline SVG sized to their box) ----
  function niceMax(value) {
    if (!(value > 0)) return 1;
    const step = 10 ** Math.floor(Math.log10(value));
    for (const m of [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * step >= value) return m * step;
    return 10 * step;
  }

  function frame(node, height, max, xLabels) {
    const width = Math.max(260, Math.floor(node.parentElement.clientWidth));
    const box = {left: 40, right: width - 6, top: 8, bottom: height - 20, width, height};
    node.setAttribute('width', width);
    node.setAttribute('height', height);
    node.setAttribute('viewBox', `0 0 ${width} ${height}`);
    const parts = [];
    for (const frac of [0, 0.5, 1]) {
      const y = box.bottom - frac * (box.bottom - box.top);
      parts.push(svg('line', {class: frac ? 'grid' : 'axis', x1: box.left, x2: box.right, y1: y, y2: y}));
      if (Number.isInteger(max * frac)) parts.push(svg('text', {x: box.left - 5, y: y + 4, 'text-anchor': 'end'}, COMPACT.format(max * frac)));
    }
    for (const [frac, text] of xLabels) {
      const anchor = frac === 0 ? 'start' : frac === 1 ? 'end' : 'middle';
      parts.push(svg('text', {x: box.left + frac * (box.right - box.left), y: height - 5, 'text-anchor': anchor}, text));
    }
    node.replaceChildren(...parts);
    return box;
  }

  function drawTokens(data) {
    const node = $('tokens-chart');
    const days = (data && data.days) || [];
    const keys = ((data && data.keys) || []).map((k) => ({name: String(k.name), tokens: k.tokens || []}));
    const totals = days.map((_, i) => keys.reduce((sum, k) => sum + (Number(k.tokens[i]) || 0), 0));
    const max = niceMax(Math.max(0, ...totals));
    const last = days.length - 1;
    const box = frame(node, 200, max, days.length ? [[0, day(days[0])], [0.5, day(days[Math.floor(last / 2)])], [1, 'today']] : []);
    const band = (box.right - box.left) / Math.max(1, days.length);
    const width = Math.max(1, band * 0.72);
    const scale = (box.bottom - box.top) / max;
    const cls = (k, i) => 'seg ' + (k.name === 'other' ? 'kother' : 'k' + (i % 8));
    days.forEach((date, i) => {
      let y = box.bottom;
      const rects = keys.map((k, j) => {
        const tokens = Number(k.tokens[i]) || 0;
        const h = tokens * scale;
        y -= h;
        return svg('rect', {class: cls(k, j), x: (box.left + i * band + (band - width) / 2).toFixed(2),
          y: y.toFixed(2), width: width.toFixed(2), height: h.toFixed(2)},
        svg('title', {}, `${k.name}${DOT}${day(date)}: ${num(tokens)} tokens`));
      });
      node.appendChild(svg('g', {class: 'day', 'data-day': date}, rects));
    });
    $('tokens-legend').replaceChildren(...keys.map((k, j) => el('li', {},
      el('span', {class: 'swatch ' + cls(k, j).slice(4), 'aria-hidden': 'true'}), k.name,
      el('span', {class: 'num'}, `${num(k.tokens.reduce((a, b) => a + (Number(b) || 0), 0))} in 30 d, ${num(k.tokens[last])} today`))));
    node.setAttribute('aria-label', `Tokens per day over the last 30 days: ${num(totals[last])} today, most in a day ${num(Math.max(0, ...totals))}.`);
  }

  function drawMinutes(data) {
    const node = $('minutes-chart');
    const minutes = (data && data.minutes) || [];
    const start = Date.parse(data && data.start);
    const max = niceMax(Math.max(0, ...minutes.map((m) => m.requests || 0)));
    const box = frame(node, 200, max, [[0, '60 min ago'], [0.5, '30 min ago'], [1, 'now']]);
    const band = (box.right - box.left) / Math.max(1, minutes.length);
    const width = Math.max(1, band * 0.72);
    const scale = (box.bottom - box.top) / max;
    const sums = {requests: 0, limited: 0, errors: 0};
    minutes.forEach((m, i) => {
      const x = (box.left + i * band + (band - width) / 2).toFixed(2);
      const req = m.requests || 0;
      const lim = Math.min(req, m.limited || 0);
      const err = Math.min(req - lim, m.errors || 0);
      for (const name of Object.keys(sums)) sums[name] += m[name] || 0;
      const rect = (cls, bottom, value) => svg('rect', {class: cls, x, width: width.toFixed(2),
        y: (box.bottom - (bottom + value) * scale).toFixed(2), height: (value * scale).toFixed(2)});
      const when = Number.isFinite(start) ? clock(new Date(start + i * 60000)).slice(0, 5) + ': ' : '';
      node.appendChild(svg('g', {class: 'minute-group'},
        svg('title', {}, `${when}${num(req)} requests, ${num(m.limited || 0)} limited, ${num(m.errors || 0)} errors`),
        rect('minute', 0, req), lim ? rect('limited', 0, lim) : null, err ? rect('errors', lim, err) : null));
    });
    $('minutes-legend').replaceChildren(
      ...[['minute', 'requests', sums.requests], ['limited', 'limited', sums.limited], ['errors', 'errors', sums.errors]]
        .map(([cls, label, n]) => el('li', {}, el('span', {class: 'swatch ' + cls, 'aria-hidden': 'true'}), label,
          el('span', {class: 'num'}, num(n)))),
      el('li', {class: 'meta'}, 'in the last hour'));
    node.setAttribute('aria-label', `Requests per minute over the last hour: ${num(sums.requests)} requests, ${num(sums.limited)} limited, ${num(sums.errors)} errors.`);
  }

  function drawCharts() {
    if (!latest || $('content').hidden) return;
    drawTokens(latest.tokens_per_day);
    drawMinutes(latest.requests_per_minute);
  }

  function show(data, local) {
    latest = data;
    $('local-note').hidden = !local;
    setText('uptime', typeof data.uptime_seconds === 'number' ? 'up ' + duration(data.uptime_seconds) : '');
    renderCards(data);
    renderManage(data.keys_file);
    renderKeys(data.keys || []);
    renderAudit(data.audit || []);
    renderModels(data.models || []);
    renderServers(data.upstreams || [], data.aliases);
    drawCharts();
  }

  window.addEventListener('resize', () => {
    cancelAnimationFrame(redraw);
    redraw = requestAnimationFrame(drawCharts);
  });
  $('key-form').addEventListener('submit', onSubmit);
  $('kf-cancel').addEventListener('click', resetForm);
  $('copy-secret').addEventListener('click', copySecret);
  $('hide-secret').addEventListener('click', () => { $('secret-box').hidden = true; setText('secret-value', ''); });
  session = Page.session({storageKey: 'llm_proxy_admin_key', input: 'admin-key', path: '/admin/overview',
    every: 5000, emptyKey: 'Enter the admin key.', ends: [401, 404], probe: true, show});
  session.start();
})();
"""


USAGE_JS = r"""// llm_proxy usage page (served at /ui/usage.js, after /ui/pages.js). Data: GET /v1/usage
// with the user's own key.
'use strict';
(() => {
  const {el, $, setText, num, duration, pad, MONTHS, bar} = Page;
  const QUOTA_NAMES = {tokens_per_day: 'Tokens today', tokens_per_month: 'Tokens this month',
    requests_per_day: 'Requests today'};
  const TOTALS = [['requests', 'Requests'], ['limited_requests', 'Limited requests'],
    ['prompt_tokens', 'Prompt tokens'], ['completion_tokens', 'Completion tokens'],
    ['tokens_charged', 'Tokens charged']];

  function when(iso) {   // local time: "00:00" today, else "Dec 2, 00:00"
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return '';
    const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
    return d.toDateString() === new Date().toDateString() ? hm : `${MONTHS[d.getMonth()]} ${d.getDate()}, ${hm}`;
  }
  function show(data) {
    setText('key-name', String(data.key));
    renderBucket(data.bucket || {});
    renderQuotas(data.quotas || []);
    const usage = data.usage || {};
    renderModels($('today-chart'), (usage.today || {}).by_model, 'No requests today yet.');
    renderModels($('month-chart'), (usage.this_month || {}).by_model, 'No requests this month yet.');
    renderTotals((usage.today || {}).total || {}, (usage.this_month || {}).total || {});
    setText('zone', data.timezone ? `Days and months are counted in the proxy's time zone (${data.timezone}); times above are your local time.` : '');
  }

  function renderBucket(b) {
    const low = b.limit > 0 && b.balance / b.limit < 0.1;
    const full = b.balance >= b.limit;
    $('bucket').replaceChildren(
      el('p', {class: 'figure'}, num(b.balance), el('span', {class: 'of'}, ` / ${num(b.limit)} tokens`)),
      bar(b.balance, b.limit, low ? 'low' : null, 'big'),
      el('p', {class: 'meta'}, full
        ? `Full. Refills +${num(b.refill_tokens)} every ${duration(b.refill_interval_seconds)}.`
        : `Next refill: +${num(b.refill_tokens)} in ${duration(b.next_refill_seconds)} (every ${duration(b.refill_interval_seconds)}).`));
  }

  function renderQuotas(quotas) {
    if (!quotas.length) {
      $('quotas').replaceChildren(el('p', {class: 'meta'}, 'No daily or monthly quota.'));
      return;
    }
    $('quotas').replaceChildren(...quotas.map((q) => {
      const frac = q.limit > 0 ? q.used / q.limit : 0;
      const resets = [when(q.resets_at), typeof q.resets_in_seconds === 'number' ? `in ${duration(q.resets_in_seconds)}` : '']
        .filter(Boolean);
      return el('div', {class: 'quota'},
        el('div', {class: 'quota-head'}, el('strong', {}, QUOTA_NAMES[q.name] || String(q.name).replace(/_/g, ' ')),
          el('span', {}, `${num(q.used)} / ${num(q.limit)}`)),
        bar(q.used, q.limit, frac >= 0.9 ? 'high' : null, 'big'),
        el('p', {class: 'meta'}, `${num(q.remaining)} left${resets.length ? `; resets ${resets[0]}${resets[1] ? ` (${resets[1]})` : ''}` : ''}`));
    }));
  }

  function renderModels(list, byModel, emptyText) {
    const rows = Object.entries(byModel || {}).map(([name, m]) => [name, m || {}])
      .sort((a, b) => (b[1].tokens_charged || 0) - (a[1].tokens_charged || 0) || a[0].localeCompare(b[0]));
    if (!rows.length) {
      list.replaceChildren(el('li', {class: 'empty'}, emptyText));
      return;
    }
    const max = Math.max(1, ...rows.map(([, m]) => m.tokens_charged || 0));
    list.replaceChildren(...rows.map(([name, m]) => el('li', {class: 'model'},
      el('span', {class: 'model-name'}, name),
      bar(m.tokens_charged || 0, max),
      el('span', {class: 'num'}, `${num(m.tokens_charged || 0)} tokens, ${num(m.requests || 0)} req`))));
  }

  function renderTotals(today, month) {
    $('totals').tBodies[0].replaceChildren(...TOTALS.map(([field, label]) => el('tr', {},
      el('th', {scope: 'row'}, label), el('td', {class: 'n'}, num(today[field] || 0)),
      el('td', {class: 'n'}, num(month[field] || 0)))));
  }

  Page.session({storageKey: 'llm_proxy_usage_key', input: 'api-key', path: '/v1/usage',
    every: 10000, emptyKey: 'Enter your API key.', ends: [401], probe: false, show}).start();
})();
"""


#: path -> (Content-Type, body)
PAGE_ASSETS = {
    "admin.html": ("text/html; charset=utf-8", ADMIN_HTML),
    "usage.html": ("text/html; charset=utf-8", USAGE_HTML),
    "style.css": ("text/css; charset=utf-8", PAGE_CSS),
    "pages.js": ("text/javascript; charset=utf-8", PAGES_JS),
    "admin.js": ("text/javascript; charset=utf-8", ADMIN_JS),
    "usage.js": ("text/javascript; charset=utf-8", USAGE_JS),
}


if __name__ == "__main__":
    start_as_module()
    sys.exit(main())
