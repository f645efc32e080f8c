"""Ollama's native API (/api/...): its routes at the upstream's root, the stream that is on by
default, num_predict as the reserve, usage from the final line, the limit and the proxy's own
errors in Ollama's shape, and the official ollama client."""

from __future__ import annotations

import http.client
import json
import re
import socket
import unittest

import llm_proxy
from tests.support import (
    CLIENT_KEY, WAIT, FakeUpstream, ProxyTestCase, free_port, ollama_answer, ollama_lines, wire)

try:
    import ollama
except ImportError:  # the official-client tests are skipped
    ollama = None

CHAT_PATH, GENERATE_PATH = "/api/chat", "/api/generate"
CHAT = {"model": "fake-a", "messages": [{"role": "user", "content": "hello there"}]}
GENERATE = {"model": "fake-a", "prompt": "hello there"}
EMBED = {"model": "e", "input": ["some words to embed", "and more"]}
EMBEDDINGS = {"model": "e", "prompt": "some words to embed"}
NDJSON = "application/x-ndjson"
ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")
LIMIT_TEXT = "limit reached, wait 5 min"


def dechunk(data):
    """The payload of a chunked body, and whether it ended with the last chunk."""
    payload = b""
    while True:
        size, found, data = data.partition(b"\r\n")
        if not found:
            return payload, False
        size = int(size.split(b";")[0], 16)
        if size == 0:
            return payload, data == b"\r\n"
        if data[size:size + 2] != b"\r\n":
            return payload + data, False
        payload, data = payload + data[:size], data[size + 2:]


class OllamaCase(ProxyTestCase):
    def ollama(self, path=CHAT_PATH, scenario="", key=CLIENT_KEY, **fields):
        body = {**(CHAT if path == CHAT_PATH else GENERATE), **fields}
        return self.request("POST", path, body, key=key,
                            headers={"X-Fake-Scenario": scenario} if scenario else None)

    def sent(self, upstream=None):
        return json.loads((upstream or self.upstream).requests[-1][3])

    def assert_ollama_error(self, status, headers, body, expected):
        self.assertEqual(status, expected, body)
        self.assertTrue(headers["content-type"].startswith("application/json"))
        error = json.loads(body)
        self.assertEqual(set(error), {"error"})
        self.assertIsInstance(error["error"], str)
        self.assertTrue(error["error"])
        return error["error"]

    def assert_uncharged(self, headers):
        self.assertEqual([n for n in headers if n.startswith("x-ratelimit")], [])


