"""Real clients: the shell scripts with curl, the official openai package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import unittest


from tests.support import (
    CLIENT_KEY, HERE, ProxyTestCase, WAIT)

try:
    import openai
except ImportError:  # the real-client tests are skipped
    openai = None


class ScriptTests(ProxyTestCase):
    def start_script(self, **env):
        env = {**os.environ, "PORT": "0", "HOST": "127.0.0.1", "BASE_API_URL": self.upstream.url,
               **env}
        proc = subprocess.Popen(["sh", os.path.join(HERE, "run_local_proxy.sh")], env=env,
                                stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.wait, WAIT)
        self.addCleanup(proc.terminate)
        first = proc.stderr.readline()
        self.assertIn("listening on http://127.0.0.1:", first)
        return proc, int(first.rsplit(":", 1)[1])

    def test_run_script_starts_the_proxy_with_overrides(self):
        proc, port = self.start_script(MAX_TOKENS="3", UPSTREAM_MODEL="from-alias")
        self.assertIn("buckets: 3 tokens", proc.stderr.readline() + proc.stderr.readline())
        proxy = type("P", (), {"server_address": ("127.0.0.1", port)})
        status, _, body = self.request("GET", "/v1/models", proxy=proxy)
        self.assertEqual([m["id"] for m in json.loads(body)["data"]], ["from-alias"])

    @unittest.skipIf(shutil.which("curl") is None, "curl is not installed")
    def test_curl_script_sends_the_smoke_request_and_shows_headers(self):
        for stream in ("0", "1"):
            with self.subTest(stream=stream):
                env = {**os.environ, "PROXY_URL": f"http://127.0.0.1:{self.proxy.server_address[1]}",
                       "STREAM": stream, "PROMPT": 'say "hi" \\ please'}
                out = subprocess.run(["sh", os.path.join(HERE, "curl_local_proxy.sh")], env=env,
                                     capture_output=True, text=True, timeout=WAIT).stdout
                self.assertTrue(out.startswith("HTTP/1.1 200 OK"), out)
                self.assertIn("X-RateLimit-Remaining:", out)
                self.assertIn("proxy ok" if stream == "0" else "data: [DONE]", out)
        sent = json.loads(self.upstream.requests[0][3])
        self.assertEqual(sent["messages"][0]["content"], 'say "hi" \\ please')
        self.assertEqual(sent["max_tokens"], 16)


@unittest.skipIf(openai is None, "the official openai package is not installed")
class OpenAIClientTests(ProxyTestCase):
    def client(self, key=CLIENT_KEY, max_retries=0):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.proxy.server_address[1]}/v1",
                             api_key=key, max_retries=max_retries, timeout=WAIT)

    def test_chat_stream_models_embeddings(self):
        client = self.client()
        answer = client.chat.completions.create(
            model="fake-a", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(answer.choices[0].message.content, "proxy ok")
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="fake-a", messages=[{"role": "user", "content": "hi"}], stream=True)]
        self.assertEqual("".join(pieces), "Hello world")
        self.assertEqual([m.id for m in client.models.list()], ["fake-a", "fake-b"])
        embedding = client.embeddings.create(model="e", input="hello")
        self.assertEqual(embedding.data[0].embedding, [0.1, 0.2, 0.3])
        completion_ = client.completions.create(model="fake-a", prompt="hi")
        self.assertEqual(completion_.choices[0].text, "proxy ok")

    def test_limit_message_in_both_shapes(self):
        client = self.client()
        for _ in range(10):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        answer = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}])
        self.assertEqual(answer.choices[0].message.content, "limit reached, wait 5 min")
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True,
            stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, "limit reached, wait 5 min")
        self.assertEqual(chunks[-1].usage.total_tokens, 0)

    def test_rate_limit_error_in_429_mode(self):
        self.restart(limit_response="429")
        client = self.client()
        for _ in range(10):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        with self.assertRaises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        self.assertEqual(caught.exception.code, "rate_limit_exceeded")
        self.assertEqual(caught.exception.response.headers["retry-after"], "300")

    def test_sdk_retries_then_gets_the_limit_when_retry_after_is_short(self):
        self.restart(limit_response="429", refill_interval_seconds=1)
        client = self.client()
        for _ in range(10):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        # The injected clock never moves, so the SDK's retry (after waiting Retry-After: 1 s)
        # is refused too: one retry, two 429s in all, both logged.
        with self.assertRaises(openai.RateLimitError):
            self.client(max_retries=1).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}])
        self.assertTrue(self.log.wait_for(lambda text: text.count('" 429 ') == 2))

    def test_authentication_error(self):
        self.restart(proxy_api_keys=("good",))
        with self.assertRaises(openai.AuthenticationError):
            self.client(key="bad").models.list()

    def test_stream_error_event_raises_api_error(self):
        self.restart(read_timeout=0.5)
        stream = self.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True,
            extra_headers={"X-Fake-Scenario": "stall"})
        with self.assertRaises(openai.APIError):
            for _ in stream:
                pass
