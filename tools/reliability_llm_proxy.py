#!/usr/bin/env python3
"""Load, soak, fairness, fuzz and slow-client runs for llm_proxy (by hand, not unit tests).

    python3 tools/reliability_llm_proxy.py             # everything, about ten minutes
    python3 tools/reliability_llm_proxy.py --quick     # the same, shorter (about three minutes)
    python3 tools/reliability_llm_proxy.py soak fuzz   # some parts only: soak flood fairness fuzz slow

Everything runs on loopback against the benchmark's asyncio fake upstream (the slow part: a variant
of it in this script with a large /v1/models), with the proxy as its own process (its RSS and
thread count are read from /proc, Linux). Each part prints its figures and a verdict; the exit
status is 1 if any verdict failed.

  soak      200 concurrent streaming clients for 60 s, plus a burst of 2,000 short requests from
            500 keys that hold 3 tokens each (so 500 must be refused): no unexpected errors,
            upstream count == tokens available, RSS growth < 20 MB, threads back to baseline.
  flood     100,000 requests with random keys (wrk with a Lua script): peak RSS stays bounded.
  fairness  MAX_UPSTREAM_CONCURRENCY=2, a 50 ms upstream; one key keeps 50 requests queued,
            another sends one at a time: the second key's wait, fair queue against FIFO.
  fuzz      random and mutated HTTP requests for 60 s from 4 threads: the proxy never dies and
            answers a normal request after every 200 of them.
  slow      slow-client attacks, each against the proxy and against nginx (1.22, proxy_pass to
            the same fake upstream) in the same run, each target started fresh per attack:
            2,000 idle connections that send nothing (kept open from a thread of this script,
            reopened when the server closes them), slowloris (slowhttptest -H), slow body
            (slowhttptest -B, POST /v1/chat/completions) and slow read (slowhttptest -X, GET
            /v1/models of about 270 KB). After a ramp-up, a normal client sends a POST
            /v1/chat/completions every 0.25 s on a fresh connection (5 s timeout); the table
            gives the share served per attack and target, and the verdict asks at least 95 % for
            the proxy. Needs nginx; without slowhttptest only the idle flood runs. The open-files
            limit is raised to the hard limit first, and every process started inherits it.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import http.client
import json
import os
import random
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))  # tools/
ROOT = os.path.dirname(HERE)  # the project, where llm_proxy.py lives
PROXY = os.path.join(ROOT, "llm_proxy.py")
sys.path.insert(0, HERE)
from bench_llm_proxy import ANSWER, child_pids, free_port, pct, start  # noqa: E402  (the benchmark's helpers)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


# ######################################################################### helpers ####

def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (kB), VmHWM (peak kB) and Threads of a process."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Threads"):
                values[name] = int(rest.split()[0])
    return values


def call(port: int, key: str, body: dict, headers: dict[str, str] | None = None,
         conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                      **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        if own:
            conn.close()


def served(up_port: int, model: str) -> int:
    """How many requests for `model` the fake upstream has answered."""
    conn = http.client.HTTPConnection("127.0.0.1", up_port, timeout=10)
    conn.request("GET", "/v1/_served")
    count = json.loads(conn.getresponse().read()).get(model, 0)
    conn.close()
    return count


class Stack:
    """The fake upstream and one proxy, as processes."""

    def __init__(self, env: dict[str, str]) -> None:
        self.up_port, self.port = free_port(), free_port()
        self.upstream = start([sys.executable, os.path.join(HERE, "bench_llm_proxy.py"),
                               "--serve-upstream", str(self.up_port)], {}, "ready", "stdout")
        self.proxy = start([sys.executable, PROXY], {
            "HOST": "127.0.0.1", "PORT": str(self.port),
            "BASE_API_URL": f"http://127.0.0.1:{self.up_port}/v1", "STATE_DB": "off", **env},
            "listening on", "stderr")

    def close(self) -> None:
        for proc in (self.proxy, self.upstream):
            proc.terminate()
            proc.wait(30)


def verdict(ok: bool, text: str) -> bool:
    print(f"  {'PASS' if ok else 'FAIL'}: {text}")
    return ok


# ############################################################################ soak ####

def soak(seconds: int) -> bool:
    print(f"\nsoak: 200 streaming clients for {seconds} s + 2,000 requests from 500 keys")
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "keys.json")
    entries = [{"name": f"stream{i}", "key": f"sk-stream-{i}", "max_tokens": 1_000_000_000,
                "refill_tokens": 1_000_000_000} for i in range(200)]
    entries += [{"name": f"burst{i}", "key": f"sk-burst-{i}", "max_tokens": 3}
                for i in range(500)]
    with open(path, "w") as f:
        json.dump({"keys": entries}, f)
    stack = Stack({"KEYS_FILE": path, "MAX_CONNECTIONS": "1024"})
    try:
        call(stack.port, "sk-stream-0", CHAT)  # warm up
        base = proc_status(stack.proxy.pid)
        errors: list[str] = []
        streams = [0]
        lock = threading.Lock()
        deadline = time.monotonic() + seconds

        def streamer(index: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=60)
            while time.monotonic() < deadline:
                try:
                    status, body = call(stack.port, f"sk-stream-{index}", {**CHAT, "stream": True},
                                        {"X-Bench-Events": "20", "X-Bench-Spacing-Ms": "20"},
                                        conn)
                    if status != 200 or not body.endswith(b"data: [DONE]\n\n"):
                        raise OSError(f"status {status}")
                    with lock:
                        streams[0] += 1
                except (OSError, http.client.HTTPException) as err:
                    with lock:
                        errors.append(f"stream: {err!r}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=60)
            conn.close()

        threads = [threading.Thread(target=streamer, args=(i,)) for i in range(200)]
        for t in threads:
            t.start()
        time.sleep(min(5, seconds / 4))  # the burst lands while the streams run
        outcomes = {"admitted": 0, "limited": 0}

        def burster(keys: list[int]) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=60)
            for key in keys:
                for _ in range(4):
                    try:
                        status, body = call(stack.port, f"sk-burst-{key}",
                                            {**CHAT, "model": "burst"}, conn=conn)
                    except (OSError, http.client.HTTPException) as err:
                        with lock:
                            errors.append(f"burst: {err!r}")
                        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=60)
                        continue
                    with lock:
                        if status == 200 and b"limit reached" in body:
                            outcomes["limited"] += 1
                        elif status == 200:
                            outcomes["admitted"] += 1
                        else:
                            errors.append(f"burst: status {status}")
            conn.close()

        bursters = [threading.Thread(target=burster, args=(list(range(i, 500, 25)),))
                    for i in range(25)]
        for t in bursters:
            t.start()
        for t in bursters:
            t.join()
        burst_served = served(stack.up_port, "burst")
        for t in threads:
            t.join()
        time.sleep(1)
        after = proc_status(stack.proxy.pid)
        growth = (after["VmRSS"] - base["VmRSS"]) / 1024
        print(f"  streams completed: {streams[0]}, burst: {outcomes}, errors: {len(errors)}")
        print(f"  RSS {base['VmRSS'] / 1024:.1f} MB -> {after['VmRSS'] / 1024:.1f} MB "
              f"(peak {after['VmHWM'] / 1024:.1f} MB); threads {base['Threads']} -> "
              f"{after['Threads']}")
        ok = verdict(not errors, f"no unexpected errors {errors[:3]}")
        ok &= verdict(outcomes == {"admitted": 1500, "limited": 500},
                      "exact admission: 1,500 of 2,000 burst requests admitted (3 tokens x 500 "
                      "keys)")
        ok &= verdict(burst_served == 1500, f"no over-admission: the upstream served "
                      f"{burst_served} burst requests, the tokens available were 1,500")
        ok &= verdict(growth < 20, f"RSS growth {growth:.1f} MB < 20 MB")
        ok &= verdict(after["Threads"] <= base["Threads"], "threads back to baseline")
        return ok
    finally:
        stack.close()
        shutil.rmtree(tmp)


# ########################################################################### flood ####

def flood(requests: int) -> bool:
    """A new random bearer token per request (an open proxy: anyone may invent keys), once
    with the buckets unbounded and once with MAX_BUCKETS, in memory only: how much memory a
    key costs, and that MAX_BUCKETS bounds it."""
    print(f"\nflood: {requests:,} requests, each with a new random key")
    if not shutil.which("wrk"):
        return verdict(False, "wrk is not installed (apt-get install wrk)")
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write(f"""
wrk.method = "POST"
wrk.body = {json.dumps(json.dumps(CHAT))}
wrk.headers["Content-Type"] = "application/json"
local sent = 0
function init(args)  -- each wrk thread its own random keys (they share a seed otherwise)
  math.randomseed(tonumber(tostring({{}}):match("0x(%x+)"), 16) % 2147483647)
