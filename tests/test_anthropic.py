"""The Anthropic Messages door (/v1/messages): its routes, keys, costs, limit answers and errors,
over real sockets against the fake upstream, and with the official anthropic package."""

from __future__ import annotations

import json
import socket
import unittest

import llm_proxy
from tests.support import (
    CLIENT_KEY, UPSTREAM_KEY, WAIT, ProxyTestCase, anthropic_events, anthropic_message,
    anthropic_usage, fake_prompt_tokens, free_port, wire)

try:
    import anthropic
except ImportError:  # the real-client tests are skipped
    anthropic = None

MESSAGE = {"model": "claude-x", "max_tokens": 20,
           "messages": [{"role": "user", "content": "hello there, how are you doing today?"}]}
LIMIT_TEXT = "limit reached, wait 5 min"
LIMIT_EVENTS = ["message_start", "content_block_start", "content_block_delta",
                "content_block_stop", "message_delta", "message_stop"]


def named_events(body):
    """[(event name, data)] of an SSE body of named events."""
    events = []
    for block in body.strip(b"\n").split(b"\n\n"):
        name, data = block.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: "), block
        events.append((name[len(b"event: "):].decode(), json.loads(data[len(b"data: "):])))
    return events


class AnthropicCase(ProxyTestCase):
    def messages(self, path="/v1/messages", key=CLIENT_KEY, headers=None, scenario="",
                 body=None, **fields):
        headers = dict(headers or {}, **({"X-Fake-Scenario": scenario} if scenario else {}))
        return self.request("POST", path, {**MESSAGE, **fields} if body is None else body,
                            key=key, headers=headers)

    def assert_anthropic_error(self, status, body, expected_status, kind):
        self.assertEqual(status, expected_status, body)
        answer = json.loads(body)
        self.assertEqual((answer["type"], set(answer["error"])), ("error", {"type", "message"}))
        self.assertEqual(answer["error"]["type"], kind)
        self.assertTrue(answer["error"]["message"])

    def settled(self, count=1):
        """The access line of the count-th /v1/messages request (written once it is settled)."""
        self.assertTrue(self.log.wait_for(
            lambda text: text.count('"POST /v1/messages" ') >= count))

    def usage_mode(self, **settings):
        self.restart(token_cost_mode="usage", max_tokens=100_000, response_token_reserve=50,
                     **settings)

    def drain(self, **settings):
        self.restart(max_tokens=2, **settings)
        for _ in range(2):
            self.assertEqual(self.messages()[0], 200)


class AnthropicRouteTests(AnthropicCase):
    def test_messages_is_charged_in_every_mode_and_count_tokens_is_free(self):
        for count, mode in enumerate(llm_proxy.COST_MODES, 1):
            with self.subTest(mode=mode):
                self.restart(token_cost_mode=mode, max_tokens=1000)
                status, headers, body = self.messages(path="/v1/messages/count_tokens")
                self.assertEqual((status, json.loads(body)),
                                 (200, {"input_tokens": fake_prompt_tokens(MESSAGE)}))
                self.assertFalse([h for h in headers if h.startswith("x-ratelimit")])
                self.assertEqual(self.remaining(), 1000)
                status, headers, _ = self.messages()
                self.assertEqual(status, 200)
                self.assertLess(int(headers["x-ratelimit-remaining"]), 1000)
                self.settled(count)
                self.assertLess(self.remaining(), 1000)

    def test_claude_codes_query_is_kept_and_charged(self):
        status, headers, _ = self.messages(path="/v1/messages?beta=true")
        self.assertEqual((status, headers["x-ratelimit-remaining"]), (200, "9"))
        self.assertEqual(self.upstream.paths(), ["/v1/messages?beta=true"])
        self.assertEqual(self.remaining(), 9)

    def test_other_methods_are_405_in_anthropics_shape(self):
        for method in ("GET", "PUT", "PATCH", "DELETE"):
            with self.subTest(method=method):
                status, headers, body = self.request(method, "/v1/messages", MESSAGE)
                self.assert_anthropic_error(status, body, 405, "invalid_request_error")
                self.assertEqual(headers["allow"], "OPTIONS, POST")
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.remaining(), 10)