class OllamaTests(OllamaCase):
    def test_native_routes_are_forwarded_to_the_root_and_charged_by_kind(self):
        for index, path in enumerate((CHAT_PATH, GENERATE_PATH)):
            status, headers, _ = self.ollama(path, stream=False)
            self.assertEqual((status, headers["x-ratelimit-remaining"]), (200, str(9 - index)))
        for method, path, body in (("GET", "/api/tags", None), ("POST", "/api/show", CHAT),
                                   ("GET", "/api/version", None), ("GET", "/api/ps", None),
                                   ("POST", "/api/embed", EMBED),  # free in request mode
                                   ("POST", "/api/embeddings", EMBEDDINGS)):
            with self.subTest(path=path):
                status, headers, answer = self.request(method, path, body)
                self.assertEqual(status, 200)
                self.assertEqual(answer, wire(ollama_answer(path, (body or {}).get("model", ""),
                                                            body)))
                self.assert_uncharged(headers)
        self.assertEqual(self.remaining(), 8)
        self.assertEqual(self.upstream.paths(), [CHAT_PATH, GENERATE_PATH, "/api/tags",
                                                 "/api/show", "/api/version", "/api/ps",
                                                 "/api/embed", "/api/embeddings"])

    def test_native_api_url_is_where_native_requests_go(self):
        native = FakeUpstream()
        self._serve(native)
        self.addCleanup(native.stop.set)
        self.restart(native_api_url=native.root_url)
        self.assertEqual(self.ollama(stream=False)[0], 200)
        self.assertEqual(self.request("GET", "/api/tags")[0], 200)
        self.assertEqual(self.chat()[0], 200)
        self.assertEqual(native.paths(), [CHAT_PATH, "/api/tags"])
        self.assertEqual(self.upstream.paths(), ["/v1/chat/completions"])

    def test_embeddings_are_charged_their_input_in_estimate_mode(self):
        self.restart(token_cost_mode="estimate", max_tokens=1000)
        balance = 1000
        for path, body in (("/api/embed", EMBED), ("/api/embeddings", EMBEDDINGS)):
            with self.subTest(path=path):
                balance -= llm_proxy.prompt_estimate(body)
                status, headers, _ = self.request("POST", path, body)
                self.assertEqual((status, headers["x-ratelimit-remaining"]), (200, str(balance)))
                self.assertEqual(self.sent(), body)

    def test_model_management_is_forwarded_for_the_admin_only(self):
        self.restart(admin_api_key="sk-admin")
        rows = (("POST", "/api/pull"), ("POST", "/api/push"), ("POST", "/api/create"),
                ("POST", "/api/copy"), ("DELETE", "/api/delete"),
                ("HEAD", "/api/blobs/sha256:abc"), ("POST", "/api/blobs/sha256:abc"))
        for method, path in rows:
            with self.subTest(method=method, path=path):
                body = None if method == "HEAD" else {"model": "m", "stream": False}
                for key in (CLIENT_KEY, None):
                    status, headers, answer = self.request(method, path, body, key=key)
                    self.assertEqual(status, 403)
                    if method != "HEAD":
                        self.assert_ollama_error(status, headers, answer, 403)
                status, headers, _ = self.request(method, path, body, key="sk-admin")
                self.assertEqual(status, 200)
                self.assert_uncharged(headers)
        self.assertEqual([r[:2] for r in self.upstream.requests], list(rows))
        self.assertEqual((self.remaining(), self.remaining("sk-admin")), (10, 10))

    def test_wrong_methods_are_405_in_ollama_shape(self):
        for method, path in (("GET", CHAT_PATH), ("PUT", GENERATE_PATH), ("GET", "/api/embed"),
                             ("POST", "/api/tags"), ("GET", "/api/show"),
                             ("DELETE", "/api/version"), ("POST", "/api/ps"),
                             ("GET", "/api/pull"), ("POST", "/api/delete"),
                             ("GET", "/api/blobs/sha256:abc")):
            with self.subTest(method=method, path=path):
                self.assert_ollama_error(*self.request(method, path, CHAT), 405)
        self.assertEqual(self.request("GET", CHAT_PATH)[1]["allow"], "OPTIONS, POST")
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.remaining(), 10)

    def test_stream_is_on_by_default_and_relayed_line_by_line(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=WAIT)
        self.addCleanup(conn.close)
        conn.request("POST", CHAT_PATH, json.dumps(CHAT),
                     {"Authorization": f"Bearer {CLIENT_KEY}", "X-Fake-Scenario": "gate"})
        resp = conn.getresponse()
        self.assertEqual((resp.status, resp.getheader("Content-Type")), (200, NDJSON))
        expected = ollama_lines(CHAT_PATH, "fake-a", CHAT)
        self.assertEqual(resp.readline(), expected[0])  # the upstream holds the rest
        self.upstream.release.set()
        self.assertEqual(resp.read(), b"".join(expected[1:]))
        self.assertEqual(self.upstream.requests[-1][3], json.dumps(CHAT).encode())
        status, headers, body = self.ollama(GENERATE_PATH)
        self.assertEqual((status, headers["content-type"]), (200, NDJSON))
        self.assertEqual(body, b"".join(ollama_lines(GENERATE_PATH, "fake-a", GENERATE)))

    def test_stream_false_is_one_object(self):
        for path in (CHAT_PATH, GENERATE_PATH):
            with self.subTest(path=path):
                status, headers, body = self.ollama(path, stream=False)
                self.assertEqual(status, 200)
                self.assertTrue(headers["content-type"].startswith("application/json"))
                self.assertEqual(body, wire(ollama_answer(path, "fake-a", self.sent())))

    def test_a_stream_flag_that_is_not_a_boolean_is_refused(self):
        for path in (CHAT_PATH, GENERATE_PATH):
            for value in ("true", 1, "false", 0, [True]):
                with self.subTest(path=path, stream=value):
                    self.assert_ollama_error(*self.ollama(path, stream=value), 400)
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.remaining(), 10)

    def test_num_predict_is_the_reserve_and_is_forwarded_in_estimate_mode(self):
        self.restart(token_cost_mode="estimate", max_tokens=100_000, response_token_reserve=100)
        for path, options, reserve in (
                (CHAT_PATH, None, 100), (CHAT_PATH, {"num_predict": 20}, 20),
                (GENERATE_PATH, {"num_predict": 7, "temperature": 0.5}, 7),
                (CHAT_PATH, {"temperature": 0.5}, 100), (CHAT_PATH, {"num_predict": None}, 100),
                (CHAT_PATH, {"num_predict": -1}, 100), (GENERATE_PATH, {"num_predict": -2}, 100),
                (CHAT_PATH, {"num_predict": 0}, 100)):  # 0 is no limit to Ollama's runner
            with self.subTest(path=path, options=options):
                fields = {"stream": False, **({} if options is None else {"options": options})}
                body = {**(CHAT if path == CHAT_PATH else GENERATE), **fields}
                before = self.remaining()
                self.assertEqual(self.ollama(path, **fields)[0], 200)
                self.assertEqual(before - self.remaining(),
                                 llm_proxy.prompt_estimate(body) + reserve)
                sent_options = self.sent()["options"]
                self.assertEqual(sent_options, {**(options or {}), "num_predict": reserve})

    def test_an_invalid_num_predict_or_options_is_refused(self):
        for options in ({"num_predict": "100"}, {"num_predict": 1.5}, {"num_predict": True},
                        "fast", [{"num_predict": 5}]):
            for path in (CHAT_PATH, GENERATE_PATH):
                with self.subTest(path=path, options=options):
                    self.assert_ollama_error(*self.ollama(path, options=options), 400)
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.remaining(), 10)

    def drain(self):
        for _ in range(10):
            self.assertEqual(self.ollama(stream=False)[0], 200)

    def test_the_limit_is_an_answer_in_ollama_shape(self):
        self.drain()
        for path in (CHAT_PATH, GENERATE_PATH):
            for fields, content_type in (({}, NDJSON), ({"stream": False}, "application/json")):
                with self.subTest(path=path, fields=fields):
                    status, headers, body = self.ollama(path, model="my-model", **fields)
                    self.assertEqual(status, 200)
                    self.assertTrue(headers["content-type"].startswith(content_type))
                    if content_type == NDJSON:
                        self.assertEqual((body.count(b"\n"), body[-1:]), (1, b"\n"))
                    answer = json.loads(body)
                    self.assertEqual(answer["model"], "my-model")
                    self.assertRegex(answer["created_at"], ISO_TIME)
                    self.assertEqual((answer["done"], answer["done_reason"]), (True, "stop"))
                    if path == CHAT_PATH:
                        self.assertNotIn("response", answer)
                        self.assertEqual(answer["message"],
                                         {"role": "assistant", "content": LIMIT_TEXT})
                    else:
                        self.assertNotIn("message", answer)
                        self.assertEqual(answer["response"], LIMIT_TEXT)
                    self.assertEqual(headers["retry-after"], "300")
                    self.assertEqual(headers["x-ratelimit-remaining"], "0")
                    self.assertEqual(headers["x-ratelimit-limit"], "10")
        self.assertEqual(len(self.upstream.requests), 10)

    def test_the_limit_as_a_429(self):
        self.restart(limit_response="429")
        self.drain()
        for path in (CHAT_PATH, GENERATE_PATH):
            for fields in ({}, {"stream": False}):
                with self.subTest(path=path, fields=fields):
                    status, headers, body = self.ollama(path, **fields)
                    error = self.assert_ollama_error(status, headers, body, 429)
                    self.assertTrue(error.startswith("Rate limit reached for this key: "), error)
                    self.assertEqual(headers["retry-after"], "300")
        self.assertEqual(len(self.upstream.requests), 10)

    def test_the_proxys_own_errors_are_ollama_errors(self):
        self.assert_ollama_error(*self.request("POST", "/api/nope", CHAT), 404)
        self.assert_ollama_error(*self.request("GET", "/api/nope"), 404)
        self.assert_ollama_error(*self.request("POST", CHAT_PATH, b"{not json"), 400)
        self.assert_ollama_error(*self.request("POST", GENERATE_PATH, b"[1, 2]"), 400)
        self.assertEqual(self.upstream.requests, [])
        self.restart(proxy_api_keys=("good-key",))
        for key in ("bad-key", None):
            self.assert_ollama_error(*self.ollama(key=key), 401)
        self.restart(base_api_url=f"http://127.0.0.1:{free_port()}/v1")
        self.assert_ollama_error(*self.ollama(), 502)
        self.restart(read_timeout=0.5)
        self.assert_ollama_error(*self.ollama(scenario="hang"), 504)
        self.assert_ollama_error(*self.ollama(scenario="hang", stream=False), 504)

    def broken_stream(self, scenario):
        """The raw answer to a streamed /api/chat, read until the proxy closes the connection."""
        body = json.dumps(CHAT).encode()
        request = (b"POST /api/chat HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer %s\r\n"
                   b"X-Fake-Scenario: %s\r\nContent-Length: %d\r\n\r\n%s"
                   % (CLIENT_KEY.encode(), scenario.encode(), len(body), body))
        with socket.create_connection(("127.0.0.1", self.proxy.server_address[1]),
                                      timeout=WAIT) as sock:
            sock.sendall(request)
            chunks = []
            while chunk := sock.recv(65536):  # a timeout here: the connection stayed open
                chunks.append(chunk)
        return b"".join(chunks)

    def test_a_stream_the_upstream_breaks_off_ends_with_an_error_line(self):
        self.restart(read_timeout=0.5)
        for scenario, delivered in (("stall", 2), ("reset", 1)):
            with self.subTest(scenario=scenario):
                head, _, rest = self.broken_stream(scenario).partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
                self.assertIn(b"\r\ntransfer-encoding: chunked", head.lower())
                payload, terminated = dechunk(rest)
                self.assertTrue(terminated, rest)
                lines = payload.splitlines(keepends=True)
                self.assertEqual(lines[:-1], ollama_lines(CHAT_PATH, "fake-a", CHAT)[:delivered])
                self.assertTrue(lines[-1].endswith(b"\n"))
                error = json.loads(lines[-1])
                self.assertEqual(set(error), {"error"})
                self.assertIsInstance(error["error"], str)

    def test_base_model_is_the_only_model_and_the_one_generation_uses(self):
        for base_model, listed in (("served", "served:latest"), ("served:7b", "served:7b")):
            with self.subTest(base_model=base_model):
                self.restart(base_model=base_model)
                status, headers, body = self.request("GET", "/api/tags")
                self.assertEqual(status, 200)
                self.assertEqual([(m["name"], m["model"]) for m in json.loads(body)["models"]],
                                 [(listed, listed)])
                self.assert_uncharged(headers)
        self.assertEqual(self.upstream.requests, [])
        self.restart(base_model="served")
        for path in (CHAT_PATH, GENERATE_PATH):
            self.assertEqual(self.ollama(path, model="asked", stream=False)[0], 200)
            self.assertEqual(self.sent()["model"], "served")