end
request = function()
  sent = sent + 1
  if sent > {requests // 2} then wrk.thread:stop() end
  local key = string.format("sk-%08x%08x", math.random(0, 2^31), math.random(0, 2^31))
  wrk.headers["Authorization"] = "Bearer " .. key
  return wrk.format()
end
""")
    script.close()
    ok = True
    bound = requests // 10
    try:
        for max_buckets in ("0", str(bound)):
            stack = Stack({"MAX_BUCKETS": max_buckets, "STATE_DB": "off"})
            try:
                base = proc_status(stack.proxy.pid)
                out = subprocess.run(["wrk", "-t2", "-c32", "-d120s", "-s", script.name,
                                      f"http://127.0.0.1:{stack.port}/v1/chat/completions"],
                                     capture_output=True, text=True).stdout
                done = int(out.split(" requests in")[0].split()[-1])
                after = proc_status(stack.proxy.pid)
                held = metric(stack.port, "llm_proxy_buckets")
                label = "unbounded" if max_buckets == "0" else f"MAX_BUCKETS={int(max_buckets):,}"
                print(f"  {label}: {done:,} requests; buckets held {held:,.0f}; RSS "
                      f"{base['VmRSS'] / 1024:.1f} MB -> {after['VmRSS'] / 1024:.1f} MB, "
                      f"peak {after['VmHWM'] / 1024:.1f} MB")
                if max_buckets == "0":
                    per_key = (after["VmHWM"] - base["VmRSS"]) * 1024 / max(done, 1)
                    print(f"  about {per_key:.0f} bytes per distinct key held (its bucket until "
                          "it refills, counters, a ledger row, metric series capped at 1,000)")
                    ok &= verdict(after["VmHWM"] / 1024 < 200, "peak RSS under 200 MB")
                else:
                    ok &= verdict(held <= bound, f"buckets held stay at most {bound:,}")
            finally:
                stack.close()
        return ok
    finally:
        os.unlink(script.name)


def metric(port: int, name: str) -> float:
    """One gauge of the proxy's /metrics (loopback: no admin key needed)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


# ######################################################################## fairness ####

def fairness(seconds: int) -> bool:
    print(f"\nfairness: MAX_UPSTREAM_CONCURRENCY=2, 50 ms upstream, {seconds} s per mode")
    results = {}
    for fair in ("1", "0"):
        stack = Stack({"MAX_UPSTREAM_CONCURRENCY": "2", "FAIR_QUEUE": fair,
                       "MAX_TOKENS": "1000000000", "REFILL_TOKENS": "1000000000",
                       "UPSTREAM_QUEUE_TIMEOUT": "120"})
        try:
            stop = threading.Event()
            delay = {"X-Bench-Delay-Ms": "50"}

            def hog() -> None:  # key A keeps about 50 requests queued
                conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=120)
                while not stop.is_set():
                    call(stack.port, "sk-hog", CHAT, delay, conn)
                conn.close()

            hogs = [threading.Thread(target=hog) for _ in range(50)]
            for t in hogs:
                t.start()
            time.sleep(1)
            waits = []
            conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=120)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                started = time.perf_counter()
                call(stack.port, "sk-polite", CHAT, delay, conn)
                waits.append((time.perf_counter() - started) * 1000 - 50)
            conn.close()
            stop.set()
            for t in hogs:
                t.join()
            results[fair] = waits
            print(f"  {'fair' if fair == '1' else 'FIFO'}: the polite key's wait beyond the 50 ms "
                  f"service: p50 {pct(waits, 50):.0f} ms, p99 {pct(waits, 99):.0f} ms "
                  f"({len(waits)} requests)")
        finally:
            stack.close()
    return verdict(pct(results["1"], 99) <= 75,
                   "with the fair queue the polite key waits at most about one service time "
                   f"(p99 {pct(results['1'], 99):.0f} ms)")


