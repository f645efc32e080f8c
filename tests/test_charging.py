"""What a request costs: the limit answers, errors and refunds, usage mode."""

from __future__ import annotations

import http.client
import json
import socket
import llm_proxy

from tests.support import (
    CLIENT_KEY, ProxyTestCase, WAIT, at_once, free_port, sse_events,
    usage_of)


class LimitTests(ProxyTestCase):
    def drain(self, key=CLIENT_KEY):
        for _ in range(10):
            self.assertEqual(self.chat(key=key)[0], 200)

    def test_message_answer_non_stream_chat(self):
        self.drain()
        status, headers, body = self.chat(model="my-model")
        self.assertEqual(status, 200)
        answer = json.loads(body)
        self.assertEqual(answer["object"], "chat.completion")
        self.assertEqual(answer["model"], "my-model")
        self.assertEqual(answer["choices"][0]["message"],
                         {"role": "assistant", "content": "limit reached, wait 5 min"})
        self.assertEqual(answer["choices"][0]["finish_reason"], "stop")
        self.assertEqual(answer["usage"], {"prompt_tokens": 0, "completion_tokens": 0,
                                           "total_tokens": 0})
        self.assertEqual(headers["retry-after"], "300")
        self.assertEqual(headers["x-ratelimit-remaining"], "0")
        self.assertEqual(headers["x-ratelimit-reset-seconds"], "300")
        self.assertEqual(len(self.upstream.requests), 10)

    def test_message_answer_non_stream_completion(self):
        self.drain()
        self.clock.advance(250)
        status, _, body = self.request("POST", "/v1/completions", {"model": "m", "prompt": "x"})
        answer = json.loads(body)
        self.assertEqual(answer["object"], "text_completion")
        self.assertEqual(answer["choices"][0]["text"], "limit reached, wait 50 s")

    def test_message_answer_stream_chat(self):
        self.drain()
        for include_usage in (False, True):
            with self.subTest(include_usage=include_usage):
                extra = {"stream_options": {"include_usage": True}} if include_usage else {}
                status, headers, body = self.chat(stream=True, **extra)
                self.assertEqual(status, 200)
                self.assertTrue(headers["content-type"].startswith("text/event-stream"))
                events = sse_events(body)
                self.assertEqual(events[-1], b"[DONE]")
                chunks = [json.loads(e) for e in events[:-1]]
                self.assertTrue(all(c["object"] == "chat.completion.chunk" for c in chunks))
                self.assertEqual(len({c["id"] for c in chunks}), 1)
                self.assertEqual(chunks[0]["choices"][0]["delta"]["role"], "assistant")
                self.assertEqual(chunks[1]["choices"][0]["delta"]["content"],
                                 "limit reached, wait 5 min")
                self.assertEqual(chunks[2]["choices"][0]["finish_reason"], "stop")
                if include_usage:
                    self.assertEqual(len(chunks), 4)
                    self.assertEqual(chunks[3]["choices"], [])
                    self.assertEqual(chunks[3]["usage"]["total_tokens"], 0)
                    self.assertTrue(all(c["usage"] is None for c in chunks[:3]))
                else:
                    self.assertEqual(len(chunks), 3)
                    self.assertTrue(all("usage" not in c for c in chunks))

    def test_message_answer_stream_completion(self):
        self.drain()
        status, _, body = self.request("POST", "/v1/completions",
                                       {"model": "m", "prompt": "x", "stream": True})
        chunks = [json.loads(e) for e in sse_events(body)[:-1]]
        self.assertTrue(all(c["object"] == "text_completion" for c in chunks))
        self.assertEqual(chunks[0]["choices"][0]["text"], "limit reached, wait 5 min")
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")

    def test_429_mode(self):
        self.restart(limit_response="429")
        self.drain()
        status, headers, body = self.chat()
        error = self.assert_openai_error(status, body, 429, "rate_limit_exceeded")
        self.assertEqual(error["type"], "requests")
        self.assertIn("300s", error["message"])
        self.assertEqual(headers["retry-after"], "300")
        self.assertEqual(headers["retry-after-ms"], "300000")
        self.assertEqual(headers["x-should-retry"], "false")  # longer than the SDK would wait
        self.clock.advance(250)
        _, headers, _ = self.chat()
        self.assertEqual(headers["retry-after"], "50")
        self.assertNotIn("x-should-retry", headers)

    def test_refill_admits_again(self):
        self.drain()
        self.clock.advance(300)
        self.assertEqual(self.chat()[1]["x-ratelimit-remaining"], "1")
        self.assertEqual(self.chat()[1]["x-ratelimit-remaining"], "0")
        self.assertEqual(len(self.upstream.requests), 12)

    def test_keys_have_their_own_buckets_and_keyless_callers_share_their_ip(self):
        self.drain("key-a")
        self.assertEqual(self.chat(key="key-b")[1]["x-ratelimit-remaining"], "9")
        self.assertEqual(self.chat(key=None)[1]["x-ratelimit-remaining"], "9")
        self.assertEqual(self.chat(key=None)[1]["x-ratelimit-remaining"], "8")

    def test_forwarded_for_is_trusted_only_when_configured(self):
        for trust, expected in ((False, "8"), (True, "9")):
            with self.subTest(trust=trust):
                self.restart(trust_forwarded_for=trust)
                self.chat(key=None, headers={"X-Forwarded-For": "10.0.0.1"})
                _, headers, _ = self.chat(key=None, headers={"X-Forwarded-For": "10.0.0.2"})
                self.assertEqual(headers["x-ratelimit-remaining"], expected)

    def test_concurrent_requests_admit_exactly_the_balance(self):
        results = []
        at_once(30, lambda _: results.append(self.chat()[2]))
        limited = [b for b in results if b"limit reached" in b]
        self.assertEqual(len(results), 30)
        self.assertEqual(len(limited), 20)
        self.assertEqual(len(self.upstream.requests), 10)

    def test_estimate_mode_and_a_cost_that_can_never_be_admitted(self):
        self.restart(token_cost_mode="estimate", max_tokens=100, response_token_reserve=50)
        _, headers, _ = self.chat(max_tokens=16)  # "user hi" = 7 bytes -> 7, + 16
        self.assertEqual(headers["x-ratelimit-remaining"], str(100 - 23))
        status, _, body = self.chat()  # 7 + 50 = 57 > 77? no: admitted
        self.assertEqual(status, 200)
        status, _, body = self.chat(max_tokens=500)  # message mode: said as the limit
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["choices"][0]["message"]["content"],
                         "limit reached: this request needs 507 tokens but a bucket holds at "
                         "most 100; start a new conversation or ask for a shorter answer")
        self.assertEqual(self.remaining(), 100 - 23 - 57)  # nothing taken for it
        self.restart(token_cost_mode="estimate", max_tokens=100, response_token_reserve=50,
                     limit_response="429")
        status, _, body = self.chat(max_tokens=500)
        self.assert_openai_error(status, body, 400, "request_exceeds_bucket")
        self.assertIn("can never be admitted", json.loads(body)["error"]["message"])
        self.assertEqual(self.remaining(), 100)
        self.assertEqual(len(self.upstream.requests), 2)