class AnthropicKeyTests(AnthropicCase):
    def test_the_key_as_x_api_key_or_bearer_and_the_upstream_key_as_both(self):
        self.restart(proxy_api_keys=("sk-mine",), base_api_key=UPSTREAM_KEY)
        versions = {"anthropic-version": "2023-06-01",
                    "anthropic-beta": "prompt-caching-2024-07-31,fine-grained-tool-streaming"}
        for style in ("x-api-key", "bearer"):
            with self.subTest(style=style):
                def send(key):
                    if style == "bearer":
                        return self.messages(key=key, headers=versions)
                    return self.messages(key=None, headers={"x-api-key": key, **versions})
                seen = len(self.upstream.requests)
                self.assertEqual(send("sk-mine")[0], 200)
                status, _, body = send("sk-other")
                self.assert_anthropic_error(status, body, 401, "authentication_error")
                self.assertEqual(len(self.upstream.requests), seen + 1)
                sent = {k.lower(): v for k, v in self.upstream.requests[-1][2].items()}
                self.assertEqual((sent["authorization"], sent["x-api-key"]),
                                 (f"Bearer {UPSTREAM_KEY}", UPSTREAM_KEY))
                self.assertEqual({k: sent[k] for k in versions}, versions)
                self.assertNotIn("sk-mine", json.dumps(sent))
        status, _, body = self.messages(key=None)
        self.assert_anthropic_error(status, body, 401, "authentication_error")


class AnthropicCostTests(AnthropicCase):
    def cost(self, **fields):
        before = self.remaining()
        status, _, body = self.messages(**fields)
        self.assertEqual(status, 200, body)
        self.settled(len(self.upstream.requests))
        return before - self.remaining()

    def test_request_mode_charges_the_request_cost(self):
        self.restart(request_token_cost=3, max_tokens=100)
        self.assertEqual([self.cost(), self.cost(stream=True)], [3, 3])

    def test_estimate_mode_charges_and_forwards_the_limit_charged_for(self):
        self.restart(token_cost_mode="estimate", max_tokens=100_000, response_token_reserve=100)
        self.assertEqual(self.cost(), llm_proxy.prompt_estimate(MESSAGE) + 20)
        self.assertEqual(self.upstream.requests[-1][3], json.dumps(MESSAGE).encode())
        body = {k: v for k, v in MESSAGE.items() if k != "max_tokens"}
        self.assertEqual(self.cost(body=body), llm_proxy.prompt_estimate(body) + 100)
        self.assertEqual(json.loads(self.upstream.requests[-1][3]), {**body, "max_tokens": 100})

    def test_usage_mode_settles_exactly_what_the_upstream_reports(self):
        self.usage_mode()
        fields = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                  "output_tokens")
        for stream in (False, True):
            for habit in ("", "anthropic-cache"):
                with self.subTest(stream=stream, habit=habit):
                    request = {**MESSAGE, "stream": stream}
                    before, seen = self.remaining(), len(self.upstream.requests)
                    status, _, body = self.messages(scenario=habit, body=request)
                    self.settled(seen + 1)
                    charged = before - self.remaining()
                    self.assertEqual(charged, self.upstream.reported[-1])
                    if stream:  # message_start's input, the last message_delta's output
                        self.assertEqual(body, b"".join(anthropic_events("claude-x", request,
                                                                         habit)))
                        usage = {**named_events(body)[0][1]["message"]["usage"],
                                 "output_tokens": named_events(body)[-2][1]["usage"]
                                 ["output_tokens"]}
                    else:
                        self.assertEqual(body, wire(anthropic_message("claude-x", request,
                                                                      habit)))
                        usage = json.loads(body)["usage"]
                    self.assertEqual(charged, sum(usage.get(f, 0) for f in fields))
                    self.assertEqual(habit == "anthropic-cache", usage["input_tokens"] == 1)

    def test_an_answer_without_usage_keeps_its_reservation(self):
        self.usage_mode()
        _, headers, _ = self.messages(scenario="no-usage")
        self.settled()
        reserved = llm_proxy.prompt_estimate(MESSAGE) + 20
        self.assertEqual(headers["x-ratelimit-remaining"], str(100_000 - reserved))
        self.assertEqual(self.remaining(), 100_000 - reserved)

    def test_invalid_stream_and_max_tokens_are_refused_before_anything_is_charged(self):
        self.restart(token_cost_mode="estimate", max_tokens=100_000)
        for fields in ({"stream": "true"}, {"stream": 1}, {"max_tokens": "99"},
                       {"max_tokens": -1}, {"max_tokens": 1.5}):
            with self.subTest(fields=fields):
                status, _, body = self.messages(**fields)
                self.assert_anthropic_error(status, body, 400, "invalid_request_error")
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.remaining(), 100_000)