# ############################################################################ fuzz ####

SEEDS = [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-fuzz\r\n"
    b"Content-Type: application/json\r\nContent-Length: 61\r\n\r\n"
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}',
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n0\r\n\r\n",
    b"OPTIONS /v1/chat/completions HTTP/1.1\r\nAccess-Control-Request-Headers: x\r\n\r\n",
    b"GET /health HTTP/1.0\r\n\r\n",
]
TOKENS = [b"\r\n", b"\r\n\r\n", b" ", b":", b"\x00", b"\xff", b"%", b"%2e%2e/", b"//", b"{",
          b"}", b"[" * 50, b"Content-Length: 99999999\r\n", b"Transfer-Encoding: chunked\r\n",
          b"Expect: 100-continue\r\n", b"HTTP/2.0", b"GET", b"\t", b"-1", b"0x10"]


def mutate(rng: random.Random) -> bytes:
    if rng.random() < 0.15:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 400)))
    data = bytearray(rng.choice(SEEDS))
    for _ in range(rng.randint(1, 6)):
        where = rng.randint(0, len(data))
        action = rng.random()
        if action < 0.4:
            data[where:where] = rng.choice(TOKENS)
        elif action < 0.7 and data:
            del data[where:where + rng.randint(1, 20)]
        elif data:
            data[min(where, len(data) - 1)] = rng.getrandbits(8)
    return bytes(data)


