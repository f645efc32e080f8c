#!/usr/bin/env python3
"""Benchmark llm_proxy against a fast fake upstream, side by side with direct calls to it.

    python3 tools/bench_llm_proxy.py             # the full run (about five minutes), the tables
    python3 tools/bench_llm_proxy.py --quick     # a short smoke run
    python3 tools/bench_llm_proxy.py --fanout    # only the fan-out figure (--quick: 50 streams, 3 s)
    python3 tools/bench_llm_proxy.py --overview  # only the dashboard's data, a month in the ledger

What it measures (every figure for the proxy is compared with the same call made directly):
  * added latency per non-stream request at concurrency 1 (p50, p99), one keep-alive connection:
    timed by wrk (-t1 -c1, rounds alternating direct and proxy) when it is installed, and by a
    Python http.client client (which also pays for parsing the proxy's extra headers);
  * the proxy's CPU time per request (from /proc/<pid>/stat, Linux);
  * concurrency 64 for 10 s with wrk when it is installed (else a threaded Python client):
    requests/s, p50/p99, errors;
  * added time to the first streamed event;
  * event spacing seen by 50 concurrent streams whose upstream sends an event every 20 ms;
  * fan-out: N streams of 100 events 10 ms apart at once (200 and 400 by default), for 10 s,
    directly, through nginx (when installed) and through the proxy in request and usage mode:
    events/s delivered, the gap between events and the time to the first event (p50, p99), and
    the CPU time the relaying process spends per event;
  * the dashboard's data (GET /admin/overview) with 43,200 rows in the state file's ledger.

The fake upstream is a raw asyncio server in its own process, and the proxy runs as its own
process started with the README's run command, so neither competes with the load generator for
the GIL. Run it by hand; the unit tests do not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import http.client
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator

HERE = os.path.dirname(os.path.abspath(__file__))  # tools/
ROOT = os.path.dirname(HERE)  # the project, where llm_proxy.py lives
PROXY = os.path.join(ROOT, "llm_proxy.py")
KEY = "sk-bench-key"
CHAT = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 16}).encode()
STREAM = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}],
                     "stream": True}).encode()
ANSWER = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "proxy ok"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}).encode()


# ##################################################################### fake upstream ####

@functools.lru_cache(maxsize=4096)
def _event(index: int, usage: bool = False) -> bytes:
    """One event of a stream, as a chunk. Cached: every stream sends the same ones, and the
    fan-out figure asks for 40,000 a second."""
    chunk = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1,
             "model": "bench", "choices": [{"index": 0, "delta": {"content": f"tok{index} "},
                                            "finish_reason": None}]}
    if usage:  # with include_usage, OpenAI puts "usage": null on every chunk but the last
        chunk["usage"] = None
    return _sse_chunk(chunk)


def _usage_event(events: int) -> bytes:
    """The final chunk of a stream asked for `stream_options.include_usage`."""
    return _sse_chunk({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1,
                       "model": "bench", "choices": [],
                       "usage": {"prompt_tokens": 5, "completion_tokens": events,
                                 "total_tokens": 5 + events}})


def _sse_chunk(chunk: dict) -> bytes:
    data = b"data: " + json.dumps(chunk).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


SERVED: dict[str, int] = {}  # requests answered per model: reliability_llm_proxy.py reads it


def _send_events(transport: asyncio.WriteTransport, events: int, spacing: float, usage: bool
                 ) -> asyncio.Future:
    """Send events 1 to events-1, each `spacing` seconds after the one before (as a model's
    tokens come), from timer callbacks rather than a coroutine that sleeps: no task to wake and
    no future per event, which took 40 % off the upstream's CPU time per event at the fan-out
    figure's rates. Done when the last is sent or the client has gone. Nothing waits for a slow
    reader: a stream is a few hundred bytes an event, which the kernel and the transport hold."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def send(index: int) -> None:
        if index >= events or transport.is_closing():
            done.set_result(None)
            return
        transport.write(_event(index, usage))
        loop.call_later(spacing, send, index + 1)
    if events > 1:
        loop.call_later(spacing, send, 1)
    else:
        done.set_result(None)
    return done


