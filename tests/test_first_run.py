"""A first run that says what it found: at start-up the proxy asks the upstream for its models
(GET {BASE_API_URL}/models, in the background) and logs one line, reachable with its models or
not answering with what to check; the dashboard's data and its upstream card show the same."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import unittest

import llm_proxy
from llm_proxy import UpstreamFinding

from tests.support import HERE, ProxyTestCase, WAIT, free_port, wait_until

try:
    from tests.browser import Browser, find_chromium
except ImportError:  # (a platform without fcntl)
    Browser, find_chromium = None, lambda: None
CHROMIUM = find_chromium()
NOT_ANSWERING_HINT = "is the model server running, and is BASE_API_URL right?"


class FirstRunTests(ProxyTestCase):
    def checked(self, expected):
        """Ask the upstream, as main() does, and wait for the line that contains `expected`."""
        self.proxy.check_upstream()
        self.assertTrue(self.log.wait_for(lambda text: expected in text), self.log.getvalue())
        return [line for line in self.log.getvalue().splitlines() if expected in line][0]

    def overview(self):
        status, _, body = self.request("GET", "/admin/overview", key=None)
        self.assertEqual(status, 200, body)
        return json.loads(body)["upstream"]

    def test_an_upstream_that_answers_is_named_with_its_models(self):
        line = self.checked("answers with")
        self.assertTrue(line.endswith(f"upstream {self.upstream.url} answers with 2 models "
                                      "(fake-a, fake-b)"), line)
        self.assertEqual(self.upstream.paths(), ["/v1/models"])

    def test_a_refused_port_is_said_as_not_answering_with_what_to_check(self):
        url = f"http://127.0.0.1:{free_port()}/v1"
        self.restart(base_api_url=url)
        line = self.checked("not answering")
        self.assertTrue(line.endswith(f"upstream {url} is not answering (Connection refused): "
                                      + NOT_ANSWERING_HINT), line)

    def test_an_upstream_that_never_answers_holds_up_nothing(self):
        """The start goes on and requests are served while the upstream keeps the probe
        waiting; the probe gives up after OPEN_TIMEOUT."""
        silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never reads
        self.addCleanup(silent.close)
        self.restart(base_api_url=f"http://127.0.0.1:{silent.getsockname()[1]}/v1",
                     open_timeout=0.5)
        self.proxy.check_upstream()
        self.assertEqual(self.request("GET", "/health")[0], 200)
        self.assertNotIn("upstream", self.log.getvalue().replace("/health", ""))
        self.assertTrue(self.log.wait_for(lambda text: "not answering" in text))
        self.assertIn("is not answering (no answer within 0.5 s): " + NOT_ANSWERING_HINT,
                      self.log.getvalue())

    def test_a_wrong_path_and_a_wrong_key_name_the_setting_to_check(self):
        self.restart(base_api_url=self.upstream.root_url + "/v2")
        line = self.checked("answers, but")
        self.assertTrue(line.endswith("answers, but GET /v2/models answered 404 Not Found: is "
                                      "BASE_API_URL right (it ends with the API's /v1)?"), line)
        finding = UpstreamFinding("http://u/v1", True, None, "GET /v1/models answered 401 "
                                  "Unauthorized", llm_proxy.PROBE_HINTS[401])
        self.assertEqual(finding.line(), "upstream http://u/v1 answers, but GET /v1/models "
                                         "answered 401 Unauthorized: is BASE_API_KEY right?")

    def test_the_upstream_key_is_sent_and_never_logged(self):
        self.restart(base_api_key="sk-upstream-SECRET")
        self.checked("answers with")
        self.assertEqual(self.upstream.requests[0][2]["Authorization"], "Bearer sk-upstream-SECRET")
        self.assertNotIn("SECRET", self.log.getvalue())

    def test_the_overview_shows_the_same_and_asks_again_when_it_is_old(self):
        self.assertIsNone(self.overview()["probe"])  # never asked: nothing to show, nothing sent
        self.assertEqual(self.upstream.requests, [])
        self.checked("answers with")
        self.assertEqual(self.overview()["probe"], {
            "answering": True, "model_count": 2, "models": ["fake-a", "fake-b"],
            "problem": None, "hint": None, "checked_seconds_ago": 0.0})
        self.assertEqual(self.upstream.paths(), ["/v1/models"])  # a fresh finding is kept
        self.clock.advance(llm_proxy.PROBE_REFRESH_SECONDS)
        self.assertEqual(self.overview()["probe"]["checked_seconds_ago"],
                         llm_proxy.PROBE_REFRESH_SECONDS)  # the old one, while it asks again
        self.assertTrue(wait_until(lambda: self.upstream.paths() == ["/v1/models"] * 2))
        self.assertTrue(wait_until(lambda: self.overview()["probe"]["checked_seconds_ago"] == 0))

    def test_the_overview_of_an_upstream_that_is_not_there(self):
        self.restart(base_api_url=f"http://127.0.0.1:{free_port()}/v1")
        self.checked("not answering")
        self.assertEqual(self.overview()["probe"], {
            "answering": False, "model_count": None, "models": None,
            "problem": "Connection refused", "hint": NOT_ANSWERING_HINT,
            "checked_seconds_ago": 0.0})

    def test_the_process_says_it_after_the_start_up_lines(self):
        env = {**os.environ, "PORT": "0", "HOST": "127.0.0.1", "STATE_DB": "off",
               "BASE_API_URL": f"http://127.0.0.1:{free_port()}/v1"}
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "llm_proxy.py")], env=env,
                                stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.wait, WAIT)
        self.addCleanup(proc.kill)
        deadline = threading.Timer(WAIT, proc.kill)  # (then readline() ends: no hang)
        deadline.start()
        self.addCleanup(deadline.cancel)
        lines = [proc.stderr.readline()]
        while lines[-1] and " upstream http" not in lines[-1]:  # (a log line: time first)
            lines.append(proc.stderr.readline())
        self.assertIn("listening on http://127.0.0.1:", lines[0])
        self.assertIn(f"is not answering (Connection refused): {NOT_ANSWERING_HINT}",
                      lines[-1])


class FindingTests(unittest.TestCase):
    def test_the_line_names_a_few_models_and_counts_the_rest(self):
        cases = [
            ((), "upstream U answers, and lists no models"),
            (("one",), "upstream U answers with 1 model (one)"),
            (tuple("abcdefg"), "upstream U answers with 7 models (a, b, c, d, e and 2 more)"),
            (("evil\r\nforged line",),
             "upstream U answers with 1 model (evil\\x0d\\x0aforged line)"),
        ]
        for models, line in cases:
            with self.subTest(models=models):
                self.assertEqual(UpstreamFinding("U", True, models).line(), line)

    def test_a_list_that_is_not_a_model_list_is_none(self):
        for body in (b"<html>", b"[]", b'{"data": {}}', b'{"object": "list"}'):
            with self.subTest(body=body):
                self.assertIsNone(llm_proxy.model_names(body))
        self.assertEqual(llm_proxy.model_names(b'{"data": [{"id": "m"}, {"name": "x"}, 3]}'),
                         ("m",))


@unittest.skipIf(CHROMIUM is None, "no Chromium to run the pages in (apt-get install chromium, "
                                    "or set BROWSER_BIN)")
class UpstreamCardTests(ProxyTestCase):
    """The dashboard's upstream card says what the start-up line said."""

    @classmethod
    def setUpClass(cls):
        cls.browser = Browser(CHROMIUM)
        cls.addClassCleanup(cls.browser.close)

    def card(self):
        page = self.browser.new_page()
        self.addCleanup(page.close)
        page.goto(self.proxy.url.replace("0.0.0.0", "127.0.0.1") + "/admin")
        page.wait_for("document.querySelectorAll('#cards .card').length > 0")
        return page.evaluate("document.querySelector('#cards .card').textContent")

    def test_the_models_it_listed(self):
        self.proxy.check_upstream()
        self.assertTrue(self.log.wait_for(lambda text: "answers with" in text))
        self.assertIn("2 models: fake-a, fake-b", self.card())

    def test_what_to_check_when_it_is_not_answering(self):
        self.restart(base_api_url=f"http://127.0.0.1:{free_port()}/v1")
        self.proxy.check_upstream()
        self.assertTrue(self.log.wait_for(lambda text: "not answering" in text))
        self.assertIn(f"not answering (Connection refused): {NOT_ANSWERING_HINT}", self.card())


if __name__ == "__main__":
    unittest.main()