class ErrorTests(ProxyTestCase):
    def test_invalid_json_and_non_object_bodies(self):
        for body in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
            with self.subTest(body=body):
                status, _, answer = self.request("POST", "/v1/chat/completions", body)
                self.assert_openai_error(status, answer, 400)
        deep = b"[" * 100_000 + b"]" * 100_000
        status, _, answer = self.request("POST", "/v1/chat/completions", deep)
        self.assert_openai_error(status, answer, 400)
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.remaining(), 10)

    def test_body_over_the_limit_is_refused_from_content_length(self):
        self.restart(max_body_bytes=1000)
        with socket.create_connection(("127.0.0.1", self.proxy.server_address[1]),
                                      timeout=WAIT) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: 5000000\r\n\r\n")  # no body is sent at all
            answer = s.recv(65536)
        status = int(answer.split(b" ")[1])
        self.assert_openai_error(status, answer.partition(b"\r\n\r\n")[2], 413,
                                 "request_too_large")

    def test_unknown_or_missing_key(self):
        self.restart(proxy_api_keys=("good-key", "other-key"))
        for key in (None, "bad-key", "good-ke"):
            with self.subTest(key=key):
                for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                                     ("POST", "/v1/embeddings")):
                    status, headers, body = self.request(method, path, {"model": "m"}, key=key)
                    self.assert_openai_error(status, body, 401, "invalid_api_key")
                    self.assertEqual(headers["access-control-allow-origin"], "*")
        self.assertEqual(self.chat(key="good-key")[0], 200)
        self.assertEqual(len(self.upstream.requests), 1)

    def test_upstream_unreachable_is_502_and_not_charged(self):
        self.restart(base_api_url=f"http://127.0.0.1:{free_port()}/v1")
        status, _, body = self.chat()
        self.assert_openai_error(status, body, 502, "upstream_unreachable")
        self.assertEqual(self.remaining(), 10)

    def test_upstream_timeout_after_sending_is_504_and_charged(self):
        """A slow model with a big max_tokens is not free: the request reached it."""
        self.restart(read_timeout=0.5)
        status, _, body = self.chat(headers={"X-Fake-Scenario": "hang"})
        self.assert_openai_error(status, body, 504, "upstream_timeout")
        self.assertEqual(self.remaining(), 9)

    def test_upstream_errors_pass_through(self):
        """Passed through as they are; refunded only when the status says the model never ran
        (502, 503, 504, 529), charged otherwise (it may have run: a 500 mid-way)."""
        for scenario, status, charged in (("status-500", 500, True), ("status-503", 503, False),
                                          ("status-502", 502, False), ("status-504", 504, False),
                                          ("status-529", 529, False), ("status-429", 429, True),
                                          ("status-400", 400, True), ("html-500", 500, True)):
            with self.subTest(scenario=scenario):
                self.restart()
                got, headers, body = self.chat(headers={"X-Fake-Scenario": scenario})
                self.assertEqual(got, status)
                if scenario == "html-500":
                    self.assertEqual(body, b"<html>oops</html>")
                else:
                    self.assertEqual(json.loads(body)["error"]["message"],
                                     f"upstream says {status}")
                    self.assertEqual(headers["retry-after"], "7")
                self.assertEqual(self.remaining(), 9 if charged else 10)

    def test_upstream_closing_without_answer_is_502_and_charged(self):
        """The request was sent: the model may have run, so it is charged."""
        status, _, body = self.chat(headers={"X-Fake-Scenario": "close"})
        self.assert_openai_error(status, body, 502)
        self.assertEqual(self.remaining(), 9)

    def test_paths_outside_v1_are_404_and_never_forwarded(self):
        for path in ("/slots", "/props", "/v1/../slots", "/V1/chat/completions",
                     "/", "/v10/models"):
            with self.subTest(path=path):
                status, _, body = self.request("GET", path)
                self.assert_openai_error(status, body, 404)
        self.assertEqual(self.upstream.requests, [])

    def test_path_spellings_cannot_bypass_charging(self):
        spellings = ["/v1/chat/completions/", "//v1//chat/completions", "/v1/chat/%63ompletions",
                     "/v1/./chat/completions", "/v1/models/../chat/completions",
                     "/v1/chat/completions?stream=false", "/v1/chat/completions%2f"]
        for index, path in enumerate(spellings):
            with self.subTest(path=path):
                status, headers, _ = self.chat(path=path)
                self.assertEqual(status, 200)
                self.assertEqual(headers["x-ratelimit-remaining"], str(9 - index))
        forwarded = [p.partition("?")[0] for p in self.upstream.paths()]
        self.assertEqual(forwarded, ["/v1/chat/completions"] * len(spellings))

    def test_malformed_http_gets_400_and_the_server_keeps_serving(self):
        for data in (b"GARBAGE\r\n\r\n", b"GET /v1/models HTTP/9.9\r\n\r\n",
                     b"GET /v1/models\r\n", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n"):
            with self.subTest(data=data):
                answer = self.raw(data)
                head, _, body = answer.partition(b"\r\n\r\n")
                self.assertIn(int(head.split(b" ")[1]), (400, 505))
                self.assertIn(b'"error"', body)
        for length in (b"-5", b"abc", b"1, 2"):
            with self.subTest(length=length):
                answer = self.raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " +
                                  length + b"\r\n\r\n{}")
                self.assertEqual(int(answer.split(b" ")[1]), 400)
        answer = self.raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        self.assertEqual(int(answer.split(b" ")[1]), 400)
        for header in (b"X-Split: a\rInjected: b", b"Bad Name: x", b" folded", b"NoColon",
                       b"X-Nul: a\x00b"):
            with self.subTest(header=header):
                answer = self.raw(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n")
                self.assertEqual(int(answer.split(b" ")[1]), 400)
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.chat()[0], 200)
        self.assertNotIn("Traceback", self.log.getvalue())

    def test_unsupported_method_is_an_openai_error(self):
        status, _, body = self.request("TRACE", "/v1/models")
        self.assert_openai_error(status, body, 501)


