"""Hostile and careless clients, upstream faults, the fair queue."""

from __future__ import annotations

import json
import socket
import threading
import time


from tests.support import (
    CLIENT_KEY, ProxyTestCase, WAIT, open_fds, thread_stacks, wait_until)


class HardeningTests(ProxyTestCase):
    """Client timeouts, size limits, connection caps, framing: what a hostile client meets."""

    def connect(self, proxy=None):
        sock = socket.create_connection(("127.0.0.1", (proxy or self.proxy).server_address[1]),
                                        timeout=WAIT)
        self.addCleanup(sock.close)
        return sock

    def read_all(self, sock):
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def test_answers_to_a_client_that_stopped_reading_are_logged_as_they_went(self):
        """Pipelined requests (local answers, errors, OPTIONS) from a client that never reads:
        once the proxy's writes time out, each request is logged with what the client really
        got (499, client closed), nothing escapes the error boundary, the proxy keeps serving."""
        self.restart(keepalive_timeout=1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", self.proxy.server_address[1]))
        self.addCleanup(sock.close)
        sock.settimeout(WAIT)
        requests = (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
                    b"OPTIONS /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
                    b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n") * 20000
        try:
            sock.sendall(requests)
        except OSError:
            pass  # the proxy gave up on this client and closed the connection
        self.assertTrue(self.log.wait_for(lambda text: " 499 " in text))
        self.assertTrue(wait_until(lambda: self.proxy.requests_in_flight == 0))
        log = self.log.getvalue()
        self.assertNotIn("error:", log)
        self.assertNotIn("ClientGone", log)
        self.assertRegex(log, r'" 499 cost=- remaining=- [\d.]+ms \(client closed\)')
        self.assertEqual(self.chat()[0], 200)

    def test_slow_headers_are_cut_off(self):
        self.restart(client_header_timeout=1)
        sock = self.connect()
        stop = threading.Event()

        def trickle():  # a byte every 0.2 s: each read succeeds, the whole never arrives
            for byte in b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
                if stop.wait(0.2):
                    return
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    return
        thread = threading.Thread(target=trickle)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(stop.set)
        started = time.monotonic()
        self.assertEqual(self.read_all(sock), b"")  # closed, well before the trickle ends
        self.assertLess(time.monotonic() - started, 20)
        self.assertEqual(self.upstream.requests, [])

    def test_slow_body_gets_408_and_no_charge(self):
        self.restart(client_body_timeout=1)
        sock = self.connect()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + CLIENT_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"model\"")
        answer = self.read_all(sock)
        self.assertIn(b" 408 ", answer.split(b"\r\n")[0])
        self.assertIn(b'"error"', answer)
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.remaining(), 10)

    def test_idle_keep_alive_connections_are_closed(self):
        self.restart(keepalive_timeout=1)
        sock = self.connect()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        self.assertIn(b" 200 ", first)
        self.assertEqual(self.read_all(sock), b"")

    def test_size_limits(self):
        self.restart(max_header_bytes=4096)
        answer = self.raw(b"GET /v1/" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b" 414 ", answer.split(b"\r\n")[0])
        answer = self.raw(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"b" * 5000 + b"\r\n\r\n")
        self.assertIn(b" 431 ", answer.split(b"\r\n")[0])
        sock = self.connect()

        def flood():  # a 10 MB header: the proxy stops reading long before the end
            try:
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"h" * 10_000_000)
            except OSError:
                pass
        thread = threading.Thread(target=flood)
        thread.start()
        answer = self.read_all(sock)
        thread.join(WAIT)
        self.assertIn(b" 431 ", answer.split(b"\r\n")[0])
        self.assertEqual(self.chat()[0], 200)

    def held(self, count):
        """`count` connections each kept alive after one request (idle at the cap)."""
        socks = []
        for _ in range(count):
            sock = self.connect()
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertIn(b" 200 ", sock.recv(65536))
            socks.append(sock)
        return socks

    def test_at_the_cap_the_oldest_idle_connection_makes_room(self):
        """A flood of connections that send nothing cannot keep a real client out: at the cap,
        the oldest idle connection is closed, as nginx does."""
        self.restart(max_connections=2)
        oldest, newer = self.held(2)
        # (a connection is idle once its thread is back waiting for the next request)
        self.assertTrue(wait_until(lambda: self.proxy.cap.states() == ["idle", "idle"]))
        sock = self.connect()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertIn(b" 200 ", self.read_all(sock).split(b"\r\n")[0])
        self.assertEqual(self.read_all(oldest), b"")  # closed to make room
        newer.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b" 200 ", newer.recv(65536))

    def test_at_the_cap_a_stalled_request_makes_room(self):
        self.restart(max_connections=2)
        slow = []
        for _ in range(2):  # slowloris: a request head that never ends
            sock = self.connect()
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: a")
            slow.append(sock)
        # (both marked reading before the clock moves: a mark after it would be a fresh stall)
        self.assertTrue(wait_until(lambda: self.proxy.cap.states() == ["reading", "reading"]))
        self.clock.advance(2)  # both have been reading their request head for 2 s
        self.assertEqual(self.chat()[0], 200)
        self.assertEqual(self.read_all(slow[0]), b"")

    def test_at_the_cap_with_every_connection_busy_a_newcomer_gets_503_at_once(self):
        self.restart(max_connections=2)
        for _ in range(2):
            self.open_stream(scenario="gate")[1].readline()  # busy: streams being generated
        started = time.monotonic()
        status, _, body = self.chat()
        self.assert_openai_error(status, body, 503, "too_many_connections")
        self.assertLess(time.monotonic() - started, 5)
        self.upstream.release.set()

    def test_a_new_connection_has_the_header_timeout_to_start_its_request(self):
        self.restart(client_header_timeout=1, keepalive_timeout=60)
        sock = self.connect()
        started = time.monotonic()
        self.assertEqual(self.read_all(sock), b"")  # sent nothing: closed
        self.assertLess(time.monotonic() - started, 30)

    def test_a_slow_reader_is_cut_after_the_send_timeout(self):
        """A write that has to wait must end within SEND_TIMEOUT, however the client trickles:
        it cannot hold a thread and a slot for as long as it likes."""
        self.restart(send_timeout=1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", self.proxy.server_address[1]))
        self.addCleanup(sock.close)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Fake-Scenario: big\r\n\r\n")
        sock.recv(1000)  # the answer has begun, and is then read no further
        self.assertTrue(self.log.wait_for(lambda text: "(client closed)" in text, WAIT))
        self.assertTrue(wait_until(lambda: self.proxy.connections == 0))

    def test_hop_by_hop_headers_are_not_relayed(self):
        status, headers, _ = self.request("GET", "/v1/models",
                                          headers={"X-Fake-Scenario": "hop"})
        self.assertEqual(headers["x-kept"], "yes")
        for name in ("x-up-private", "keep-alive", "upgrade"):
            self.assertNotIn(name, headers)
        self.assertNotEqual(headers.get("connection"), "X-Up-Private")

    def test_expect_100_continue_is_answered_not_forwarded(self):
        sock = self.connect()
        body = json.dumps({"model": "m", "messages": []}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        self.assertTrue(sock.recv(65536).startswith(b"HTTP/1.1 100 Continue"))
        sock.sendall(body)
        self.assertIn(b" 200 ", self.read_all(sock).split(b"\r\n")[0])
        self.assertNotIn("expect", {k.lower() for k in self.upstream.requests[0][2]})

    def test_100_continue_only_once_the_key_and_size_are_accepted(self):
        """A client told 401 or 413 never sends its body: that is what Expect is for."""
        self.restart(proxy_api_keys=("sk-good",), max_body_bytes=1000)
        for key, length, status in ((b"sk-bad", 10, b" 401 "), (b"sk-good", 5000, b" 413 ")):
            with self.subTest(status=status):
                sock = self.connect()
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: "
                             b"100-continue\r\nAuthorization: Bearer " + key +
                             b"\r\nContent-Length: %d\r\n\r\n" % length)
                answer = self.read_all(sock)
                self.assertIn(status, answer.split(b"\r\n")[0])
                self.assertNotIn(b"100 Continue", answer)
        self.assertEqual(self.upstream.requests, [])

    def test_framing_is_checked_on_every_route(self):
        """Two Content-Lengths on a route that reads no body made that body a second request:
        the smuggled GET /v1/models reached the upstream. Now it is refused, wherever it goes."""
        smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
        for line in (b"GET /health", b"GET /metrics", b"GET /nope", b"OPTIONS /v1/models",
                     b"POST /v1/chat/completions"):
            with self.subTest(line=line):
                answer = self.raw(line + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                                  b"Content-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled))
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:40])
                self.assertEqual(answer.count(b"HTTP/1.1 "), 1)  # and the connection closed
        self.assertEqual(self.upstream.requests, [])

    def test_only_ascii_digits_in_numbers(self):
        for request in ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                        "Content-Length: \u00b2\r\n\r\nab",
                        "GET /health HTTP/1.\u00b9\r\nHost: x\r\n\r\n",
                        "GET /health HTTP/\u0661.1\r\nHost: x\r\n\r\n"):
            with self.subTest(request=request):
                answer = self.raw(request.encode("utf-8"))
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:40])
        self.assertNotIn("error:", self.log.getvalue())

    def test_http_1_1_needs_exactly_one_host(self):
        for headers, status in ((b"", b" 400 "), (b"Host: a\r\nHost: b\r\n", b" 400 "),
                                (b"Host: a\r\n", b" 200 ")):
            with self.subTest(headers=headers):
                answer = self.raw(b"GET /health HTTP/1.1\r\n" + headers +
                                  b"Connection: close\r\n\r\n")
                self.assertIn(status, answer.split(b"\r\n")[0])
        self.assertIn(b" 200 ", self.raw(b"GET /health HTTP/1.0\r\n\r\n").split(b"\r\n")[0])

    def test_invalid_upstream_json_is_passed_through(self):
        status, _, body = self.chat(headers={"X-Fake-Scenario": "garbage"})
        self.assertEqual((status, body), (200, b'{"id": "chatcmpl-x", "choices": ['))

    def test_hostile_clients_leave_nothing_behind(self):
        """Every client fault: a clear error where one can still be sent, no traceback, no
        thread or socket left over, no charge, and the next request works."""
        self.chat()  # warm up: the upstream pool holds its connection from here on
        self.assertTrue(self.log.wait_for(lambda text: " cost=1 " in text))
        threads, fds = threading.active_count(), open_fds()
        port = self.proxy.server_address[1]
        deep = b"[" * 200_000 + b"]" * 200_000
        cases = [
            (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n", None),
            (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"mo", None),
            (b"\x00\xff garbage \x16\x03\r\n\r\n", 400),
            (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
            (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n", 400),
            (b"GET /v1/models\r\n", 400),
            (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n\xff\xfe\xfd{", 400),
            (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
             % (len(deep), deep), 400),
            (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n"
             b'{"messages": "' + b"x" * 65536, 413),
        ]
        for data, expected in cases:
            with self.subTest(data=data[:40]):
                sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
                try:
                    sock.sendall(data)
                except OSError:
                    pass
                if expected is None:  # the client goes away before its body is complete
                    sock.close()
                    continue
                answer = self.read_all(sock) if b"Connection" in data else sock.recv(65536)
                sock.close()
                self.assertIn(b" %d " % expected, answer.split(b"\r\n")[0])
                self.assertIn(b'"error"', answer)
        self.assertTrue(wait_until(lambda: threading.active_count() <= threads),
                        threading.enumerate())
        self.assertTrue(wait_until(lambda: open_fds() <= fds))
        self.assertEqual(self.remaining(), 9)
        self.assertEqual(len(self.upstream.requests), 1)
        self.assertEqual(self.chat()[0], 200)
        self.assertNotIn("Traceback", self.log.getvalue())


    def test_upstream_faults_leave_nothing_behind(self):
        self.restart(read_timeout=0.5)
        self.chat()
        self.assertTrue(self.log.wait_for(lambda text: " cost=1 " in text))
        connections = self.proxy.connections  # the proxy's handler threads
        outcomes = {}
        for scenario, stream in (("hang", False), ("stall", True), ("reset", True),
                                 ("close", False), ("garbage", False), ("html-500", False),
                                 ("status-503", False)):
            status, _, body = self.chat(stream=stream, headers={"X-Fake-Scenario": scenario,
                                                                "Connection": "close"})
            outcomes[scenario] = status
            if stream:
                self.assertIn(b'data: {"error": {', body)
        self.assertEqual(outcomes, {"hang": 504, "stall": 200, "reset": 200, "close": 502,
                                    "garbage": 200, "html-500": 500, "status-503": 503})
        self.upstream.stop.set()  # let the fake's own stuck handlers go
        # every handler thread of the proxy ended; no broken upstream connection was kept
        self.assertTrue(wait_until(lambda: self.proxy.connections <= connections),
                        thread_stacks())
        self.assertTrue(all(conn.sock.fileno() != -1 and not conn.has_unread()
                            for conn in self.proxy.pool.idle()))
        # refunded only the 503 (the model never ran); every request that was sent is charged
        self.assertEqual(self.remaining(), 3)
        self.assertEqual(self.chat()[0], 200)
        self.assertNotIn("Traceback", self.log.getvalue())


class FairQueueTests(ProxyTestCase):
    """MAX_UPSTREAM_CONCURRENCY: a fair queue in front of a small upstream."""

    def queue(self, key, model, results):
        def send():
            results.append((model, self.chat(key=key, model=model)[0]))
        thread = threading.Thread(target=send)
        thread.start()
        self.addCleanup(thread.join, WAIT)
        return thread

    def waiting(self):
        return self.proxy.gate.waiting()

    def order_with(self, fair):
        self.restart(max_upstream_concurrency=1, fair_queue=fair)
        held = self.hold_stream("key-a")
        results = []
        threads = []
        for index, (key, model) in enumerate((("key-a", "a2"), ("key-a", "a3"),
                                              ("key-a", "a4"), ("key-b", "b1"))):
            threads.append(self.queue(key, model, results))
            self.assertTrue(wait_until(lambda: self.waiting() == index + 1))
        self.upstream.release.set()
        held.read()
        for thread in threads:
            thread.join(WAIT)
        self.assertEqual([status for _, status in results], [200] * 4)
        return [json.loads(r[3])["model"] for r in self.upstream.requests]

    def test_a_freed_slot_goes_to_the_key_with_fewest_in_flight(self):
        self.assertEqual(self.order_with(fair=True), ["hold", "b1", "a2", "a3", "a4"])

    def test_fifo_when_fairness_is_off(self):
        self.assertEqual(self.order_with(fair=False), ["hold", "a2", "a3", "a4", "b1"])

    def test_waiting_past_the_timeout_is_503_and_refunded(self):
        self.restart(max_upstream_concurrency=1, upstream_queue_timeout=0.5)
        self.hold_stream("key-a")
        status, headers, body = self.chat(key="key-b")
        self.assert_openai_error(status, body, 503, "upstream_busy")
        self.assertEqual(headers["retry-after"], "1")
        self.assertEqual(self.remaining("key-b"), 10)
        self.upstream.release.set()

    def test_a_queued_client_that_leaves_is_not_charged(self):
        self.restart(max_upstream_concurrency=1)
        self.hold_stream("key-a")
        sock = socket.create_connection(("127.0.0.1", self.proxy.server_address[1]),
                                        timeout=WAIT)
        body = json.dumps({"model": "left", "messages": []}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-b\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.assertTrue(wait_until(lambda: self.waiting() == 1))
        sock.close()
        self.assertTrue(wait_until(lambda: self.waiting() == 0))
        self.assertTrue(self.log.wait_for(lambda text: "client closed" in text))
        self.assertEqual(self.remaining("key-b"), 10)
        self.upstream.release.set()
        self.assertNotIn("left", [json.loads(r[3])["model"] for r in self.upstream.requests])

    def test_per_key_concurrency_cap(self):
        for mode, expected in (("message", 200), ("429", 429)):
            with self.subTest(mode=mode):
                self.upstream.release.clear()
                self.restart(max_concurrent_per_key=1, limit_response=mode)
                held = self.hold_stream("key-a")
                status, _, body = self.chat(key="key-a")
                self.assertEqual(status, expected)
                if mode == "message":
                    self.assertIn("too many requests at once",
                                  json.loads(body)["choices"][0]["message"]["content"])
                else:
                    self.assert_openai_error(status, body, 429, "concurrency_limit_exceeded")
                self.assertEqual(self.chat(key="key-b")[0], 200)  # other keys are not held up
                self.upstream.release.set()
                held.read()
                self.assertEqual(self.remaining("key-a"), 9)  # the held stream only