class AnthropicLimitTests(AnthropicCase):
    def assert_limit_headers(self, headers):
        self.assertEqual((headers["x-ratelimit-remaining"], headers["x-ratelimit-limit"]),
                         ("0", "2"))
        self.assertEqual(headers["retry-after"], "300")

    def test_the_limit_as_a_message(self):
        self.drain()
        status, headers, body = self.messages(model="my-model")
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("application/json"))
        message = json.loads(body)
        self.assertTrue(message.pop("id").startswith("msg_"))
        self.assertEqual(message, {"type": "message", "role": "assistant", "model": "my-model",
                                   "content": [{"type": "text", "text": LIMIT_TEXT}],
                                   "stop_reason": "end_turn", "stop_sequence": None,
                                   "usage": {"input_tokens": 0, "output_tokens": 0}})
        self.assert_limit_headers(headers)
        self.assertEqual(len(self.upstream.requests), 2)

    def test_the_limit_as_a_message_stream(self):
        self.drain()
        status, headers, body = self.messages(stream=True)
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/event-stream"))
        events = named_events(body)
        self.assertEqual([name for name, _ in events], LIMIT_EVENTS)
        self.assertEqual([data["type"] for _, data in events], LIMIT_EVENTS)
        self.assertEqual(events[2][1]["delta"], {"type": "text_delta", "text": LIMIT_TEXT})
        self.assertEqual(events[0][1]["message"]["model"], "claude-x")
        self.assertNotIn(b"[DONE]", body)
        self.assert_limit_headers(headers)

    def test_the_limit_as_429(self):
        for interval, wait, should_retry in ((300, "300", "false"), (30, "30", None)):
            with self.subTest(interval=interval):
                self.drain(limit_response="429", refill_interval_seconds=interval)
                status, headers, body = self.messages()
                self.assert_anthropic_error(status, body, 429, "rate_limit_error")
                self.assertEqual((headers["retry-after"], headers["retry-after-ms"]),
                                 (wait, wait + "000"))
                self.assertEqual(headers.get("x-should-retry"), should_retry)
                self.assertEqual(headers["x-ratelimit-remaining"], "0")


class AnthropicErrorTests(AnthropicCase):
    def test_the_proxys_own_errors_are_anthropic_shaped(self):
        self.restart(proxy_api_keys=(CLIENT_KEY,))
        self.assert_anthropic_error(*self.messages(key="sk-wrong")[::2], 401,
                                    "authentication_error")
        for raw in (b"{not json", b"[1, 2]"):
            with self.subTest(body=raw):
                self.assert_anthropic_error(*self.messages(body=raw)[::2], 400,
                                            "invalid_request_error")
        self.restart(max_body_bytes=100)
        self.assert_anthropic_error(*self.messages(system="x" * 200)[::2], 413,
                                    "request_too_large")
        self.assertEqual(self.upstream.requests, [])
        self.restart(base_api_url=f"http://127.0.0.1:{free_port()}/v1")
        self.assert_anthropic_error(*self.messages()[::2], 502, "api_error")
        self.assertEqual(self.remaining(), 10)
        self.restart(read_timeout=0.5)
        self.assert_anthropic_error(*self.messages(scenario="hang")[::2], 504, "timeout_error")

    def broken_stream(self, scenario, request):
        """The dechunked body of a stream the upstream breaks off; fails unless the chunked
        body is terminated and the proxy then closes the connection."""
        data = json.dumps(request).encode()
        with socket.create_connection(("127.0.0.1", self.proxy.server_address[1]),
                                      timeout=WAIT) as s:
            s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                      b"X-Fake-Scenario: %s\r\nContent-Length: %d\r\n\r\n%s"
                      % (CLIENT_KEY.encode(), scenario.encode(), len(data), data))
            answer = b""
            while chunk := s.recv(65536):  # a socket.timeout here: the connection stayed open
                answer += chunk
        head, _, rest = answer.partition(b"\r\n\r\n")
        self.assertIn(b"\r\ntransfer-encoding: chunked", head.lower())
        body = b""
        while True:
            size, _, rest = rest.partition(b"\r\n")
            if int(size, 16) == 0:
                self.assertEqual(rest, b"\r\n")
                return body
            body, rest = body + rest[:int(size, 16)], rest[int(size, 16):]
            self.assertTrue(rest.startswith(b"\r\n"))
            rest = rest[2:]

    def test_a_broken_stream_ends_with_an_error_event_and_costs_the_prompt_and_text(self):
        """Charged the prompt the upstream reported in message_start (its own count is better
        than the estimate) plus the text generated before the break."""
        self.usage_mode(read_timeout=0.5)
        request = {**MESSAGE, "stream": True}
        for count, (scenario, sent) in enumerate((("stall", 2), ("reset", 1)), 1):
            with self.subTest(scenario=scenario):
                before = self.remaining()
                body = self.broken_stream(scenario, request)
                events = named_events(body)
                self.assertEqual(body.rpartition(b"event: error")[0],
                                 b"".join(anthropic_events("claude-x", request)[:sent]))
                self.assertEqual(events[-1][0], "error")
                error = events[-1][1]
                self.assertEqual((error["type"], error["error"]["type"]), ("error", "api_error"))
                self.assertTrue(error["error"]["message"])
                self.assertTrue(self.log.wait_for(
                    lambda text: text.count("upstream broke off") >= count))
                generated = 0  # message_start and content_block_start carry no text
                reported = anthropic_usage(request, 0)["input_tokens"]
                self.assertNotEqual(reported, llm_proxy.prompt_estimate(request))
                self.assertEqual(before - self.remaining(), reported + generated)

    def test_upstream_errors(self):
        self.usage_mode()
        status, _, body = self.messages(scenario="status-400")
        self.assert_anthropic_error(status, body, 400, "invalid_request_error")
        self.settled()
        self.assertEqual(self.remaining(), 100_000)  # it reports nothing: it costs nothing
        for mode in llm_proxy.COST_MODES:
            with self.subTest(mode=mode):
                self.restart(token_cost_mode=mode, max_tokens=1000)
                status, _, body = self.messages(scenario="status-529")
                self.assert_anthropic_error(status, body, 529, "overloaded_error")
                self.assertEqual(self.remaining(), 1000)
        self.restart()
        self.assertEqual(self.messages(scenario="status-500")[0], 500)
        self.assertEqual(self.remaining(), 9)


