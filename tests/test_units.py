"""Pure pieces tested without HTTP: settings, pricing, paths, limit texts, keys."""

from __future__ import annotations

import os
import subprocess
import sys
import unittest
from http import HTTPStatus
from llm_proxy import ConfigError
from llm_proxy import ProxyError
from llm_proxy import estimate_cost
from llm_proxy import normalize_path
import llm_proxy

from tests.support import (
    Config, HERE, WAIT)


class ConfigTests(unittest.TestCase):
    def test_defaults(self):
        config = Config.from_env({}, [])
        self.assertEqual(config, Config())
        self.assertEqual((config.host, config.port), ("0.0.0.0", 8899))
        self.assertEqual(config.base_api_url, "http://127.0.0.1:11434/v1")

    def test_environment_aliases_and_flags(self):
        env = {"UPSTREAM_BASE_URL": "https://llm.example:8443/v1/", "UPSTREAM_API_KEY": "k",
               "UPSTREAM_MODEL": "m", "MAX_TOKENS": "50", "PROXY_API_KEYS": " a, b ,,",
               "LIMIT_RESPONSE": "429", "TRUST_FORWARDED_FOR": "1", "READ_TIMEOUT": "2.5"}
        config = Config.from_env(env, ["--max-tokens", "60", "--token-cost-mode", "estimate"])
        self.assertEqual(config.base_api_url, "https://llm.example:8443/v1")
        self.assertEqual((config.base_api_key, config.base_model), ("k", "m"))
        self.assertEqual(config.max_tokens, 60)  # the flag wins over the environment
        self.assertEqual(config.proxy_api_keys, ("a", "b"))
        self.assertEqual(config.limit_response, "429")
        self.assertEqual(config.token_cost_mode, "estimate")
        self.assertTrue(config.trust_forwarded_for)
        self.assertEqual(config.read_timeout, 2.5)
        # the primary name wins over its alias
        self.assertEqual(Config.from_env({"BASE_API_URL": "http://a/v1",
                                          "UPSTREAM_BASE_URL": "http://b/v1"}, []).base_api_url,
                         "http://a/v1")

    def test_invalid_values_name_the_variable(self):
        cases = {
            "MAX_TOKENS": "ten", "REFILL_TOKENS": "0", "REFILL_INTERVAL_SECONDS": "-5",
            "REQUEST_TOKEN_COST": "1.5", "TOKEN_COST_MODE": "tokens", "LIMIT_RESPONSE": "418",
            "BASE_API_URL": "ftp://host/v1", "PORT": "70000", "OPEN_TIMEOUT": "nan",
            "MAX_BODY_BYTES": "0", "TRUST_FORWARDED_FOR": "maybe", "RESPONSE_TOKEN_RESERVE": "-1",
            "BASE_API_KEY": "sk-abc\r\nX-Injected: 1",
        }
        for name, value in cases.items():
            with self.subTest(name=name):
                with self.assertRaises(ConfigError) as caught:
                    Config.from_env({name: value}, [])
                self.assertIn(name, str(caught.exception))

    def test_bad_config_exits_2_with_one_line(self):
        for env, argv in (({"MAX_TOKENS": "x"}, []), ({}, ["--no-such-flag"]),
                          ({"BASE_API_URL": "localhost:11434"}, [])):
            with self.subTest(env=env, argv=argv):
                proc = subprocess.run([sys.executable, os.path.join(HERE, "llm_proxy.py"), *argv],
                                      env={**os.environ, **env}, capture_output=True, text=True,
                                      timeout=WAIT)
                self.assertEqual(proc.returncode, 2)
                self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
                self.assertNotIn("Traceback", proc.stderr)

    def test_help_lists_every_setting_with_its_default(self):
        text = llm_proxy.build_arg_parser().format_help()
        for setting in llm_proxy.SETTINGS:
            self.assertIn(setting.flag, text)
            self.assertIn(setting.env, text)
        self.assertIn("default 8899", text)

    def test_estimate_mode_warns_when_bucket_is_below_reserve(self):
        self.assertEqual(Config().warnings(), [])
        warnings = Config(token_cost_mode="estimate", max_tokens=10).warnings()
        self.assertEqual(len(warnings), 1)
        self.assertIn("RESPONSE_TOKEN_RESERVE", warnings[0])


