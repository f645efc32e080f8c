"""The upstream reads what the proxy read (issue 20, items 1 and 2): keys that a server matching
them without regard to case (Go's encoding/json, Ollama) would read differently are refused, an
answer is metered as what it is, and estimate mode caps every output limit a server may read."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import unittest

import llm_proxy
from tests.support import (
    CLIENT_KEY, ProxyTestCase, fake_prompt_tokens, scenario)

CHAT = {"model": "fake-a", "messages": [{"role": "user", "content": "hello there"}]}
MESSAGE = {"model": "claude-x", "max_tokens": 20,
           "messages": [{"role": "user", "content": "hello there"}]}
OLLAMA_CHAT = {"model": "fake-a", "messages": [{"role": "user", "content": "hello there"}],
               "stream": False}
SMALL_ONLY = "sk-small-only"


@scenario("stream-anyway")
def _stream_anyway(h, path, request):
    """A server that streams whatever the request says (one that read "stream" differently,
    or streams by default), with its usage (OpenAI: the include_usage chunk)."""
    h.stream(path, {**request, "stream": True, "stream_options": {"include_usage": True}})


@scenario("plain-anyway")
def _plain_anyway(h, path, request):
    """A server that answers with one plain body whatever the request says."""
    h.answer(path, {**request, "stream": False})


def raw_json(*pairs):
    """A JSON object with exactly these (key, value) pairs, in order, repeats kept."""
    return ("{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs)
            + "}").encode()


class GuaranteeCase(ProxyTestCase):
    def post(self, path, body, scenario="", key=CLIENT_KEY):
        return self.request("POST", path, body, key=key,
                            headers={"X-Fake-Scenario": scenario} if scenario else None)

    def charged(self, path, body, scenario=""):
        """(tokens taken from the bucket, the answer's status, its body)."""
        before = self.remaining()
        status, _, answer = self.post(path, body, scenario)
        return before - self.remaining(), status, answer

    def sent(self):
        return json.loads(self.upstream.requests[-1][3])

    def assert_refused(self, status, answer, api):
        """A 400 in the door's API shape that says which key."""
        self.assertEqual(status, 400, answer)
        error = json.loads(answer)
        if api == "openai":
            self.assertEqual(error["error"]["code"], "ambiguous_key")
            self.assertEqual(error["error"]["type"], "invalid_request_error")
        elif api == "anthropic":
            self.assertEqual((error["type"], error["error"]["type"]),
                             ("error", "invalid_request_error"))
        else:
            self.assertEqual(set(error), {"error"})
        self.assertIn("once", json.dumps(error))


class AmbiguousKeyTests(GuaranteeCase):
    """A key the proxy reads one way and Ollama another is refused, nothing charged."""

    def setUp(self):
        super().setUp()
        self.restart(token_cost_mode="estimate", max_tokens=100_000, response_token_reserve=100)

    def assert_all_refused(self, cases):
        for path, body, api in cases:
            with self.subTest(path=path, body=body):
                status, _, answer = self.post(path, body)
                self.assert_refused(status, answer, api)
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.remaining(), 100_000)

    def test_a_case_variant_of_a_field_the_proxy_reads_is_refused_on_every_door(self):
        chat = [("model", "fake-a"), ("messages", CHAT["messages"])]
        message = [("model", "claude-x"), ("messages", MESSAGE["messages"])]
        self.assert_all_refused([
            ("/v1/chat/completions", raw_json(*chat, ("max_tokens", 1), ("MAX_TOKENS", 0)),
             "openai"),
            ("/v1/chat/completions", raw_json(*chat, ("max_to\u212aens", 0)), "openai"),
            ("/v1/chat/completions", raw_json(*chat, ("\u017ftream", True)), "openai"),
            ("/v1/chat/completions", raw_json(*chat, ("stream", True), (
                "stream_options", {"include_usage": True, "Include_Usage": False})), "openai"),
            ("/v1/completions", raw_json(("model", "m"), ("prompt", "hi"), ("N", 50)), "openai"),
            ("/v1/responses", raw_json(("model", "m"), ("input", "hi"),
                                       ("Max_Output_Tokens", 0)), "openai"),
            ("/v1/embeddings", raw_json(("model", "e"), ("input", "x"), ("Input", "y" * 99)),
             "openai"),
            ("/v1/messages", raw_json(*message, ("max_tokens", 1), ("Max_Tokens", 0)),
             "anthropic"),
            ("/api/chat", raw_json(*chat, ("options", {"num_predict": 1}),
                                   ("Options", {"num_predict": 0})), "ollama"),
            ("/api/generate", raw_json(("model", "fake-a"), ("prompt", "hi"),
                                       ("options", {"num_predict": 1, "NUM_PREDICT": 0})),
             "ollama"),
        ])

    def test_a_key_sent_twice_is_refused_at_any_depth(self):
        """Two maps of one name merge in Go: {"options": {"num_predict": 1}, "options":
        {...}} is neither of them."""
        chat = [("model", "fake-a"), ("messages", CHAT["messages"])]
        self.assert_all_refused([
            ("/v1/chat/completions", raw_json(*chat, ("max_tokens", 1), ("max_tokens", 0)),
             "openai"),
            ("/v1/chat/completions", b'{"model": "fake-a", "messages": [{"role": "user", '
             b'"content": "a", "content": "b"}], "max_tokens": 1}', "openai"),
            ("/v1/messages", raw_json(("model", "claude-x"), ("max_tokens", 1),
                                      ("messages", MESSAGE["messages"]), ("max_tokens", 0)),
             "anthropic"),
            ("/api/chat", raw_json(*chat, ("options", {"num_predict": 1}),
                                   ("options", {"temperature": 0})), "ollama"),
        ])

    def test_only_variants_of_read_fields_are_refused(self):
        """Keys the proxy does not read (and their case variants) pass as they are."""
        status, _, answer = self.post("/v1/chat/completions", raw_json(
            ("model", "fake-a"), ("messages", CHAT["messages"]), ("temperature", 0.1),
            ("Temperature", 0.2), ("max_tokens", 5)))
        self.assertEqual(status, 200, answer)
        self.assertEqual(self.sent()["Temperature"], 0.2)
        status, answer = self.post("/v1/chat/completions", raw_json(
            ("model", "fake-a"), ("messages", CHAT["messages"]), ("MAX_TOKENS", 0)))[::2]
        self.assert_refused(status, answer, "openai")

    def test_every_letter_whose_simple_fold_is_ascii_is_folded(self):
        """The fold table holds every non-ASCII letter that Unicode's simple case folding
        (Go's) maps to an ASCII letter: the Kelvin sign and the long s."""
        folds = {chr(c): chr(c).casefold() for c in range(0x80, sys.maxunicode + 1)
                 if len(chr(c).casefold()) == 1 and chr(c).casefold().isascii()}
        self.assertEqual(folds, {"\u212a": "k", "\u017f": "s"})
        for letter, ascii_letter in folds.items():
            self.assertEqual(llm_proxy.folded_key("max_to" + letter + "ens".upper()),
                             "max_to" + ascii_letter + "ens")
        self.assertEqual(llm_proxy.folded_key("\u0130nput"), "i\u0307nput")  # not "input"


