"""The house in order (issue 21): rules that keep one home for each thing."""

from __future__ import annotations

import ast
import json
import os
import unittest

from tests.support import ProxyTestCase

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(HERE, "llm_proxy.py")
PATH_PREFIXES = ("/v1", "/api", "/admin", "/usage", "/ui/", "/health", "/metrics")


def _section_lines(lines: list[str], name: str) -> range:
    """The lines (1-based) of the banner section `name`, up to the next banner."""
    banners = [i for i, line in enumerate(lines, 1) if line.startswith("# ####")]
    start = next(i for i in banners if line_name(lines[i - 1]) == name)
    end = next((i for i in banners if i > start), len(lines) + 1)
    return range(start, end)


def line_name(banner: str) -> str:
    return banner.strip("# ").strip()


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


class RouteTableTests(unittest.TestCase):

    def test_no_path_literal_outside_the_route_table(self):
        """The route row is the only thing that knows a path: no string that starts like a
        path the proxy serves appears outside the routes section (docstrings aside)."""
        with open(SOURCE, encoding="utf-8") as f:
            text = f.read()
        lines = text.splitlines()
        routes = _section_lines(lines, "routes")
        tree = ast.parse(text)
        docstrings = _docstrings(tree)
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docstrings and node.value.startswith(PATH_PREFIXES) \
                    and node.lineno not in routes:
                found.append(f"line {node.lineno}: {node.value[:40]!r}")
        self.assertEqual(found, [])

    def test_every_forwarded_row_names_its_endpoint(self):
        import llm_proxy
        for row in llm_proxy.DEFAULT_ROUTES:
            with self.subTest(path=row.path):
                if row.kind in (llm_proxy.LOCAL, llm_proxy.ADMIN):
                    self.assertEqual(bool(row.asset), row.answer == "page")
                else:
                    self.assertTrue(row.endpoint)
                    self.assertNotEqual(row.endpoint, llm_proxy.EXTRA)

    def test_an_extra_row_is_an_extra_endpoint(self):
        import llm_proxy
        row = llm_proxy.extra_route("POST", "/api/other", "generate")
        self.assertEqual((row.endpoint, row.api), (llm_proxy.EXTRA, llm_proxy.OLLAMA))
        self.assertFalse(row.message_limit)


class CheckedConfigTests(unittest.TestCase):
    """Config is a frozen dataclass whose fields are checked by their SETTINGS rows."""

    def test_a_string_is_read_as_the_settings_text(self):
        from llm_proxy import Config
        self.assertEqual(Config(proxy_api_keys="sk-abc").proxy_api_keys, ("sk-abc",))
        self.assertEqual(Config(proxy_api_keys="sk-a, sk-b").proxy_api_keys, ("sk-a", "sk-b"))
        self.assertEqual(Config(port="0").port, 0)
        self.assertEqual(Config(token_cost_mode="USAGE").token_cost_mode, "usage")

    def test_a_value_the_setting_would_not_read_is_refused(self):
        from llm_proxy import Config, ConfigError
        for field, value in (("proxy_api_keys", ["sk-a"]), ("proxy_api_keys", ("a,b",)),
                             ("max_tokens", 0), ("max_tokens", 2.5), ("max_tokens", True),
                             ("port", 70000), ("send_timeout", -1), ("host", "999.1.1.1"),
                             ("token_cost_mode", "free"), ("base_api_url", "ftp://x"),
                             ("tokens_per_day", 0), ("fair_queue", "maybe"),
                             ("extra_routes", (("POST", "/v1/chat/completions", "free"),))):
            with self.subTest(field=field, value=value), self.assertRaises(ConfigError) as c:
                Config(**{field: value})
            self.assertIn(field.upper(), str(c.exception))

    def test_typed_values_are_kept(self):
        from llm_proxy import Config
        config = Config(max_tokens=3, send_timeout=1, fair_queue=False, tokens_per_day=None,
                        proxy_api_keys=("k",), extra_routes=(("POST", "/v1/x", "free"),))
        self.assertEqual((config.max_tokens, config.send_timeout, config.fair_queue,
                          config.tokens_per_day, config.proxy_api_keys, config.extra_routes),
                         (3, 1.0, False, None, ("k",), (("POST", "/v1/x", "free"),)))
        self.assertIsInstance(config.send_timeout, float)
        with self.assertRaises(AttributeError):
            config.max_tokens = 4  # type: ignore[misc]  # (frozen)

    def test_the_fields_are_the_settings_rows(self):
        import dataclasses
        import llm_proxy
        self.assertEqual([f.name for f in dataclasses.fields(llm_proxy.Config)],
                         [s.field for s in llm_proxy.SETTINGS])
        for setting in llm_proxy.SETTINGS:
            with self.subTest(setting=setting.env):
                self.assertEqual(getattr(llm_proxy.Config(), setting.field),
                                 setting.parse(setting.env, setting.default))


class ChunkedRequestBodyTests(ProxyTestCase):
    """A chunked request body is decoded by BodyReader, the one chunked decoder: extensions
    and trailers dropped, a request pipelined after it left for the next turn, bad framing 400,
    a chunk announced beyond MAX_BODY_BYTES 413 before its data is read."""

    BODY = json.dumps({"model": "fake-a", "messages": [{"role": "user", "content": "hi"}]})

    def chunked(self, chunks: bytes, close: bool = False) -> bytes:
        return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k"
                b"\r\nTransfer-Encoding: chunked\r\n%s\r\n%s"
                % (b"Connection: close\r\n" if close else b"", chunks))

    def test_extensions_trailers_and_a_pipelined_request(self):
        body = self.BODY.encode()
        first = self.chunked(b"5;name=value\r\n%s\r\n%x\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n"
                             % (body[:5], len(body) - 5, body[5:]))
        second = self.chunked(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body), close=True)
        answer = self.raw(first + second)
        self.assertEqual(answer.count(b"HTTP/1.1 200 OK"), 2, answer)
        self.assertEqual([r[3] for r in self.upstream.requests], [body, body])

    def test_bad_framing_is_a_400(self):
        for chunks in (b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabcXY0\r\n\r\n",
                       b"%s\r\n" % (b"1" * 2000)):
            with self.subTest(chunks=chunks[:20]):
                answer = self.raw(self.chunked(chunks))
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)

    def test_a_chunk_beyond_the_limit_is_a_413_before_its_data(self):
        self.restart(max_body_bytes=1000)
        answer = self.raw(self.chunked(b"3e9\r\n"))  # 1001 bytes announced, none sent
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)


if __name__ == "__main__":
    unittest.main()