async def _serve_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = head.decode("latin-1").lower()
            match = re.search(r"content-length: *(\d+)", headers)
            body = await reader.readexactly(int(match.group(1))) if match else b""
            if head.startswith(b"GET /v1/_served "):
                count = json.dumps(SERVED).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(count), count))
                continue
            model = re.search(rb'"model"\s*:\s*"([^"]*)"', body)
            name = model.group(1).decode("latin-1") if model else ""
            SERVED[name] = SERVED.get(name, 0) + 1
            delay = re.search(r"x-bench-delay-ms: *([\d.]+)", headers)
            if delay:
                await asyncio.sleep(float(delay.group(1)) / 1000)
            if not re.search(rb'"stream"\s*:\s*true', body):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER))
                continue
            events = int(re.search(r"x-bench-events: *(\d+)", headers).group(1)) \
                if "x-bench-events" in headers else 20
            spacing = float(re.search(r"x-bench-spacing-ms: *([\d.]+)", headers).group(1)) \
                if "x-bench-spacing-ms" in headers else 20.0
            usage = re.search(rb'"include_usage"\s*:\s*true', body) is not None
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + _event(0, usage))
            await _send_events(writer.transport, events, spacing / 1000, usage)
            if writer.transport.is_closing():
                raise ConnectionResetError  # the client has gone
            done = b"data: [DONE]\n\n"
            writer.write((_usage_event(events) if usage else b"") +
                         b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


def serve_upstream(port: int) -> None:
    async def run() -> None:
        server = await asyncio.start_server(_serve_client, "127.0.0.1", port, backlog=1024)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()
    asyncio.run(run())


# ######################################################################### helpers ####

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def send_plain(conn: http.client.HTTPConnection, count: int, key: str) -> None:
    """`count` plain chat completions on one kept-alive connection, each read whole: the
    request the counting tools (profile_request, instructions_per_request) measure."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 16})
    for _ in range(count):
        conn.request("POST", "/v1/chat/completions", body,
                     {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status


def rss_mib(pid: int, field: str) -> float:
    """A process's resident memory now (VmRSS) or at its peak so far (VmHWM): the peak of a
    proxy started without a cached compiled module is the compiling of llm_proxy.py."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return math.nan


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def in_threads(target: object, count: int) -> None:
    """Run `target` in `count` threads at once and wait for them all."""
    threads = [threading.Thread(target=target) for _ in range(count)]  # type: ignore[arg-type]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def post(conn: http.client.HTTPConnection, body: bytes, headers: dict[str, str] | None = None,
         key: str = KEY) -> http.client.HTTPResponse:
    conn.request("POST", "/v1/chat/completions", body,
                 {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                  **(headers or {})})
    return conn.getresponse()


def latency_c1(port: int, count: int, key: str = KEY) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        resp = post(conn, CHAT, key=key)
        resp.read()
        times.append((time.perf_counter() - start) * 1000)
        assert resp.status == 200, resp.status
    conn.close()
    return times


def first_event_ms(port: int, count: int, keep_alive: bool) -> list[float]:
    """Time from sending a stream request to its first event: on a kept-alive connection (as
    the openai SDKs do), or on a new connection each time (as curl does; the proxy then also
    starts a thread for it)."""
    times = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(count):
        if not keep_alive:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.connect() if conn.sock is None else None
        start = time.perf_counter()
        resp = post(conn, STREAM, {"X-Bench-Events": "2", "X-Bench-Spacing-Ms": "1"})
        line = resp.readline()
        times.append((time.perf_counter() - start) * 1000)
        assert line.startswith(b"data: "), line
        resp.read()
        if not keep_alive:
            conn.close()
    conn.close()
    return times


def stream_gaps(port: int, streams: int, events: int, spacing_ms: float) -> list[float]:
    gaps: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(streams)

    def one() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        barrier.wait()
        resp = post(conn, STREAM, {"X-Bench-Events": str(events),
                                   "X-Bench-Spacing-Ms": str(spacing_ms)})
        last, mine = None, []
        while True:
            line = resp.readline()
            if not line or line.startswith(b"data: [DONE]"):
                break
            if line.startswith(b"data: "):
                now = time.perf_counter()
                if last is not None:
                    mine.append((now - last) * 1000)
                last = now
        conn.close()
        with lock:
            gaps.extend(mine)

    in_threads(one, streams)
    return gaps


def load_wrk(port: int, seconds: int, connections: int, threads: int = 2
             ) -> dict[str, object]:
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write('wrk.method = "POST"\n'
                 f'wrk.body = {json.dumps(CHAT.decode())}\n'
                 'wrk.headers["Content-Type"] = "application/json"\n'
                 f'wrk.headers["Authorization"] = "Bearer {KEY}"\n'
                 'function done(summary, latency, requests)\n'
                 '  io.write(string.format("exact: %d %d %d\\n", summary.requests,\n'
                 '           latency:percentile(50), latency:percentile(99)))\n'
                 'end\n')
    script.close()
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s",
               script.name, f"http://127.0.0.1:{port}/v1/chat/completions"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)
    count, p50_us, p99_us = map(int, re.search(r"exact: (\d+) (\d+) (\d+)", out).groups())
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses: (\d+)",
                    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"):
        match = re.search(pattern, out)
        if match:
            errors += sum(int(g) for g in match.groups())
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50": p50_us / 1000, "p99": p99_us / 1000, "requests": count,
            "errors": errors, "tool": f"wrk -t{threads} -c{connections} -d{seconds}s"}


def load_threads(port: int, seconds: int, connections: int) -> dict[str, object]:
    times: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        while time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                resp = post(conn, CHAT)
                resp.read()
                if resp.status != 200:
                    raise OSError(resp.status)
            except OSError:
                with lock:
                    errors[0] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            mine.append((time.perf_counter() - start) * 1000)
        with lock:
            times.extend(mine)

    in_threads(worker, connections)
    return {"rps": len(times) / seconds, "p50": pct(times, 50), "p99": pct(times, 99),
            "errors": errors[0], "tool": f"Python threads, {connections} connections, {seconds} s"}


# ####################################################################### keys file ####

def write_keys_file(directory: str, count: int) -> tuple[str, str]:
    """A keys file of `count` digest-only entries; returns its path and the last entry's key."""
    sys.path.insert(0, ROOT)
    from llm_proxy import key_digest
    path = os.path.join(directory, f"keys-{count}.json")
    with open(path, "w") as f:
        json.dump({"keys": [{"name": f"user{i}", "key_sha256": key_digest(f"sk-bench-{i}"),
                             "max_tokens": 1_000_000_000, "refill_tokens": 1_000_000_000}
                            for i in range(count)]}, f)
    return path, f"sk-bench-{count - 1}"