def fuzz(seconds: int) -> bool:
    print(f"\nfuzz: random and mutated requests for {seconds} s")
    stack = Stack({"CLIENT_HEADER_TIMEOUT": "2", "CLIENT_BODY_TIMEOUT": "2",
                   "MAX_TOKENS": "1000000000", "REFILL_TOKENS": "1000000000"})
    sent = [0]
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def fuzzer(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            data = mutate(rng)
            try:
                with socket.create_connection(("127.0.0.1", stack.port), timeout=3) as sock:
                    sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                    while sock.recv(65536):
                        pass
            except OSError:
                pass  # resets and timeouts are fine answers to garbage
            with lock:
                sent[0] += 1
                check = sent[0] % 200 == 0
            if check:
                try:
                    status, _ = call(stack.port, "sk-check", CHAT)
                    if status != 200:
                        raise OSError(f"status {status}")
                except (OSError, http.client.HTTPException) as err:
                    with lock:
                        failures.append(repr(err))
    try:
        threads = [threading.Thread(target=fuzzer, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        alive = stack.proxy.poll() is None
        status, _ = call(stack.port, "sk-check", CHAT) if alive else (0, b"")
        print(f"  {sent[0]:,} fuzzed requests; normal requests failing between them: "
              f"{len(failures)}")
        ok = verdict(alive and status == 200, "the proxy is alive and answers afterwards")
        ok &= verdict(not failures, f"every check request in between succeeded {failures[:3]}")
        return ok
    finally:
        stack.close()


# ############################################################################ slow ####

NORMAL_EVERY = 0.25  # seconds between two normal requests during an attack
NORMAL_TIMEOUT = 5.0  # a normal request that takes longer than this counts as failed
IDLE_CONNECTIONS = 2000
# The slow-read target: GET /v1/models, which the slow part's fake upstream answers with about
# 270 KB (more than nginx's proxy buffers; on loopback, though, the kernel's autotuned send buffer
# takes it whole: see the note printed with the results). It exists on both targets: nginx passes
# it to the same upstream.
MODELS = json.dumps({"object": "list", "data": [
    {"id": f"slow-read-model-{i:05d}-{'x' * 40}", "object": "model", "created": 1,
     "owned_by": "reliability"} for i in range(2000)]}).encode()
SLOW_ATTACKS = [  # name, table label, slowhttptest arguments (None: the idle flood), path
    ("idle", f"{IDLE_CONNECTIONS:,} idle connections that send nothing", None, "/"),
    ("slowloris", "slowloris (`slowhttptest -H -c 1500 -r 200 -i 10`)",
     ["-H", "-c", "1500", "-r", "200", "-i", "10"], "/v1/models"),
    ("slow body", "slow body (`slowhttptest -B -c 1500 -r 200 -i 10 -s 16384`, "
     "POST /v1/chat/completions)",
     ["-B", "-c", "1500", "-r", "200", "-i", "10", "-s", "16384", "-f", "application/json"],
     "/v1/chat/completions"),
    ("slow read", "slow read (`slowhttptest -X -c 500 -r 200 -w 1 -y 1 -n 5 -z 1 -k 3`, "
     f"GET /v1/models, {len(MODELS) // 1000} KB)",
     ["-X", "-c", "500", "-r", "200", "-w", "1", "-y", "1", "-n", "5", "-z", "1", "-k", "3"],
     "/v1/models"),
]


async def _slow_upstream_client(reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            if length:
                await reader.readexactly(int(length.group(1)))
            payload = MODELS if head.startswith(b"GET /v1/models ") else ANSWER
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        pass
    finally:
        writer.close()


def serve_slow_upstream(port: int) -> None:
    """The slow part's fake upstream: a large GET /v1/models, the benchmark's answer otherwise."""
    async def run() -> None:
        server = await asyncio.start_server(_slow_upstream_client, "127.0.0.1", port,
                                            backlog=4096)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()
    asyncio.run(run())


def raise_nofile() -> str:
    """Raise this process's open-files limit to the hard limit. Children (the proxy, nginx,
    slowhttptest, the upstream) inherit it, which is why it is done before any is started:
    otherwise each would need its own `ulimit -n` (or `prlimit`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        pass
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    note = f"open-files limit {soft} -> {now} (inherited by every process started here)"
    if now < 2 * IDLE_CONNECTIONS + 1000:
        note += "; too low for these attacks: raise the hard limit (ulimit -Hn) and run again"
    return note


class Processes:
    """Every process the slow part starts, so that all of them are stopped on any exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def launch(self, command: list[str], log: object, env: dict[str, str] | None = None,
               group: bool = False) -> subprocess.Popen:
        proc = subprocess.Popen(command, env={**os.environ, **(env or {})},
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=group)
        proc.group = group  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, first: int = signal.SIGTERM) -> None:
        """`first` (to the whole process group for nginx and slowhttptest), then SIGKILL."""
        def signal_it(sig: int) -> None:
            try:
                if proc.group:  # type: ignore[attr-defined]
                    os.killpg(proc.pid, sig)
                elif proc.poll() is None:
                    proc.send_signal(sig)
            except (ProcessLookupError, PermissionError):
                pass
        signal_it(first)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        signal_it(signal.SIGKILL)  # also whatever is left of the group (nginx's worker)
        proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.procs[:]):
            self.stop(proc, signal.SIGINT if proc.args[0] == "slowhttptest" else signal.SIGTERM)


def wait_ready(proc: subprocess.Popen, log: object, port: int, ready: str | None) -> None:
    """Wait until `ready` is in the process's log (or, without one, the port accepts)."""
    deadline = time.monotonic() + 30
    while True:
        log.seek(0)  # type: ignore[attr-defined]
        text = log.read()  # type: ignore[attr-defined]
        if ready is not None and ready in text:
            return
        if ready is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[0]} did not start: {text[-2000:]}")
        time.sleep(0.05)


NGINX_CONF = """daemon off;
worker_processes 1;
worker_rlimit_nofile 10000;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream fake {{ server 127.0.0.1:{up_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


class Sampler:
    """Peak RSS and threads of a process (and, for nginx, of its worker) every 0.25 s."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = self._read()
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self) -> dict[str, int]:
        total = {"VmRSS": 0, "Threads": 0}
        for pid in [self.pid, *child_pids(self.pid)]:
            try:
                status = proc_status(pid)
            except OSError:
                continue
            total["VmRSS"] += status.get("VmRSS", 0)  # nginx: master + worker
            total["Threads"] += status.get("Threads", 0)
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            now = self._read()
            for name in self.peak:
                self.peak[name] = max(self.peak[name], now[name])

    def stop(self) -> str:
        self._stop.set()
        self._thread.join()
        return (f"RSS {self.base['VmRSS'] / 1024:.1f} -> peak {self.peak['VmRSS'] / 1024:.1f} MB, "
                f"threads {self.base['Threads']} -> peak {self.peak['Threads']}")