class OllamaUsageTests(OllamaCase):
    """TOKEN_COST_MODE=usage: settled from the final line's counts."""

    CAPACITY = 100_000

    def setUp(self):
        super().setUp()
        # (an answer without a limit of its own runs to the reserve: what is held is exact)
        self.restart(token_cost_mode="usage", max_tokens=self.CAPACITY,
                     response_token_reserve=50, max_output_tokens=50)

    def charged(self):
        return self.CAPACITY - self.remaining()

    def cost(self, path, body, scenario=""):
        """What one request to `path` comes to once it is settled, and its answer."""
        before, seen = self.charged(), len(self.upstream.requests)
        status, headers, answer = self.request(
            "POST", path, body, headers={"X-Fake-Scenario": scenario} if scenario else None)
        self.assertEqual(status, 200, answer)
        self.assertTrue(self.log.wait_for(lambda text: text.count('"POST /api/') > seen))
        return self.charged() - before, headers, answer

    def test_settled_with_the_counts_of_the_final_line(self):
        for path in (CHAT_PATH, GENERATE_PATH):
            for fields in ({}, {"stream": False}):
                with self.subTest(path=path, fields=fields):
                    body = {**(CHAT if path == CHAT_PATH else GENERATE), **fields}
                    cost, headers, answer = self.cost(path, body)
                    final = json.loads(answer.splitlines()[-1])
                    self.assertEqual(cost, final["prompt_eval_count"] + final["eval_count"])
                    self.assertEqual(cost, self.upstream.reported[-1])
                    self.assertNotEqual(cost, llm_proxy.prompt_estimate(body) + 50)
                    self.assertEqual(headers["x-ratelimit-remaining"], str(
                        self.CAPACITY - (self.charged() - cost)
                        - llm_proxy.prompt_estimate(body) - 50))  # the reservation, first

    def test_a_cached_prompt_counts_as_its_estimate(self):
        for path in (CHAT_PATH, GENERATE_PATH):
            for fields, eval_count in (({}, 3), ({"stream": False}, 2)):
                with self.subTest(path=path, fields=fields):
                    body = {**(CHAT if path == CHAT_PATH else GENERATE), **fields}
                    cost, _, answer = self.cost(path, body, "ollama-cached")
                    self.assertNotIn(b"prompt_eval_count", answer)
                    self.assertEqual(cost, llm_proxy.prompt_estimate(body) + eval_count)

    def test_embeddings_settle_with_prompt_eval_count_or_the_estimate(self):
        cost, headers, answer = self.cost("/api/embed", EMBED)
        self.assertEqual(cost, json.loads(answer)["prompt_eval_count"])
        self.assertEqual(cost, self.upstream.reported[-1])
        self.assertNotEqual(cost, llm_proxy.prompt_estimate(EMBED))
        self.assertEqual(headers["x-ratelimit-remaining"],
                         str(self.CAPACITY - llm_proxy.prompt_estimate(EMBED)))
        before = len(self.upstream.reported)
        cost, _, _ = self.cost("/api/embeddings", EMBEDDINGS)
        self.assertEqual(len(self.upstream.reported), before)  # no count in the answer
        self.assertEqual(cost, llm_proxy.prompt_estimate(EMBEDDINGS))

    def test_a_stream_ended_by_an_upstream_error_costs_what_it_generated(self):
        cost, _, answer = self.cost(CHAT_PATH, CHAT, "ollama-error")
        self.assertEqual(answer, b"".join(ollama_lines(CHAT_PATH, "fake-a", CHAT,
                                                       "ollama-error")))
        self.assertEqual(cost, llm_proxy.prompt_estimate(CHAT) + 5)  # "Hello": 5 bytes