class CostTests(unittest.TestCase):
    def test_estimate_formula(self):
        body = {"model": "a-very-long-model-name-that-is-not-counted",
                "messages": [{"role": "user", "content": "12345678"}]}
        # strings: "user", "12345678" -> "user 12345678" = 13 bytes: at most 13 tokens
        self.assertEqual(estimate_cost(body, 256), 13 + 256)

    def test_reserve_precedence(self):
        base = {"prompt": "abcd"}  # 4 bytes: at most 4 tokens
        cases = [
            ({"max_completion_tokens": 10, "max_tokens": 20}, 4 + 10),
            ({"max_tokens": 20}, 4 + 20),
            ({"max_completion_tokens": -1, "max_tokens": 20}, 4 + 20),
            ({"max_completion_tokens": 2.5}, 4 + 256),
            ({"max_tokens": True}, 4 + 256),
            ({"max_tokens": "16"}, 4 + 256 + 3),  # a string is counted as text, not as R
            ({"max_tokens": 0}, 4),
            ({}, 4 + 256),
        ]
        for extra, expected in cases:
            with self.subTest(extra=extra):
                self.assertEqual(estimate_cost({**base, **extra}, 256), expected)

    def test_at_least_one(self):
        self.assertEqual(estimate_cost({}, 0), 1)

    def test_nested_model_keys_are_skipped_and_deep_nesting_is_safe(self):
        body = {"a": {"model": "xxxxxxxxxxxxxxxxxxxx", "b": ["abcd", {"c": "efgh"}]}}
        self.assertEqual(estimate_cost(body, 0), 9)  # "abcd efgh": 9 bytes
        deep: object = "abcd"
        for _ in range(100_000):
            deep = [deep]
        self.assertEqual(estimate_cost({"x": deep}, 0), 4)

    def test_request_mode(self):
        self.assertEqual(llm_proxy.request_cost({"prompt": "x" * 1000},
                                                Config(request_token_cost=3).default_policy), 3)


class PathTests(unittest.TestCase):
    def test_spellings_normalise_to_one_route(self):
        for target in ["/v1/chat/completions", "/v1/chat/completions/", "//v1//chat/completions",
                       "/v1/chat/%63ompletions", "/v1/./chat/completions",
                       "/v1/models/../chat/completions", "/v1/chat/completions?x=1",
                       "/v1/chat/completions%2F", "/v1/chat/completions#frag",
                       "http://proxy:8899/v1/chat/completions", "/../v1/chat/completions"]:
            with self.subTest(target=target):
                self.assertEqual(normalize_path(target)[0], "/v1/chat/completions")

    def test_query_is_kept(self):
        self.assertEqual(normalize_path("/v1/models?limit=2"), ("/v1/models", "limit=2"))

    def test_invalid_targets(self):
        for target in ["*", "v1/models", "/v1/%ff", "/v1/a%00b", "/v1\\chat", "/v1/%5cchat",
                       "/v1/models?a=\x7f", "/v1/models?a=\x01", "/v1/a%7fb"]:
            with self.subTest(target=target):
                with self.assertRaises(ProxyError) as caught:
                    normalize_path(target)
                self.assertEqual(caught.exception.status, HTTPStatus.BAD_REQUEST)

    def test_upstream_path_replaces_v1_with_the_base_path(self):
        upstream = llm_proxy.Upstream.from_url("http://h:1/openai/v1")
        self.assertEqual(upstream.path_for("/v1/chat/completions", "a=1"),
                         "/openai/v1/chat/completions?a=1")
        self.assertEqual(upstream.path_for("/v1/files/a b", ""), "/openai/v1/files/a%20b")


class LimitTextTests(unittest.TestCase):
    def test_wait_text(self):
        for seconds, text in [(0.2, "1 s"), (59, "59 s"), (59.5, "1 min"), (60, "1 min"),
                              (61, "2 min"), (300, "5 min"), (299.1, "5 min")]:
            with self.subTest(seconds=seconds):
                self.assertEqual(llm_proxy.wait_text(seconds), text)

    def test_retry_headers(self):
        self.assertEqual(dict(llm_proxy.retry_headers(9.2)),
                         {"Retry-After": "10", "retry-after-ms": "9200"})
        self.assertEqual(dict(llm_proxy.retry_headers(300))["x-should-retry"], "false")


class KeyRingTests(unittest.TestCase):
    def test_accepts_only_listed_keys(self):
        ring = llm_proxy.load_key_ring(Config(proxy_api_keys=("alpha", "beta")))
        self.assertIsNotNone(ring.lookup("alpha"))
        self.assertIsNotNone(ring.lookup("beta"))
        for wrong in ["", "alph", "alphaa", "ALPHA", "gamma"]:
            self.assertIsNone(ring.lookup(wrong))
        self.assertFalse(llm_proxy.load_key_ring(Config()))