class ModelPolicyTests(GuaranteeCase):
    """A key limited to some models cannot run another through a case variant of "model"."""

    def setUp(self):
        super().setUp()
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        self.keys_file = os.path.join(folder, "keys.json")
        with open(self.keys_file, "w") as f:
            json.dump({"keys": [{"name": "small", "key": SMALL_ONLY, "models": ["small"]}]}, f)
        self.restart(keys_file=self.keys_file)

    def test_a_second_model_key_is_refused_whatever_the_route(self):
        for settings in ({}, {"base_model": "small"}):
            self.restart(keys_file=self.keys_file, **settings)
            for path, body, api in (
                    ("/v1/chat/completions", raw_json(("model", "small"), (
                        "messages", CHAT["messages"]), ("Model", "big-70b")), "openai"),
                    ("/v1/chat/completions", raw_json(("model", "small"), (
                        "messages", CHAT["messages"]), ("MODEL", "big-70b")), "openai"),
                    ("/v1/messages", raw_json(("model", "small"), ("max_tokens", 5), (
                        "messages", MESSAGE["messages"]), ("Model", "big-70b")), "anthropic"),
                    ("/api/chat", raw_json(("model", "small"), ("messages", CHAT["messages"]),
                                           ("Model", "big-70b")), "ollama"),
                    ("/api/show", raw_json(("model", "small"), ("Model", "big-70b")),
                     "ollama"),  # not charged, but its model is policed
                    ("/v1/messages/count_tokens", raw_json(("model", "small"), (
                        "messages", MESSAGE["messages"]), ("model", "big-70b")), "anthropic")):
                with self.subTest(settings=settings, path=path):
                    status, _, answer = self.post(path, body, key=SMALL_ONLY)
                    self.assert_refused(status, answer, api)
        self.assertEqual(self.upstream.requests, [])
        status, _, _ = self.post("/api/show", {"model": "small"}, key=SMALL_ONLY)
        self.assertEqual(status, 200)


