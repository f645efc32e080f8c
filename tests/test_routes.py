"""The route table is an allow-list, and nothing a request says makes it cheaper than it is:
every row, every spelling that is refused, what a request may ask for and what it is charged."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import unittest.mock

import llm_proxy
from llm_proxy import Config, ConfigError
from tests.support import HERE, UPSTREAM_KEY, WAIT, ProxyTestCase

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}


class RouteTableTests(ProxyTestCase):
    def test_every_forwarded_row_reaches_the_upstream_with_its_method(self):
        for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                             ("POST", "/v1/responses"), ("POST", "/v1/embeddings"),
                             ("POST", "/v1/rerank"), ("GET", "/v1/models"),
                             ("GET", "/v1/models/fake-a"),
                             ("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"),
                             ("POST", "/api/chat"), ("POST", "/api/generate"),
                             ("POST", "/api/embed"), ("POST", "/api/embeddings"),
                             ("GET", "/api/tags"), ("POST", "/api/show"),
                             ("GET", "/api/version"), ("GET", "/api/ps")):
            with self.subTest(method=method, path=path):
                seen = len(self.upstream.requests)
                body = {**CHAT, "prompt": "hi", "input": "hi", "max_tokens": 5, "stream": False} \
                    if method == "POST" else None
                self.request(method, path, body)
                self.assertEqual(len(self.upstream.requests), seen + 1)
                self.assertEqual(self.upstream.requests[-1][:2], (method, path))

    def test_anything_else_is_never_forwarded(self):
        """The spellings and routes that reached the upstream uncharged before the table was
        an allow-list: 404 for what no row knows, 400 for what is not plainly a path, 405 for
        a method a row does not list."""
        self.restart(max_tokens=3)
        cases = [("POST", "/v1/engines/m/completions", 404), ("POST", "/v1/Chat/Completions", 404),
                 ("POST", "/v1/chat/completions;x=1", 400),
                 ("POST", "/v1/chat%252Fcompletions", 400),
                 ("POST", "/v1/chat/completions%20", 400), ("POST", "/v1/audio/speech", 404),
                 ("PUT", "/v1/chat/completions", 405), ("PATCH", "/v1/chat/completions", 405),
                 ("DELETE", "/v1/chat/completions", 405), ("GET", "/v1/stream?conv_id=c", 404),
                 ("POST", "/v1/streams/lookup", 404), ("GET", "/slots", 404),
                 ("GET", "/props", 404), ("POST", "/infill", 404), ("GET", "/v1", 404)]
        for method, path, status in cases:
            with self.subTest(method=method, path=path):
                for _ in range(5):
                    got, headers, body = self.request(method, path, CHAT)
                    self.assert_openai_error(got, body, status)
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.remaining(), 3)
        self.assertEqual(self.request("PUT", "/v1/chat/completions", CHAT)[1]["allow"],
                         "OPTIONS, POST")

    def test_errors_of_unknown_routes_speak_the_api_of_their_path(self):
        status, _, body = self.request("POST", "/api/nope", {})
        self.assertEqual((status, set(json.loads(body))), (404, {"error"}))
        self.assertIsInstance(json.loads(body)["error"], str)
        status, _, body = self.request("GET", "/v1/messages", None)
        self.assertEqual(status, 405)
        self.assertEqual(json.loads(body)["type"], "error")
        self.assertEqual(json.loads(body)["error"]["type"], "invalid_request_error")

    def test_model_management_is_for_the_administrator_only(self):
        self.restart(admin_api_key="sk-admin")
        for method, path in (("POST", "/api/pull"), ("POST", "/api/push"), ("POST", "/api/create"),
                             ("POST", "/api/copy"), ("DELETE", "/api/delete"),
                             ("POST", "/api/blobs/sha256:abc")):
            with self.subTest(path=path):
                status, _, body = self.request(method, path, {"model": "m"})
                self.assertEqual(status, 403)
                self.assertIsInstance(json.loads(body)["error"], str)  # Ollama's shape
                self.assertEqual(self.request(method, path, {"model": "m"}, key="sk-admin")[0],
                                 200)
        self.assertEqual([r[1] for r in self.upstream.requests],
                         ["/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete",
                          "/api/blobs/sha256:abc"])

    def test_extra_routes_are_forwarded_as_their_kind(self):
        self.restart(extra_routes=(("POST", "/v1/audio/transcriptions", "embed"),
                                   ("POST", "/infill", "generate"), ("GET", "/v1/files/*", "free")),
                     token_cost_mode="estimate", max_tokens=1000)
        self.assertEqual(self.request("POST", "/v1/audio/transcriptions",
                                      {"input": "x" * 40})[0], 404)  # the fake has no such route
        self.assertEqual(self.remaining(), 1000 - 40)  # embeddings class: its input
        self.request("POST", "/infill", {"input_prefix": "def f(", "n_predict": 20})
        self.assertEqual(self.upstream.requests[-1][1], "/infill")  # under the upstream's root
        self.assertEqual(json.loads(self.upstream.requests[-1][3])["n_predict"], 20)
        self.assertEqual(self.remaining(), 1000 - 40 - (6 + 20))
        self.request("GET", "/v1/files/abc/content")
        self.assertEqual(self.upstream.requests[-1][1], "/v1/files/abc/content")
        self.assertEqual(self.request("GET", "/v1/files")[0], 404)  # below it only

    def test_extra_routes_setting_is_checked(self):
        self.assertEqual(Config.from_env({"EXTRA_ROUTES": "post /v1/score embed,GET /x/* free"},
                                         []).extra_routes,
                         (("POST", "/v1/score", "embed"), ("GET", "/x/*", "free")))
        for bad in ("POST /v1/score", "POST v1/score embed", "TRACE /x free", "POST /x cheap",
                    "POST /x/*/y free"):
            with self.subTest(bad=bad):
                with self.assertRaises(ConfigError) as caught:
                    Config.from_env({"EXTRA_ROUTES": bad}, [])
                self.assertIn("EXTRA_ROUTES", str(caught.exception))
        proc = subprocess.run([sys.executable, os.path.join(HERE, "llm_proxy.py")],
                              env={**os.environ, "EXTRA_ROUTES": "POST nowhere"},
                              capture_output=True, text=True, timeout=WAIT)
        self.assertEqual((proc.returncode, len(proc.stderr.strip().splitlines())), (2, 1))

    def test_conversation_ids_are_not_forwarded(self):
        """llama.cpp keeps a stream with a conversation id running after its client hangs up
        and lets anyone read it: the header never reaches it."""
        self.chat(headers={"X-Conversation-Id": "conv-1"}, stream=True)
        self.assertNotIn("x-conversation-id",
                         {k.lower() for k in self.upstream.requests[0][2]})

    def test_a_key_may_come_as_x_api_key_and_is_never_forwarded(self):
        self.restart(proxy_api_keys=("sk-mine",), base_api_key=UPSTREAM_KEY)
        status, headers, _ = self.chat(key=None, headers={"x-api-key": "sk-mine"})
        self.assertEqual((status, headers["x-ratelimit-remaining"]), (200, "9"))
        sent = {k.lower(): v for k, v in self.upstream.requests[0][2].items()}
        self.assertNotIn("x-api-key", sent)
        self.assertEqual(sent["authorization"], f"Bearer {UPSTREAM_KEY}")
        self.assertEqual(self.chat(key=None, headers={"x-api-key": "sk-other"})[0], 401)

    def test_base_model_answers_models_by_id(self):
        self.restart(base_model="served")
        status, _, body = self.request("GET", "/v1/models/served")
        self.assertEqual((status, json.loads(body)["id"]), (200, "served"))
        status, _, body = self.request("GET", "/v1/models/other")
        self.assert_openai_error(status, body, 404, "model_not_found")
        status, _, body = self.request("GET", "/api/tags")
        self.assertEqual([m["name"] for m in json.loads(body)["models"]], ["served:latest"])
        self.assertEqual(self.upstream.requests, [])


class AskTests(ProxyTestCase):
    """What a request may ask for is what it is charged for."""

    def setUp(self):
        super().setUp()
        self.restart(token_cost_mode="estimate", max_tokens=100_000, response_token_reserve=100)

    def cost(self, path="/v1/chat/completions", **fields):
        body = {**CHAT, **fields} if "chat" in path else {"model": "m", "prompt": "hello there",
                                                          **fields}
        before = self.remaining()
        status, _, answer = self.request("POST", path, body)
        self.assertEqual(status, 200, answer)
        return before - self.remaining(), json.loads(self.upstream.requests[-1][3])

    def test_types_and_ranges_are_refused_before_anything_is_charged(self):
        for fields in ({"stream": "true"}, {"stream": 1}, {"max_tokens": "99000"},
                       {"max_tokens": -1}, {"max_tokens": 1.5}, {"max_tokens": True},
                       {"max_completion_tokens": "5"}, {"n": 0}, {"n": 500}, {"n": "3"},
                       {"best_of": 2.0}, {"n_predict": -2}, {"max_output_tokens": []}):
            with self.subTest(fields=fields):
                status, _, body = self.chat(**fields)
                error = self.assert_openai_error(status, body, 400)
                self.assertEqual(error["param"], next(iter(fields)))
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.remaining(), 100_000)

    def test_the_reserve_is_the_largest_limit_times_every_answer(self):
        prompt = llm_proxy.prompt_estimate(CHAT)
        for fields, reserve in (({}, 100), ({"max_tokens": 7}, 7),
                                ({"max_tokens": 1, "n_predict": 200}, 200),
                                ({"max_completion_tokens": 30, "max_tokens": 10}, 30),
                                ({"n_predict": -1}, 100), ({"max_tokens": 5, "n": 3}, 15),
                                ({"max_tokens": 0}, 100)):  # 0 sets no limit (Ollama)
            with self.subTest(fields=fields):
                self.assertEqual(self.cost(**fields)[0], prompt + reserve)
        completion = {"model": "m", "prompt": "hello there"}
        prompt = llm_proxy.prompt_estimate(completion)
        self.assertEqual(self.cost("/v1/completions", max_tokens=4, n=2, best_of=5)[0],
                         prompt + 4 * 5)
        prompts = {"model": "m", "prompt": ["a", "b", "c"], "max_tokens": 4}
        before = self.remaining()
        self.request("POST", "/v1/completions", prompts)
        self.assertEqual(before - self.remaining(), llm_proxy.prompt_estimate(prompts) + 3 * 4)
        tokens = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4}  # one prompt as token ids
        before = self.remaining()
        self.request("POST", "/v1/completions", tokens)
        self.assertEqual(before - self.remaining(), 3 + 4)  # each id is a token

    def test_estimate_mode_forwards_the_reserve_as_every_limit(self):
        _, sent = self.cost(max_tokens=1, n_predict=200)
        self.assertEqual((sent["max_tokens"], sent["n_predict"]), (200, 200))
        _, sent = self.cost()
        self.assertEqual(sent["max_tokens"], 100)  # no limit of its own: the one charged for
        _, sent = self.cost(max_tokens=9)
        self.assertEqual(sent["max_tokens"], 9)
        raw = json.dumps({**CHAT, "max_tokens": 9, "max_completion_tokens": 9,
                          "n_predict": 9}).encode()  # every limit a server may read, set
        self.request("POST", "/v1/chat/completions", raw)
        self.assertEqual(self.upstream.requests[-1][3], raw)  # nothing to change: same bytes

    def test_request_mode_validates_and_forwards_untouched(self):
        self.restart()
        self.assertEqual(self.chat(stream="yes")[0], 400)
        raw = json.dumps({**CHAT, "n_predict": 500}).encode()
        self.request("POST", "/v1/chat/completions", raw)
        self.assertEqual(self.upstream.requests[-1][3], raw)
        self.assertEqual(self.remaining(), 9)


class UsageSettlementTests(ProxyTestCase):
    """Usage mode settles every answer a request asked for, and never below its reservation
    what could not be metered."""

    CAPACITY = 100_000

    def setUp(self):
        super().setUp()
        # (an answer without a limit of its own runs to the reserve: what is held is exact)
        self.restart(token_cost_mode="usage", max_tokens=self.CAPACITY,
                     response_token_reserve=50, max_output_tokens=50)

    def charged_for(self, body, scenario="", path="/v1/chat/completions"):
        before = self.remaining()
        status, headers, answer = self.request("POST", path, body,
                                               headers={"X-Fake-Scenario": scenario})
        self.assertEqual(status, 200)
        return before - self.remaining(), headers, answer

    def test_every_answer_of_n_is_settled(self):
        """llama.cpp reports the first answer's usage only when not streaming: the others are
        settled at the rate it counted the first."""
        body = {**CHAT, "n": 3}
        charged, _, answer = self.charged_for(body, "llamacpp-n")
        self.assertEqual(json.loads(answer)["usage"]["completion_tokens"], 2)  # answer 0 only
        self.assertEqual(charged, self.upstream.reported[-1])

    def test_usage_chunks_of_every_answer_are_added_up(self):
        """Streamed, llama.cpp sends one usage chunk per answer, each with the prompt: their
        completions are added up, not the last one kept, and the prompt counted once, as the
        server's own counters count it (the proxy asked for them, so none reaches the
        client)."""
        charged, _, answer = self.charged_for({**CHAT, "n": 3, "stream": True}, "llamacpp-n")
        self.assertEqual(charged, self.upstream.reported[-1])
        self.assertNotIn(b'"choices": [], "usage"', answer)

    def test_several_prompts_are_never_settled_as_one(self):
        """llama.cpp reports the first prompt's usage only: the other prompts, and the
        answers to them, are settled at the rate it counted the first."""
        prompts = ["a first prompt here, quite a long one indeed",
                   "a second one, also with some words in it",
                   "and a third prompt to finish the array"]
        body = {"model": "m", "prompt": prompts, "max_tokens": 20}
        charged, _, answer = self.charged_for(body, "llamacpp-n", path="/v1/completions")
        usage = json.loads(answer)["usage"]
        texts = [c["text"] for c in json.loads(answer)["choices"]]
        prompt = usage["prompt_tokens"] + sum(
            llm_proxy.prorated(usage["prompt_tokens"], len(prompts[0]), len(p))
            for p in prompts[1:])
        completion = usage["completion_tokens"] + sum(
            llm_proxy.prorated(usage["completion_tokens"], len(texts[0]), len(t))
            for t in texts[1:])
        self.assertGreater(prompt + completion, usage["total_tokens"])  # the case this is about
        self.assertEqual(charged, prompt + completion)

    def test_an_encoded_answer_keeps_its_reservation_and_reaches_the_client_untouched(self):
        charged, headers, answer = self.charged_for(CHAT, "gzip")
        reserved = llm_proxy.prompt_estimate(CHAT) + 50
        self.assertEqual(charged, reserved)
        self.assertEqual(headers["content-encoding"], "gzip")
        self.assertEqual(json.loads(gzip.decompress(answer))["object"], "chat.completion")

    def test_an_answer_too_long_to_meter_keeps_its_reservation(self):
        """Too long to keep, and no usage at its end either."""
        with unittest.mock.patch.object(llm_proxy, "MAX_METERED_BODY", 100):
            charged, _, answer = self.charged_for(CHAT, "big")
        self.assertGreater(len(answer), 100)
        self.assertEqual(charged, llm_proxy.prompt_estimate(CHAT) + 50)

    def test_a_refusal_costs_what_the_upstream_reports_else_nothing(self):
        before = self.remaining()
        status, _, _ = self.chat(headers={"X-Fake-Scenario": "status-400"})
        self.assertEqual((status, self.remaining()), (400, before))