@unittest.skipIf(anthropic is None, "the official anthropic package is not installed")
class AnthropicClientTests(AnthropicCase):
    def client(self, key=CLIENT_KEY, **options):
        options = options or {"api_key": key}
        return anthropic.Anthropic(base_url=f"http://127.0.0.1:{self.proxy.server_address[1]}",
                                   max_retries=0, timeout=WAIT, **options)

    def create(self, client=None, **extra):
        return (client or self.client()).messages.create(**MESSAGE, **extra)

    def stream_text(self, client=None, **extra):
        with (client or self.client()).messages.stream(**MESSAGE, **extra) as stream:
            return "".join(stream.text_stream), stream.get_final_message()

    def test_create_and_stream(self):
        message = self.create()
        self.assertEqual((message.content[0].text, message.model), ("proxy ok", "claude-x"))
        text, final = self.stream_text()
        self.assertEqual(text, "Hello world")
        self.assertEqual((final.usage.input_tokens, final.usage.output_tokens),
                         (fake_prompt_tokens(MESSAGE), 3))
        self.assertEqual(self.upstream.paths(), ["/v1/messages"] * 2)
        self.assertEqual(self.remaining(), 8)

    def test_bearer_auth_token_and_a_wrong_key(self):
        self.restart(proxy_api_keys=(CLIENT_KEY,))
        self.assertEqual(self.create(self.client(auth_token=CLIENT_KEY)).content[0].text,
                         "proxy ok")
        with self.assertRaises(anthropic.AuthenticationError):
            self.create(self.client("sk-wrong"))
        self.assertEqual(len(self.upstream.requests), 1)

    def test_the_limit_as_a_message_and_as_429(self):
        self.drain()
        self.assertEqual(self.create().content[0].text, LIMIT_TEXT)
        self.assertEqual(self.stream_text()[0], LIMIT_TEXT)
        self.drain(limit_response="429")
        with self.assertRaises(anthropic.RateLimitError) as caught:
            self.create()
        self.assertEqual(caught.exception.response.headers["retry-after"], "300")
        self.assertEqual(len(self.upstream.requests), 4)

    def test_a_broken_stream_raises(self):
        self.restart(read_timeout=0.5)
        with self.assertRaises(anthropic.APIStatusError):
            self.stream_text(extra_headers={"X-Fake-Scenario": "stall"})