class MeteredAsItCameTests(GuaranteeCase):
    """Usage mode: an answer is metered as what it is (an event stream, lines of JSON, or one
    body), whatever the request asked for, and settled by the usage it carries."""

    def setUp(self):
        super().setUp()
        self.restart(token_cost_mode="usage", max_tokens=100_000, response_token_reserve=500)

    def test_a_stream_answering_a_plain_request_is_settled_by_its_usage(self):
        for path, body in (("/v1/chat/completions", {**CHAT, "stream": False}),
                           ("/v1/completions", {"model": "m", "prompt": "hi"}),
                           ("/v1/messages", {**MESSAGE, "max_tokens": 500}),
                           ("/api/chat", OLLAMA_CHAT),
                           ("/api/generate", {"model": "fake-a", "prompt": "hi",
                                              "stream": False})):
            with self.subTest(path=path):
                charged, status, answer = self.charged(path, body, "stream-anyway")
                self.assertEqual(status, 200, answer)
                self.assertEqual(charged, self.upstream.reported[-1])
                self.assertEqual(charged, fake_prompt_tokens(body) + 3)

    def test_a_plain_body_answering_a_stream_is_settled_by_its_usage(self):
        for path, body in (("/v1/chat/completions", {**CHAT, "stream": True}),
                           ("/v1/responses", {"model": "m", "input": "hi", "stream": True}),
                           ("/v1/messages", {**MESSAGE, "max_tokens": 500, "stream": True}),
                           ("/api/chat", {**OLLAMA_CHAT, "stream": True})):
            with self.subTest(path=path):
                charged, status, answer = self.charged(path, body, "plain-anyway")
                self.assertEqual(status, 200, answer)
                self.assertEqual(charged, self.upstream.reported[-1])
                self.assertEqual(charged, fake_prompt_tokens(body) + 2)


class EstimateCapTests(GuaranteeCase):
    """Estimate mode writes the limit charged for into every output limit a server of the
    route's API may read; 0 sets no limit (the default is reserved and written)."""

    RESERVE = 100

    def setUp(self):
        super().setUp()
        self.restart(token_cost_mode="estimate", max_tokens=100_000,
                     response_token_reserve=self.RESERVE)

    def test_every_limit_a_server_may_read_is_the_one_charged_for(self):
        openai = ("max_tokens", "max_completion_tokens", "n_predict")
        completion = {"model": "m", "prompt": "hello there"}
        responses = {"model": "m", "input": "hello there"}
        for path, body, reserve, fields in (
                ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 100, openai),
                ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 1}, 1, openai),
                ("/v1/chat/completions", {**CHAT, "n_predict": 1}, 1, openai),
                ("/v1/chat/completions", {**CHAT, "n_predict": -1}, 100, openai),
                ("/v1/chat/completions", {**CHAT, "max_tokens": 0, "n_predict": 7}, 7, openai),
                ("/v1/chat/completions", {**CHAT, "max_output_tokens": 3}, 3,
                 openai + ("max_output_tokens",)),
                ("/v1/completions", {**completion, "max_tokens": 0}, 100, openai),
                ("/v1/completions", {**completion, "n_predict": 2}, 2, openai),
                ("/v1/responses", {**responses, "max_tokens": 1}, 1,
                 openai + ("max_output_tokens",)),
                ("/v1/responses", {**responses, "max_output_tokens": 0}, 100,
                 openai + ("max_output_tokens",)),
                ("/v1/messages", {**MESSAGE, "max_tokens": 0}, 100, ("max_tokens",)),
                ("/api/chat", {**OLLAMA_CHAT, "options": {"num_predict": 0}}, 100, ())):
            with self.subTest(path=path, body=body):
                charged, status, answer = self.charged(path, body)
                self.assertEqual(status, 200, answer)
                self.assertEqual(charged, llm_proxy.prompt_estimate(body) + reserve)
                sent = self.sent()
                self.assertEqual({f: sent.get(f) for f in fields},
                                 {f: reserve for f in fields})
                if path.startswith("/api/"):
                    self.assertEqual(sent["options"]["num_predict"], reserve)


if __name__ == "__main__":
    unittest.main()