class IdleFlood:
    """Keeps `count` TCP connections open that send nothing, from one thread with non-blocking
    sockets: each one the server closes (after its header timeout, say) is opened again, at most
    `rate` openings a second, as an attacker would."""

    def __init__(self, port: int, count: int, rate: int = 1000) -> None:
        self.address, self.count, self.rate = ("127.0.0.1", port), count, rate
        self.selector = selectors.DefaultSelector()
        self.opened = self.connected = self.peak = self.closed_by_server = self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            return
        self.selector.register(sock, selectors.EVENT_WRITE, "connecting")
        self.opened += 1

    def _drop(self, sock: socket.socket) -> None:
        self.selector.unregister(sock)
        sock.close()

    def _run(self) -> None:
        budget, last = 0.0, time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                budget = min(self.rate / 10, budget + (now - last) * self.rate)
                last = now
                while len(self.selector.get_map()) < self.count and budget >= 1:
                    try:
                        self._open()
                    except OSError:  # out of file descriptors or ports: try again later
                        break
                    budget -= 1
                for key, _ in self.selector.select(0.05):
                    sock = key.fileobj
                    if key.data == "connecting":
                        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):  # type: ignore
                            self._drop(sock)  # type: ignore[arg-type]
                            continue
                        self.selector.modify(sock, selectors.EVENT_READ, "open")
                        self.connected += 1
                        self.peak = max(self.peak, self.connected)
                        continue
                    try:
                        data = sock.recv(65536)  # type: ignore[union-attr]
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if data:
                        self.answered += 1  # e.g. a 503 or 408; the close follows
                    else:
                        self.connected -= 1
                        self.closed_by_server += 1
                        self._drop(sock)  # type: ignore[arg-type]
        finally:
            for key in list(self.selector.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            self.selector.close()

    def stop(self) -> str:
        self._stop.set()
        self._thread.join()
        return (f"idle connections: {self.peak:,} open at most, {self.connected:,} at the end, "
                f"{self.closed_by_server:,} closed by the server (and reopened), "
                f"{self.opened:,} opened in all")


def normal_requests(port: int, seconds: float) -> tuple[int, int, Counter, list[float]]:
    """One POST /v1/chat/completions every NORMAL_EVERY s, each on a fresh connection and in its
    own thread (so that a slow one does not delay the next): successes, attempts, failure
    reasons, latencies of the successes (ms)."""
    body = json.dumps(CHAT)
    outcomes: list[tuple[bool, str, float]] = []
    lock = threading.Lock()

    def one() -> None:
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=NORMAL_TIMEOUT)
        try:
            conn.request("POST", "/v1/chat/completions", body,
                         {"Authorization": "Bearer sk-normal", "Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            ok = resp.status == 200 and b'"choices"' in data
            reason = "ok" if ok else f"status {resp.status}"
        except TimeoutError:
            ok, reason = False, "timeout"
        except (OSError, http.client.HTTPException) as err:
            ok, reason = False, type(err).__name__
        finally:
            conn.close()
        elapsed = time.perf_counter() - started
        if ok and elapsed > NORMAL_TIMEOUT:
            ok, reason = False, f"slower than {NORMAL_TIMEOUT:.0f} s"
        with lock:
            outcomes.append((ok, reason, elapsed * 1000))

    threads = []
    begin = time.monotonic()
    for index in range(int(seconds / NORMAL_EVERY)):
        time.sleep(max(0.0, begin + index * NORMAL_EVERY - time.monotonic()))
        thread = threading.Thread(target=one, daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(3 * NORMAL_TIMEOUT)
    with lock:
        done = list(outcomes)
    attempts = len(threads)
    successes = sum(1 for ok, _, _ in done if ok)
    reasons = Counter(reason for ok, reason, _ in done if not ok)
    if attempts > len(done):
        reasons["no answer at all"] += attempts - len(done)
    return successes, attempts, reasons, [ms for ok, _, ms in done if ok]


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def slowhttptest_summary(text: str) -> str:
    """slowhttptest's own view: the most connections it held at once, and why it stopped."""
    text = ANSI.sub("", text)
    connected = [int(n) for n in re.findall(r"connected:\s+(\d+)", text)]
    closed = [int(n) for n in re.findall(r"closed:\s+(\d+)", text)]
    available = re.findall(r"service available:\s+(\w+)", text)
    ended = re.findall(r"Exit status:\s*(.+)", text)
    if not connected:
        return "slowhttptest printed no status: " + " ".join(text.split())[-300:]
    probe = "down at times" if "NO" in available else "up"
    return (f"slowhttptest: {max(connected):,} connections held at most, {closed[-1]:,} closed "
            f"by the end, its probe saw the service {probe}; "
            f"{ended[-1].strip() if ended else 'stopped by this script'}")


def one_attack(procs: Processes, attack: tuple, target: str, port: int, pid: int,
               ramp: float, window: float) -> tuple[str, list[str], float]:
    """Run one attack against one target; the normal client measures after the ramp-up."""
    name, _, args, path = attack
    notes: list[str] = []
    sampler = Sampler(pid)
    flood_ = tool = tool_log = None
    try:
        if args is None:
            flood_ = IdleFlood(port, IDLE_CONNECTIONS)
        else:
            tool_log = tempfile.TemporaryFile("w+")
            tool = procs.launch(["slowhttptest", *args, "-l", str(int(ramp + window + 5)),
                                 "-u", f"http://127.0.0.1:{port}{path}"], tool_log, group=True)
        time.sleep(ramp)
        successes, attempts, reasons, times = normal_requests(port, window)
    finally:
        if flood_ is not None:
            notes.append(flood_.stop())
        if tool is not None:
            procs.stop(tool, signal.SIGINT)  # on SIGTERM it would lose its buffered output
            tool_log.seek(0)  # type: ignore[union-attr]
            notes.append(slowhttptest_summary(tool_log.read()))  # type: ignore[union-attr]
            tool_log.close()  # type: ignore[union-attr]
        usage = sampler.stop()
    share = 100 * successes / max(attempts, 1)
    cell = f"served {successes} of {attempts} ({share:.0f} %)"
    failed = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
    latency = (f"p50 {pct(times, 50):.0f} ms, max {max(times):.0f} ms" if times else "none served")
    notes.insert(0, f"failures: {failed or 'none'}; served ones: {latency}")
    notes.append(usage)
    print(f"  {name} / {target}: {cell}\n      " + "\n      ".join(notes), flush=True)
    return cell, notes, share


def proxy_version(path: str) -> str:
    """Which llm_proxy.py was measured: its SHA-256 and how it stands against git's HEAD."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--",
                                  "llm_proxy.py"], timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        head, changed = "", False
    where = (f"git HEAD {head}{' with uncommitted changes' if changed else ', unchanged'}"
             if head else "not in git")
    return f"llm_proxy.py measured: sha256 {digest}..., {where}"


def slow(window: float) -> bool:
    print(f"\nslow: slow-client attacks against the proxy and nginx, a normal request every "
          f"{NORMAL_EVERY} s for {window:.0f} s during each")
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        return verdict(False, "nginx is not installed (apt-get install nginx)")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    tool = shutil.which("slowhttptest")
    general = [raise_nofile()]
    load_before = os.getloadavg()
    procs = Processes()
    tmp = tempfile.mkdtemp(prefix="reliability-slow-")
    os.chmod(tmp, 0o755)  # nginx's worker runs as nobody when started by root

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # so that SIGTERM too stops every process started here
    previous = signal.signal(signal.SIGTERM, terminate)
    rows: list[tuple[str, str, str]] = []
    details: list[str] = []
    ok = True
    try:
        # the proxy runs from a copy taken now, so that every attack meets the same code even if
        # llm_proxy.py is edited during the run; the note says which code that was
        proxy_copy = os.path.join(tmp, "llm_proxy.py")
        shutil.copyfile(PROXY, proxy_copy)
        general.append(proxy_version(proxy_copy))
        up_log = tempfile.TemporaryFile("w+")
        up_port = free_port()
        upstream = procs.launch([sys.executable, os.path.abspath(__file__), "--serve-upstream",
                                 str(up_port)], up_log)
        wait_ready(upstream, up_log, up_port, "ready")
        for attack in SLOW_ATTACKS:
            name, label, args, _ = attack
            if args is not None and tool is None:
                rows.append((label, "skipped", "skipped"))
                details.append(f"{name}: skipped, slowhttptest is not installed "
                               "(apt-get install slowhttptest)")
                continue
            # ramp-up: until slowhttptest has opened all its connections (-c / -r), plus 1 s
            ramp = 3.0 if args is None else int(args[args.index("-c") + 1]) / int(
                args[args.index("-r") + 1]) + 1
            cells = {}
            for target in ("proxy", "nginx"):
                log = tempfile.TemporaryFile("w+")
                port = free_port()
                if target == "proxy":
                    proc = procs.launch([sys.executable, proxy_copy], log, {
                        "HOST": "127.0.0.1", "PORT": str(port),
                        "BASE_API_URL": f"http://127.0.0.1:{up_port}/v1",
                        "MAX_TOKENS": "1000000000", "REFILL_TOKENS": "1000000000"})
                    wait_ready(proc, log, port, "listening on")
                else:
                    conf = os.path.join(tmp, "nginx.conf")
                    with open(conf, "w") as f:
                        f.write(NGINX_CONF.format(tmp=tmp, up_port=up_port, port=port))
                    proc = procs.launch([nginx, "-p", tmp, "-c", conf, "-e",
                                         os.path.join(tmp, "error.log")], log, group=True)
                    wait_ready(proc, log, port, None)
                try:
                    for check_path, least in (("/v1/models", len(MODELS)), (None, 1)):
                        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                        if check_path:
                            conn.request("GET", check_path)
                        else:
                            conn.request("POST", "/v1/chat/completions", json.dumps(CHAT),
                                         {"Content-Type": "application/json"})
                        resp = conn.getresponse()
                        data = resp.read()
                        conn.close()
                        if resp.status != 200 or len(data) < least:
                            raise RuntimeError(f"{target} answers {check_path or 'a chat'} with "
                                               f"{resp.status}, {len(data)} bytes")
                    cell, notes, share = one_attack(procs, attack, target, port, proc.pid, ramp,
                                                    window)
                finally:
                    procs.stop(proc)
                    log.close()
                cells[target] = cell
                details.append(f"{name}, {target}: " + "; ".join(notes))
                if target == "proxy":
                    ok &= share >= 95
                time.sleep(1)
            rows.append((label, cells["proxy"], cells["nginx"]))
    finally:
        signal.signal(signal.SIGTERM, previous)
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    print(f"\n  | attack (a normal request every {NORMAL_EVERY} s, {NORMAL_TIMEOUT:.0f} s timeout, "
          f"{window:.0f} s) | proxy | nginx |")
    print("  |---|---|---|")
    for label, proxy_cell, nginx_cell in rows:
        print(f"  | {label} | {proxy_cell} | {nginx_cell} |")
    print()
    general.append(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after, "
                   f"{os.cpu_count()} CPUs (other work on the machine shows up here)")
    general.append("each target is started fresh for each attack (the proxy with its defaults, "
                   "MAX_CONNECTIONS 1024, and a bucket nothing empties; nginx 1.22 defaults, "
                   "1 worker, 4,096 worker_connections, proxy_buffering off), both in front of "
                   "the same fake upstream; the normal requests start after the attack's ramp-up;"
                   " nginx's RSS and threads are its master's and worker's together")
    if any(row[0] == SLOW_ATTACKS[-1][1] and row[1] != "skipped" for row in rows):
        general.append("slow read on loopback: the kernel's send buffer (autotuned large with "
                       "loopback's 64 KB MSS) takes all three pipelined answers of a connection "
                       "(ss showed a Send-Q of 3 x the answer), so no server's write blocks; "
                       "what the attack holds is its 500 connections")
    for note in general + details:
        print(f"  - {note}")
    return verdict(ok, "the proxy served at least 95 % of normal requests during each attack")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=["soak", "flood", "fairness", "fuzz", "slow"],
                        help="soak flood fairness fuzz slow (default: all)")
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        serve_slow_upstream(args.serve_upstream)
        return 0
    quick = args.quick
    runs = {"soak": lambda: soak(15 if quick else 60),
            "flood": lambda: flood(20_000 if quick else 100_000),
            "fairness": lambda: fairness(5 if quick else 20),
            "fuzz": lambda: fuzz(15 if quick else 60),
            "slow": lambda: slow(8 if quick else 30)}
    unknown = [part for part in args.parts if part not in runs]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r}: choose from {' '.join(runs)}")
    ok = True
    for part in args.parts:
        ok &= runs[part]()
    print("\nall passed" if ok else "\nsome checks failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