def bench_keys(up_port: int, requests: int) -> list[tuple[str, str, str, str]]:
    """Key lookup cost with a 10,000-key file against a 1-key file, and whether reloading the
    big file (SIGHUP every 0.5 s) stalls requests."""
    sys.path.insert(0, ROOT)
    import llm_proxy
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        small, small_key = write_keys_file(tmp, 1)
        big, big_key = write_keys_file(tmp, 10_000)
        env = {"HOST": "127.0.0.1", "BASE_API_URL": f"http://127.0.0.1:{up_port}/v1"}
        ports = free_port(), free_port()
        procs = [start([sys.executable, PROXY],
                       {**env, "PORT": str(port), "KEYS_FILE": path}, "listening on", "stderr")
                 for port, path in zip(ports, (small, big))]
        try:
            latency_c1(ports[0], 200, small_key), latency_c1(ports[1], 200, big_key)
            one, many = [], []
            for _ in range(5):
                one += latency_c1(ports[0], requests // 5, small_key)
                many += latency_c1(ports[1], requests // 5, big_key)
            rows.append(("request latency, 1-key file vs 10,000-key file, p50 (ms)",
                         f"{pct(one, 50):.3f}", f"{pct(many, 50):.3f}",
                         f"{pct(many, 50) - pct(one, 50):+.3f}"))
            stop = threading.Event()

            def reloads() -> None:
                while not stop.wait(0.5):
                    procs[1].send_signal(signal.SIGHUP)
            thread = threading.Thread(target=reloads)
            thread.start()
            during = latency_c1(ports[1], requests, big_key)
            stop.set()
            thread.join()
            quiet = latency_c1(ports[1], requests, big_key)
            for q in (50, 99, 100):
                rows.append((f"10,000-key file reloaded every 0.5 s: p{q} (ms)",
                             f"{pct(quiet, q):.3f}", f"{pct(during, q):.3f}",
                             f"{pct(during, q) - pct(quiet, q):+.3f}"))
            alone = []
            for path, key in ((small, small_key), (big, big_key)):
                ring = llm_proxy.load_key_ring(llm_proxy.Config(keys_file=path))
                started = time.perf_counter()
                for _ in range(20_000):
                    ring.lookup(key)
                alone.append((time.perf_counter() - started) / 20_000 * 1e6)
            rows.append(("key lookup alone, in process (µs)", f"{alone[0]:.2f}",
                         f"{alone[1]:.2f}", f"{alone[1] - alone[0]:+.2f}"))
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)
    return rows


# ########################################################################### redis ####

def c64_rows(ports: list[int], seconds: int) -> list[tuple[str, str, str, str]]:
    """Concurrency 64 against two proxies, one after the other: p50, p99, requests/s, errors."""
    load = load_wrk if shutil.which("wrk") else load_threads
    first, second = load(ports[0], seconds, 64), load(ports[1], seconds, 64)
    rows = [(f"c=64, {q} (ms)", f"{first[q]:.2f}", f"{second[q]:.2f}",
             f"{float(second[q]) - float(first[q]):+.2f}") for q in ("p50", "p99")]
    rows.append(("c=64, requests/s", f"{first['rps']:.0f}", f"{second['rps']:.0f}", ""))
    rows.append(("c=64, errors", str(first["errors"]), str(second["errors"]), ""))
    return rows


def bench_redis(up_port: int, requests: int, seconds: int) -> list[tuple[str, str, str, str]]:
    """Added latency of the Redis store against the in-memory one, with a local redis-server,
    at concurrency 1 and 64."""
    server = shutil.which("redis-server")
    if server is None:
        return [("redis-server is not installed: no Redis figures", "", "", "")]
    redis_port = free_port()
    redis_proc = subprocess.Popen([server, "--port", str(redis_port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    env = {"HOST": "127.0.0.1", "BASE_API_URL": f"http://127.0.0.1:{up_port}/v1",
           "MAX_TOKENS": "1000000000", "STATE_DB": "off", "REFILL_TOKENS": "1000000000"}
    ports = free_port(), free_port()
    time.sleep(0.5)
    procs = [start([sys.executable, PROXY],
                   {**env, "PORT": str(port), **extra}, "listening on", "stderr")
             for port, extra in zip(ports, ({}, {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}))]
    try:
        latency_c1(ports[0], 200), latency_c1(ports[1], 200)
        memory, redis = [], []
        for _ in range(5):
            memory += latency_c1(ports[0], requests // 5)
            redis += latency_c1(ports[1], requests // 5)
        for q in (50, 99):
            rows.append((f"c=1, p{q} (ms)", f"{pct(memory, q):.3f}", f"{pct(redis, q):.3f}",
                         f"{pct(redis, q) - pct(memory, q):+.3f}"))
        rows += c64_rows(ports, seconds)
    finally:
        for proc in (*procs, redis_proc):
            proc.terminate()
            proc.wait(30)
    return rows


def bench_state(up_port: int, requests: int, seconds: int) -> list[tuple[str, str, str, str]]:
    """What keeping the state in a file (STATE_DB) adds to a request, against memory only,
    both with a daily quota to count: latency at concurrency 1 and 64, and CPU per request
    (the writer thread's included: it is the same process)."""
    rows = []
    folder = tempfile.mkdtemp()
    env = {"HOST": "127.0.0.1", "BASE_API_URL": f"http://127.0.0.1:{up_port}/v1",
           "MAX_TOKENS": "1000000000", "REFILL_TOKENS": "1000000000",
           "TOKENS_PER_DAY": "1000000000"}
    ports = free_port(), free_port()
    extras = ({"STATE_DB": "off"}, {"STATE_DB": os.path.join(folder, "state.db")})
    procs = [start([sys.executable, PROXY],
                   {**env, "PORT": str(port), **extra}, "listening on", "stderr")
             for port, extra in zip(ports, extras)]
    try:
        latency_c1(ports[0], 200), latency_c1(ports[1], 200)
        memory, state, cpu = [], [], [0.0, 0.0]
        for _ in range(5):
            for index, (port, found) in enumerate(zip(ports, (memory, state))):
                before = cpu_seconds(procs[index].pid)
                found += latency_c1(port, requests // 5)
                cpu[index] += cpu_seconds(procs[index].pid) - before
        for q in (50, 99):
            rows.append((f"c=1, p{q} (ms)", f"{pct(memory, q):.3f}", f"{pct(state, q):.3f}",
                         f"{pct(state, q) - pct(memory, q):+.3f}"))
        per = [c / len(found) * 1e6 for c, found in zip(cpu, (memory, state))]
        rows.append(("c=1, proxy CPU per request (µs)", f"{per[0]:.0f}", f"{per[1]:.0f}",
                     f"{per[1] - per[0]:+.0f}"))
        rows += c64_rows(ports, seconds)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def bench_overview(requests: int) -> list[tuple[str, str, str, str]]:
    """What the dashboard's data (GET /admin/overview) costs with a month of use in the state
    file: 60 keys x 30 days x 24 hours = 43,200 ledger rows. The first call adds every past
    hour up; the ones after it reuse that sum and read only the current hour."""
    sys.path.insert(0, ROOT)
    from llm_proxy import StateFile
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "state.db")
    state = StateFile(path)
    now_hour = int(time.time()) // 3600 * 3600
    state.db.execute("BEGIN")
    state.db.executemany(
        "INSERT INTO ledger VALUES (?, ?, ?, ?, 'generate', 3, 0, 200, 100, 300)",
        ((now_hour - 3600 * h, f"key:{k:064x}", f"user{k}", f"model{k % 3}")
         for h in range(1, 30 * 24 + 1) for k in range(60)))
    state.db.execute("COMMIT")
    state.close()
    port = free_port()
    proc = start([sys.executable, PROXY], {
        "HOST": "127.0.0.1", "PORT": str(port), "BASE_API_URL": "http://127.0.0.1:9/v1",
        "STATE_DB": path}, "listening on", "stderr")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        times = []
        for _ in range(1 + requests):
            started = time.perf_counter()
            conn.request("GET", "/admin/overview")
            answer = conn.getresponse()
            data = json.loads(answer.read())
            times.append((time.perf_counter() - started) * 1000)
            assert answer.status == 200 and len(data["tokens_per_day"]["keys"]) > 1, data
        conn.close()
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(folder, ignore_errors=True)
    later = statistics.median(times[1:])
    return [("GET /admin/overview, 43,200 ledger rows (ms)", f"{times[0]:.1f}", f"{later:.1f}",
             f"{later - times[0]:+.1f}")]


# ######################################################################### fan-out ####

FANOUT_EVENTS, FANOUT_SPACING_MS = 100, 10.0  # a busy model server: 100 tokens/s per stream


class _FanoutRun:
    """What the fan-out client's connections share: the request they send, the measured window
    and what arrived in it."""

    def __init__(self, port: int, events: int, spacing_ms: float) -> None:
        self.request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            f"X-Bench-Events: {events}\r\nX-Bench-Spacing-Ms: {spacing_ms}\r\n"
            f"Content-Length: {len(STREAM)}\r\n\r\n").encode() + STREAM
        self.start = self.end = float("inf")  # set once every connection is open
        self.events = self.streams = self.errors = self.open = 0
        self.gaps: list[float] = []
        self.firsts: list[float] = []
        self.all_closed = asyncio.get_running_loop().create_future()

    def inside(self, moment: float) -> bool:
        return self.start <= moment < self.end

    def closed(self) -> None:
        self.open -= 1
        if self.open == 0 and not self.all_closed.done():
            self.all_closed.set_result(None)


class _FanoutConnection(asyncio.Protocol):
    """One connection of the fan-out client: it asks for a stream, timestamps every event as it
    arrives, and asks for the next stream as soon as one has ended, until the window closes.

    A Protocol rather than a StreamReader: what one recv brought is parsed in one call, with no
    task to wake, so one client process keeps up with 40,000 events a second."""

    def __init__(self, run: _FanoutRun) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.busy = self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.run.open += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing and (self.busy or time.perf_counter() < self.run.end):
            self.run.errors += 1  # the target cut a stream, or a connection it should keep
        self.run.closed()

    def close(self) -> None:
        self.closing = True
        self.transport.close()

    def send(self) -> None:
        self.head, self.raw, self.body = True, b"", b""
        self.chunk_left, self.last_chunk, self.done = 0, False, False
        self.last: float | None = None
        self.busy = True
        self.sent = time.perf_counter()
        self.transport.write(self.run.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.busy:
            return
        self.raw += data
        try:
            if self.head and not self._head():
                return
            ended = self._chunks()
        except ValueError:
            ended = None
        self._events(now)
        if ended is None or (ended and not self.done):
            self.run.errors += 1
            self.close()
        elif ended:
            self.busy = False
            self.run.streams += self.run.inside(now)
            if now < self.run.end:
                self.send()
            else:
                self.close()

    def _head(self) -> bool:
        """Take the response head off; False while it has not all arrived. ValueError if it is
        not a 200 with a chunked body."""
        end = self.raw.find(b"\r\n\r\n")
        if end < 0:
            return False
        head, self.raw = self.raw[:end].lower(), self.raw[end + 4:]
        if not head.startswith(b"http/1.1 200 ") or b"transfer-encoding: chunked" not in head:
            raise ValueError(head)
        self.head = False
        return True

    def _chunks(self) -> bool:
        """Move the chunks' data from raw to body; True once the last chunk is in."""
        raw, pos, pieces = self.raw, 0, []
        while pos < len(raw):
            if self.chunk_left:
                piece = raw[pos:pos + self.chunk_left]
                pieces.append(piece)
                pos += len(piece)
                self.chunk_left -= len(piece)
                continue
            end = raw.find(b"\r\n", pos)
            if end < 0:
                break
            line, pos = raw[pos:end], end + 2
            if line:
                self.chunk_left = int(line.split(b";", 1)[0], 16)
                self.last_chunk = self.chunk_left == 0
            elif self.last_chunk:  # the blank line after the last chunk (no trailers)
                self.raw, self.body = raw[pos:], self.body + b"".join(pieces)
                return True
        self.raw, self.body = raw[pos:], self.body + b"".join(pieces)
        return False

    def _events(self, now: float) -> None:
        """Count the whole events in body, all stamped with the time their bytes arrived."""
        body, start, run = self.body, 0, self.run
        counted = run.inside(now)
        while (end := body.find(b"\n\n", start)) >= 0:
            if body.startswith(b"data: [DONE]", start):
                self.done = True
            elif body.startswith(b"data:", start):
                if self.last is None:
                    if run.inside(self.sent):
                        run.firsts.append(now - self.sent)
                elif counted:
                    run.gaps.append(now - self.last)
                run.events += counted
                self.last = now
            start = end + 2
        self.body = body[start:]


async def fanout_client(port: int, streams: int, events: int, spacing_ms: float,
                        seconds: float) -> dict[str, object]:
    """Open `streams` connections, start their first streams evenly over the length of one
    stream (so that requests then keep arriving at an even rate, as at a busy server with
    streams of every age, rather than all at once), then measure for `seconds`. Prints "start"
    and "end" as the window opens and closes, for the driver to read the target's CPU time."""
    loop = asyncio.get_running_loop()
    run = _FanoutRun(port, events, spacing_ms)
    connections = []
    for _ in range(streams):
        _, connection = await loop.create_connection(lambda: _FanoutConnection(run),
                                                     "127.0.0.1", port)
        connections.append(connection)
    stagger = events * spacing_ms / 1000
    now = time.perf_counter()
    run.start, run.end = now + stagger, now + stagger + seconds
    for index, connection in enumerate(connections):
        loop.call_later(index * stagger / streams, connection.send)
    loop.call_later(stagger, functools.partial(print, "start", flush=True))
    loop.call_later(stagger + seconds, functools.partial(print, "end", flush=True))
    try:  # the streams under way at the end run out (the targets see no cut streams)
        await asyncio.wait_for(asyncio.shield(run.all_closed), stagger * 3 + seconds + 30)
    except asyncio.TimeoutError:
        pass
    unfinished = sum(c.busy for c in connections)
    for connection in connections:
        connection.close()

    def ms(values: list[float], q: float) -> float | None:
        return pct(values, q) * 1000 if values else None
    return {"events_per_s": run.events / seconds, "events": run.events, "streams": run.streams,
            "errors": run.errors + unfinished, "gap_p50": ms(run.gaps, 50),
            "gap_p99": ms(run.gaps, 99), "first_p50": ms(run.firsts, 50),
            "first_p99": ms(run.firsts, 99)}


def fanout_measure(port: int, streams: int, seconds: float, pids: list[int]
                   ) -> dict[str, object]:
    """One fan-out run against `port`, by the client in a process of its own (the same for
    every target); `pids` are the processes whose CPU time is the target's."""
    spec = json.dumps({"port": port, "streams": streams, "events": FANOUT_EVENTS,
                       "spacing_ms": FANOUT_SPACING_MS, "seconds": seconds})
    # A pipe this time: the driver reads three lines, and measures nothing in between.
    client = subprocess.Popen([sys.executable, __file__, "--fanout-client", spec],
                              stdout=subprocess.PIPE, text=True)
    try:
        marks = []
        for expected in ("start", "end"):
            line = client.stdout.readline().strip()
            if line != expected:
                raise SystemExit(f"the fan-out client stopped: {line or 'no output'}")
            marks.append((sum(cpu_seconds(pid) for pid in pids), cpu_seconds(client.pid)))
        result = json.loads(client.stdout.readline())
        client.wait(30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        client.stdout.close()
    (target0, client0), (target1, client1) = marks
    result["cpu_us_per_event"] = \
        (target1 - target0) / max(1, result["events"]) * 1e6 if pids else None
    result["client_cpu"] = (client1 - client0) / seconds
    return result


def child_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


def nginx_conf(tmp: str, port: int, up_port: int, streams: int) -> str:
    """nginx as a streaming reverse proxy in front of the fake upstream: one worker (one core,
    as the proxy's GIL gives it), no buffering, kept-alive upstream connections. Every path it
    writes is in `tmp`."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # else the workers could not reach tmp
    temps = "".join(f"    {kind}_temp_path {tmp}/{kind};\n"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"daemon off;\nworker_processes 1;\n{user}pid {tmp}/nginx.pid;\n"
            f"error_log {tmp}/error.log warn;\nworker_rlimit_nofile {4 * streams + 1024};\n"
            f"events {{ worker_connections {4 * streams + 512}; }}\n"
            "http {\n    access_log off;\n" + temps +
            f"    upstream fake {{ server 127.0.0.1:{up_port}; keepalive {streams}; }}\n"
            f"    server {{\n        listen 127.0.0.1:{port} backlog=1024;\n"
            "        location / {\n            proxy_pass http://fake;\n"
            "            proxy_http_version 1.1;\n"
            '            proxy_set_header Connection "";\n'
            "            proxy_buffering off;\n        }\n    }\n}\n")


def nginx_binary() -> str | None:
    return shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin")


@contextlib.contextmanager
def fanout_target(target: str, mode: str, up_port: int, streams: int
                  ) -> Iterator[tuple[int, list[int]]]:
    """The port to send the streams to and the processes that relay them: the upstream itself
    (nothing relays), nginx (master and worker), or the proxy in its own process."""
    if target == "direct":
        yield up_port, []
        return
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        if target == "nginx":
            with open(os.path.join(tmp, "nginx.conf"), "w") as f:
                f.write(nginx_conf(tmp, port, up_port, streams))
            proc = start_listening([nginx_binary(), "-p", tmp, "-c", "nginx.conf", "-e",
                                    os.path.join(tmp, "error.log")], port, tmp)
            pids = [proc.pid]
            while len(pids) == 1 and proc.poll() is None:  # the worker may not be forked yet
                pids += child_pids(proc.pid)
                time.sleep(0.01)
        else:
            proc = start([sys.executable, PROXY], {
                "HOST": "127.0.0.1", "PORT": str(port),
                "BASE_API_URL": f"http://127.0.0.1:{up_port}/v1", "MAX_TOKENS": "1000000000", "STATE_DB": "off",
                "REFILL_TOKENS": "1000000000", "TOKEN_COST_MODE": mode,
                "MAX_CONNECTIONS": str(max(1024, 2 * streams))}, "listening on", "stderr")
            pids = [proc.pid]
        try:
            yield port, pids
        finally:
            proc.terminate()
            proc.wait(30)


def start_listening(command: list[str], port: int, tmp: str) -> subprocess.Popen:
    """Start a server that says nothing when ready (nginx), once `port` takes connections."""
    with open(os.path.join(tmp, "output.log"), "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                logs = [os.path.join(tmp, name) for name in ("output.log", "error.log")]
                raise SystemExit(f"{command[0]} did not start: " + " ".join(
                    open(path).read() for path in logs if os.path.exists(path)))
            time.sleep(0.02)


def bench_fanout(up_port: int, counts: list[int], modes: list[str], seconds: float
                 ) -> tuple[str, list[tuple[str, ...]]]:
    """N streams at once through each target, one after another, N by N: the settings line and
    the rows of the table."""
    nginx = nginx_binary()
    targets = [("direct", "–")] + ([("nginx", "–")] if nginx else []) + \
        [("llm_proxy", mode) for mode in modes]
    rows = []
    for streams in counts:
        for target, mode in targets:
            with fanout_target(target, mode, up_port, streams) as (port, pids):
                r = fanout_measure(port, streams, seconds, pids)
            cpu = r["cpu_us_per_event"]
            rows.append((target, mode, str(streams), f"{r['events_per_s']:,.0f}",
                         *(_ms(r[k]) for k in ("gap_p50", "gap_p99", "first_p50", "first_p99")),
                         "–" if cpu is None else f"{cpu:.1f}", str(r["errors"]),
                         f"{r['client_cpu'] * 100:.0f}"))
    if nginx:
        version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr
        relay = (f"nginx {version.strip().rsplit('/', 1)[-1]} with one worker, "
                 "proxy_buffering off, kept-alive upstream connections")
    else:
        relay = "nginx is not installed: no nginx rows"
    settings = (f"each stream {FANOUT_EVENTS} events {FANOUT_SPACING_MS:g} ms apart from the fake "
                "upstream, asked for again as soon as it ends (same connection); the first "
                f"streams started evenly over {FANOUT_EVENTS * FANOUT_SPACING_MS / 1000:g} s, "
                f"then {seconds:g} s measured; one asyncio client process for every target; "
                f"{relay}; Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    return settings, rows


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def raise_open_files(needed: int) -> None:
    """Let the processes started from here have `needed` descriptors (a proxy relaying N streams
    holds 2N sockets), as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (needed if hard == resource.RLIM_INFINITY else min(needed, hard), hard))


# ############################################################################# run ####

def start(command: list[str], env: dict[str, str], ready: str, stream: str) -> subprocess.Popen:
    """Start a process whose output goes to a file (as a log would), once it has said `ready`.
    Not a pipe: draining one would wake a thread of this process for every log line, in the
    middle of the latencies it measures."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(command, env={**os.environ, **env}, text=True, stdout=log,
                            stderr=log)
    deadline = time.monotonic() + 30
    while True:
        log.seek(0)
        text = log.read()
        if ready in text:
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{command[1]} did not start: {text}")
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--core", action="store_true",
                        help="only the proxy against direct calls (latency, c=64, streams)")
    parser.add_argument("--keys", action="store_true",
                        help="only the keys-file figures (10,000 keys against 1, reloads)")
    parser.add_argument("--state", action="store_true",
                        help="only STATE_DB (a state file) against memory, with a daily quota")
    parser.add_argument("--redis", action="store_true",
                        help="only the Redis store against the in-memory one")
    parser.add_argument("--overview", action="store_true",
                        help="only the dashboard's data with a month of use in the state file")
    parser.add_argument("--fanout", action="store_true",
                        help="only the fan-out figure: N streams at once, direct, through nginx "
                             "(when installed) and through the proxy")
    parser.add_argument("--fanout-streams", metavar="N,N",
                        help="streams at once, one run each (default 200,400; --quick: 50)")
    parser.add_argument("--fanout-modes", metavar="MODE,MODE", default="request,usage",
                        help="the proxy's TOKEN_COST_MODE, one run each (default request,usage)")
    parser.add_argument("--fanout-seconds", type=float, metavar="S",
                        help="seconds measured per run (default 10; --quick: 3)")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--fanout-client", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return 0
    if args.fanout_client:
        print(json.dumps(asyncio.run(fanout_client(**json.loads(args.fanout_client)))))
        return 0

    requests, seconds, firsts = (300, 2, 50) if args.quick else (3000, 10, 300)
    everything = not (args.core or args.keys or args.redis or args.fanout or args.state
                      or args.overview)
    counts = [int(n) for n in (args.fanout_streams or ("50" if args.quick else "200,400")
                               ).split(",")]
    if everything or args.fanout:
        raise_open_files(4 * max(counts) + 1024)  # before the upstream starts: it inherits it
    up_port = free_port()
    upstream = start([sys.executable, __file__, "--serve-upstream", str(up_port)], {}, "ready",
                     "stdout")
    try:
        print(f"\nllm_proxy benchmark: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
        if everything or args.core:
            rows, tool = proxy_rows(up_port, requests, seconds, firsts, args.quick)
            print_table(f"the proxy against direct calls ({tool})", ("direct", "proxy"), rows)
        if everything or args.keys:
            print_table("keys file", ("1 key / quiet", "10,000 keys / reloading"),
                        bench_keys(up_port, requests))
        if everything or args.state:
            print_table("state", ("memory only", "STATE_DB"),
                        bench_state(up_port, requests, seconds))
        if everything or args.overview:
            print_table("dashboard", ("first call", "later calls"),
                        bench_overview(5 if args.quick else 20))
        if everything or args.redis:
            print_table("bucket store", ("memory", "redis"),
                        bench_redis(up_port, requests, seconds))
        if everything or args.fanout:
            fanout_seconds = args.fanout_seconds or (3 if args.quick else 10)
            settings, rows = bench_fanout(up_port, counts, args.fanout_modes.split(","),
                                          fanout_seconds)
            print_grid(f"fan-out ({settings})", FANOUT_COLUMNS, rows)
    finally:
        upstream.terminate()
        upstream.wait(30)
    return 0


def print_table(title: str, columns: tuple[str, str], rows: list[tuple[str, str, str, str]]
                ) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}\n")
    print(f"| {'measure'.ljust(width)} | {columns[0]} | {columns[1]} | added |")
    print(f"|{'-' * (width + 2)}|{'-' * (len(columns[0]) + 1)}:|{'-' * (len(columns[1]) + 1)}:"
          f"|------:|")
    for name, a, b, c in rows:
        print(f"| {name.ljust(width)} | {a} | {b} | {c} |")


FANOUT_COLUMNS = ("target", "mode", "streams", "events/s delivered", "gap p50 ms", "gap p99 ms",
                  "TTFT p50 ms", "TTFT p99 ms", "CPU µs per event", "errors", "client CPU %")


def print_grid(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A markdown table with every column padded; the first two left-aligned, the rest right."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print(f"\n{title}\n")
    for row in (columns, *rows):
        print("| " + " | ".join(v.ljust(w) if i < 2 else v.rjust(w)
                                for i, (v, w) in enumerate(zip(row, widths))) + " |")
        if row is columns:
            print("|" + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":"
                                 for i, w in enumerate(widths)) + "|")


def proxy_rows(up_port: int, requests: int, seconds: int, firsts: int, quick: bool
               ) -> tuple[list[tuple[str, str, str, str]], str]:
    """The proxy against direct calls: latency, CPU, load at c=64, first event, spacing."""
    proxy_port = free_port()
    proxy = start([sys.executable, PROXY], {
        "HOST": "127.0.0.1", "PORT": str(proxy_port),
        "BASE_API_URL": f"http://127.0.0.1:{up_port}/v1", "MAX_TOKENS": "1000000000", "STATE_DB": "off",
        "REFILL_TOKENS": "1000000000"}, "listening on", "stderr")
    rows: list[tuple[str, str, str, str]] = []
    try:
        latency_c1(up_port, 200), latency_c1(proxy_port, 200)  # warm up both paths
        tools = []
        if shutil.which("wrk"):  # c=1 timed by wrk, in rounds that alternate direct and proxy
            rounds, each = (1, 1) if quick else (3, 3)
            direct_runs, proxy_runs, cpu = [], [], 0.0
            for _ in range(rounds):
                direct_runs.append(load_wrk(up_port, each, 1, threads=1))
                before = cpu_seconds(proxy.pid)
                proxy_runs.append(load_wrk(proxy_port, each, 1, threads=1))
                cpu += cpu_seconds(proxy.pid) - before
            for q in ("p50", "p99"):
                d = statistics.median(r[q] for r in direct_runs)
                p = statistics.median(r[q] for r in proxy_runs)
                rows.append((f"non-stream latency, c=1, {q} (ms)", f"{d:.3f}", f"{p:.3f}",
                             f"{p - d:+.3f}"))
            count = sum(r["requests"] for r in proxy_runs)
            rows.append(("proxy CPU per request, c=1 (µs)", "", f"{cpu / count * 1e6:.0f}", ""))
            tools.append(f"c=1: wrk -t1 -c1 -d{each}s, {rounds} rounds (medians)")
        direct, proxied = [], []
        cpu = 0.0
        for _ in range(5):  # interleave, so drift in the machine affects both alike
            direct += latency_c1(up_port, requests // 5)
            before = cpu_seconds(proxy.pid)
            proxied += latency_c1(proxy_port, requests // 5)
            cpu += cpu_seconds(proxy.pid) - before
        client = ", Python http.client" if tools else ""
        rows.append((f"non-stream latency, c=1{client}, p50 (ms)", f"{pct(direct, 50):.3f}",
                     f"{pct(proxied, 50):.3f}", f"{pct(proxied, 50) - pct(direct, 50):+.3f}"))
        rows.append((f"non-stream latency, c=1{client}, p99 (ms)", f"{pct(direct, 99):.3f}",
                     f"{pct(proxied, 99):.3f}", f"{pct(proxied, 99) - pct(direct, 99):+.3f}"))
        if not tools:
            rows.append(("proxy CPU per request, c=1 (µs)", "", f"{cpu / requests * 1e6:.0f}",
                         ""))

        load = load_wrk if shutil.which("wrk") else load_threads
        d64 = load(up_port, seconds, 64)
        before = cpu_seconds(proxy.pid)
        p64 = load(proxy_port, seconds, 64)
        cpu64 = cpu_seconds(proxy.pid) - before
        rows.append((f"c=64 for {seconds} s: requests/s", f"{d64['rps']:.0f}", f"{p64['rps']:.0f}",
                     ""))
        rows.append(("c=64: p50 (ms)", f"{d64['p50']:.2f}", f"{p64['p50']:.2f}",
                     f"{p64['p50'] - d64['p50']:+.2f}"))
        rows.append(("c=64: p99 (ms)", f"{d64['p99']:.2f}", f"{p64['p99']:.2f}",
                     f"{p64['p99'] - d64['p99']:+.2f}"))
        rows.append(("c=64: errors", str(d64["errors"]), str(p64["errors"]), ""))
        rows.append(("proxy CPU per request, c=64 (µs)", "",
                     f"{cpu64 / max(1, p64['rps'] * seconds) * 1e6:.0f}", ""))

        for keep_alive, label in ((True, "kept-alive connection"), (False, "new connection")):
            d_first = first_event_ms(up_port, firsts, keep_alive)
            p_first = first_event_ms(proxy_port, firsts, keep_alive)
            rows.append((f"time to first event, {label}, p50 (ms)", f"{pct(d_first, 50):.3f}",
                         f"{pct(p_first, 50):.3f}",
                         f"{pct(p_first, 50) - pct(d_first, 50):+.3f}"))

        d_gaps = stream_gaps(up_port, 50, 20 if quick else 50, 20)
        p_gaps = stream_gaps(proxy_port, 50, 20 if quick else 50, 20)
        for q in (50, 99):
            rows.append((f"50 streams, event spacing p{q} (ms; upstream sends every 20)",
                         f"{pct(d_gaps, q):.2f}", f"{pct(p_gaps, q):.2f}",
                         f"{pct(p_gaps, q) - pct(d_gaps, q):+.2f}"))
        rows.append(("50 streams, event spacing mean (ms)", f"{statistics.mean(d_gaps):.2f}",
                     f"{statistics.mean(p_gaps):.2f}", ""))
        rows.append(("proxy RSS after all of the above (MiB)", "",
                     f"{rss_mib(proxy.pid, 'VmRSS'):.1f}", ""))
        rows.append(("proxy peak RSS, start-up included (MiB)", "",
                     f"{rss_mib(proxy.pid, 'VmHWM'):.1f}", ""))
    finally:
        proxy.terminate()
        proxy.wait(30)
    return rows, "; ".join([*tools, f"c=64: {p64['tool']}"])


if __name__ == "__main__":
    sys.exit(main())