@unittest.skipIf(ollama is None, "the official ollama package is not installed")
class OllamaClientTests(OllamaCase):
    MESSAGES = [{"role": "user", "content": "hi"}]

    def client(self, key=CLIENT_KEY, **headers):
        return ollama.Client(host=f"http://127.0.0.1:{self.proxy.server_address[1]}",
                             headers={"Authorization": f"Bearer {key}", **headers},
                             timeout=WAIT)

    def chat_text(self, client, stream):
        answer = client.chat(model="fake-a", messages=self.MESSAGES, stream=stream)
        return "".join(p.message.content for p in answer) if stream else answer.message.content

    def test_chat_and_generate_plain_and_streamed(self):
        client = self.client()
        self.assertEqual(self.chat_text(client, False), "proxy ok")
        self.assertEqual(self.chat_text(client, True), "Hello world")
        self.assertEqual(client.generate(model="fake-a", prompt="hi").response, "proxy ok")
        self.assertEqual("".join(p.response for p in client.generate(
            model="fake-a", prompt="hi", stream=True)), "Hello world")
        self.assertEqual(self.remaining(), 6)

    def test_the_limit_as_a_message_and_as_a_429(self):
        client = self.client()
        for _ in range(10):
            self.chat_text(client, False)
        self.assertEqual(self.chat_text(client, False), LIMIT_TEXT)
        self.assertEqual(self.chat_text(client, True), LIMIT_TEXT)
        self.assertEqual(client.generate(model="fake-a", prompt="hi").response, LIMIT_TEXT)
        self.restart(limit_response="429")
        client = self.client()
        for _ in range(10):
            self.chat_text(client, False)
        for stream in (False, True):
            with self.subTest(stream=stream):
                with self.assertRaises(ollama.ResponseError) as caught:
                    self.chat_text(client, stream)
                self.assertEqual(caught.exception.status_code, 429)
                self.assertTrue(caught.exception.error.startswith("Rate limit reached"))

    def test_list_with_base_model(self):
        self.restart(base_model="served")
        self.assertEqual([m.model for m in self.client().list().models], ["served:latest"])

    def test_a_stream_broken_off_upstream_raises_its_error_line(self):
        self.restart(read_timeout=0.5)
        pieces = []
        with self.assertRaises(ollama.ResponseError) as caught:
            for part in self.client(**{"X-Fake-Scenario": "stall"}).chat(
                    model="fake-a", messages=self.MESSAGES, stream=True):
                pieces.append(part.message.content)
        self.assertEqual(pieces, ["Hello", " world"])
        self.assertEqual(caught.exception.status_code, -1)  # raised from a line, not a status
        self.assertTrue(caught.exception.error)