class UsageModeTests(ProxyTestCase):
    """TOKEN_COST_MODE=usage: reserve the estimate, settle with the upstream's usage."""

    CAPACITY = 100_000

    def setUp(self):
        super().setUp()
        self.restart(token_cost_mode="usage", max_tokens=self.CAPACITY,
                     response_token_reserve=50)

    def charged(self, key=CLIENT_KEY):
        return self.CAPACITY - self.remaining(key)

    def settled(self, count=1):
        """Settlement happens after the last byte went out: wait for the access lines."""
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") >= count))

    def direct(self, path, body, scenario=""):
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream.server_address[1],
                                          timeout=WAIT)
        self.addCleanup(conn.close)
        conn.request("POST", path, json.dumps(body), {"X-Fake-Scenario": scenario})
        return conn.getresponse().read()

    def test_non_stream_is_settled_exactly(self):
        status, headers, body = self.chat(max_tokens=20)
        self.settled()
        reported = json.loads(body)["usage"]["total_tokens"]
        reserved = llm_proxy.estimate_cost(json.loads(self.upstream.requests[0][3]), 50)
        self.assertNotEqual(reported, reserved)
        # the head went out before the body could be read: it shows the reservation
        self.assertEqual(headers["x-ratelimit-remaining"], str(self.CAPACITY - reserved))
        self.assertEqual(self.charged(), reported)
        self.assertIn(f"cost={reported} ", self.log.getvalue())

    def test_stream_without_include_usage_is_asked_and_the_usage_chunk_stripped(self):
        for path in ("/v1/chat/completions", "/v1/completions"):
            with self.subTest(path=path):
                request = {"model": "m", "stream": True, "messages": [{"role": "user",
                           "content": "hi"}]} if "chat" in path else \
                    {"model": "m", "stream": True, "prompt": "hi", "stream_options": {}}
                before = self.charged()
                status, _, body = self.request("POST", path, request)
                self.settled(len(self.upstream.requests))
                sent = json.loads(self.upstream.requests[-1][3])
                # (and the counts so far on every chunk: llama.cpp's and vLLM's ways)
                self.assertEqual(sent["stream_options"], {"include_usage": True,
                                                          "continuous_usage_stats": True})
                self.assertEqual((sent["timings_per_token"], sent["return_progress"]),
                                 (True, True))
                self.assertEqual(self.charged() - before, self.upstream.reported[-1])
                self.assertEqual(body, self.direct(path, request))  # byte for byte

    def test_stream_with_include_usage_is_forwarded_untouched(self):
        request = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}],
                   "stream_options": {"include_usage": True}, "max_tokens": 40,
                   "max_completion_tokens": 40, "n_predict": 40}  # (every limit a server reads)
        _, _, body = self.request("POST", "/v1/chat/completions", request)
        self.settled()
        self.assertEqual(body, self.direct("/v1/chat/completions", request))
        self.assertEqual(self.upstream.requests[0][3], json.dumps(request).encode())
        self.assertIn(b'"choices": [], "usage": {', body)
        self.assertEqual(self.charged(), self.upstream.reported[0])

    def test_server_habits(self):
        for scenario, path in (("ollama", "/v1/completions"), ("llamacpp", "/v1/chat/completions"),
                               ("llamacpp", "/v1/completions")):
            with self.subTest(scenario=scenario, path=path):
                before, seen = self.charged(), len(self.upstream.requests)
                request = {"model": "m", "stream": True, "prompt": "hello there",
                           "messages": [{"role": "user", "content": "hello there"}]}
                _, _, body = self.request("POST", path, request,
                                          headers={"X-Fake-Scenario": scenario})
                self.settled(seen + 1)
                self.assertEqual(body, self.direct(path, request, scenario))
                self.assertEqual(self.charged() - before, self.upstream.reported[-1])

    def test_an_answer_without_the_usage_it_always_carries_keeps_its_reservation(self):
        """A plain answer always carries usage, and so does a stream asked for it: when it is
        missing, the answer cannot be metered and is never settled below its reservation."""
        for stream in (False, True):
            with self.subTest(stream=stream):
                before, seen = self.charged(), len(self.upstream.requests)
                _, headers, _ = self.chat(stream=stream, headers={"X-Fake-Scenario": "no-usage"},
                                          max_tokens=50)
                self.settled(seen + 1)
                reserved = self.CAPACITY - int(headers["x-ratelimit-remaining"]) - before
                self.assertEqual(self.charged() - before, reserved)
                sent = json.loads(self.upstream.requests[-1][3])
                self.assertEqual(reserved, llm_proxy.prompt_estimate(
                    {k: v for k, v in sent.items() if k != "stream_options"}) + 50)

    def test_client_disconnect_mid_stream_charges_the_prompt_and_what_was_generated(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=WAIT)
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Authorization": f"Bearer {CLIENT_KEY}", "X-Fake-Scenario": "gate2"})
        resp = conn.getresponse()
        self.assertIn(b'"role"', resp.readline())
        resp.readline()
        self.assertIn(b"Hello", resp.readline())  # then the upstream holds the rest
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        self.assertTrue(self.log.wait_for(lambda text: "client closed" in text))
        self.upstream.release.set()
        prompt = llm_proxy.prompt_estimate(body)
        self.assertEqual(self.charged(), prompt + 5)  # "Hello": 5 bytes, at most 5 tokens

    def test_failures(self):
        self.chat(headers={"X-Fake-Scenario": "status-503"})
        self.settled()
        self.assertEqual(self.charged(), 0)  # refunded whole
        self.restart(token_cost_mode="usage", max_tokens=self.CAPACITY, read_timeout=0.5,
                     response_token_reserve=50)
        self.chat(stream=True, headers={"X-Fake-Scenario": "stall"})
        self.assertTrue(self.log.wait_for(lambda text: "upstream broke off" in text))
        prompt = llm_proxy.prompt_estimate(json.loads(self.upstream.requests[-1][3]))
        self.assertEqual(self.charged(), prompt + 5)  # the prompt and "Hello"

    def test_upstream_refusing_stream_options_is_asked_again_without(self):
        status, _, body = self.chat(stream=True,
                                    headers={"X-Fake-Scenario": "reject-stream-options"})
        self.settled()
        self.assertEqual(status, 200)
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        first, second = (json.loads(r[3]) for r in self.upstream.requests)
        self.assertIn("stream_options", first)
        self.assertNotIn("stream_options", second)
        self.assertEqual(self.charged(), llm_proxy.prompt_estimate(second) + 11)  # "Hello world"
        # a 400 about something else reaches the client unchanged
        status, _, body = self.chat(stream=True, headers={"X-Fake-Scenario": "status-400"})
        self.assertEqual((status, json.loads(body)["error"]["message"]), (400, "upstream says 400"))

    def test_embeddings_are_charged_in_usage_and_estimate_modes(self):
        request = {"model": "e", "input": ["some words to embed", "and more"]}
        _, headers, _ = self.request("POST", "/v1/embeddings", request)
        self.settled()
        self.assertEqual(self.charged(), self.upstream.reported[0])
        self.restart(token_cost_mode="estimate", max_tokens=1000)
        _, headers, _ = self.request("POST", "/v1/embeddings", request)
        self.assertEqual(headers["x-ratelimit-remaining"],
                         str(1000 - llm_proxy.prompt_estimate(request)))

    def test_responses_route(self):
        request = {"model": "m", "input": "hello", "max_output_tokens": 30}
        _, headers, body = self.request("POST", "/v1/responses", request)
        self.settled()
        self.assertEqual(headers["x-ratelimit-remaining"],
                         str(self.CAPACITY - llm_proxy.estimate_cost(request, 50)))
        self.assertEqual(self.charged(), json.loads(body)["usage"]["total_tokens"])
        before = self.charged()
        _, _, body = self.request("POST", "/v1/responses", {**request, "stream": True})
        self.settled(2)
        self.assertIn(b"event: response.completed", body)
        self.assertEqual(self.charged() - before, self.upstream.reported[-1])
        # limited: a response holding the limit text (tests/test_responses.py has the rest)
        self.restart(token_cost_mode="usage", max_tokens=40, response_token_reserve=50)
        status, _, body = self.request("POST", "/v1/responses", request)
        self.assertEqual(status, 200)
        status, _, body = self.request("POST", "/v1/responses", request)
        self.assertEqual(status, 200)
        self.assertIn("limit reached, wait", json.loads(body)["output"][0]["content"][0]["text"])

    def test_debt_shows_in_the_limit_message(self):
        # each reserves 8 and settles at 18 (the fake's prompt is 16): 64, 46, 28, 10, -8
        self.restart(token_cost_mode="usage", max_tokens=64, response_token_reserve=1)
        self.chat(max_tokens=1)
        self.settled()
        self.remaining()
        self.restart(token_cost_mode="usage", max_tokens=64, response_token_reserve=1)
        spent = 0
        while self.remaining() > 0:
            self.chat(max_tokens=1)
            spent += 1
            self.settled(spent)
        debt = -self.remaining()
        self.assertGreater(debt, 0)
        _, headers, body = self.chat(max_tokens=1)
        steps = -(-(debt + 8) // 2)  # refills of 2 tokens until the 8-token reservation fits
        self.assertEqual(headers["retry-after"], str(steps * 300))

    def test_counters_in_health(self):
        self.restart(token_cost_mode="usage", max_tokens=200, response_token_reserve=50)
        self.chat()
        self.chat(stream=True)
        self.settled(2)
        for _ in range(3):
            self.chat(max_tokens=150)
        self.settled(5)
        usage = json.loads(self.request("GET", "/health")[2])["usage"]
        prompt = sum(usage_of("/v1/chat/completions", json.loads(r[3]))["prompt_tokens"]
                     for r in self.upstream.requests)
        self.assertEqual(usage["prompt_tokens"], prompt)
        self.assertEqual(usage["completion_tokens"], 2 * (len(self.upstream.requests) - 1) + 3)
        self.assertEqual(usage["requests"], 5)
        self.assertEqual(usage["limited_requests"], 5 - len(self.upstream.requests))
        self.assertGreater(usage["limited_requests"], 0)

    def test_a_thousand_mixed_requests_are_charged_exactly(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=WAIT)
        self.addCleanup(conn.close)
        for i in range(1000):
            path = ("/v1/chat/completions", "/v1/completions")[i % 2]
            stream = i % 3 == 0
            words = " ".join(["word"] * (i % 37))
            body = {"model": "m", "stream": stream, "max_tokens": 10 + i % 50,
                    "messages": [{"role": "user", "content": words}], "prompt": words}
            if i % 5 == 0:
                body["stream_options"] = {"include_usage": True}
            conn.request("POST", path, json.dumps(body), {"Authorization": f"Bearer {CLIENT_KEY}"})
            resp = conn.getresponse()
            resp.read()
            self.assertEqual(resp.status, 200)
        self.settled(1000)
        self.assertEqual(len(self.upstream.reported), 1000)
        self.assertEqual(self.charged(), sum(self.upstream.reported))
