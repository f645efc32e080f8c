"""Edges of the guarantee (issue 20, item 6): a charge that cannot close, the one key reader,
answers that are never cached, a keys file read only once it is whole, settings refused in
one line."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest
import unittest.mock

import llm_proxy
from llm_proxy import (ANSWERED, BucketPolicy, Charge, Config, ConfigError, MemoryBucketStore,
                       ProxyServer)
from tests.support import CLIENT_KEY, HERE, WAIT, FakeClock, ProxyTestCase


class ChargeCloseTests(ProxyTestCase):
    """Charge.close runs inside the error boundary: if it fails the client still gets an
    answer, the access log says what was really sent, and the tokens stay held."""

    def settle_fails(self):
        # (max_output_tokens at the reserve: nothing more is held at admission, through settle)
        self.restart(token_cost_mode="usage", max_tokens=1000, max_output_tokens=256)
        patch = unittest.mock.patch.object(self.proxy.store, "settle",
                                           side_effect=RuntimeError("the store broke"))
        patch.start()
        self.addCleanup(patch.stop)

    def test_a_charge_that_cannot_close_answers_500_and_is_logged_as_such(self):
        self.settle_fails()
        status, _, body = self.chat()
        self.assert_openai_error(status, body, 500)
        self.assertTrue(self.log.wait_for(lambda text: " cost=" in text))
        line = [l for l in self.log.getvalue().splitlines() if " cost=" in l][0]
        self.assertIn('"POST /v1/chat/completions" 500 cost=', line)
        self.assertIn("error: RuntimeError while closing the charge", self.log.getvalue())
        self.assertEqual(self.proxy.store.peek("key:" + llm_proxy.key_digest(CLIENT_KEY),
                                               self.proxy.config.bucket_policy).remaining,
                         1000 - int(line.split(" cost=")[1].split()[0]))  # still held

    def test_a_stream_whose_charge_cannot_close_is_cut_and_logged_as_sent(self):
        self.settle_fails()
        conn, resp = self.open_stream()
        self.assertEqual(resp.status, 200)
        with self.assertRaises(http.client.IncompleteRead):  # no last chunk: cut, not whole
            resp.read()
        self.assertTrue(self.log.wait_for(lambda text: " cost=" in text))
        line = [l for l in self.log.getvalue().splitlines() if " cost=" in l][0]
        self.assertIn('"POST /v1/chat/completions" 200 cost=', line)
        self.assertIn("charge not closed", line)

    def test_the_state_changes_only_after_the_store_took_it(self):
        policy = BucketPolicy(capacity=100, refill_tokens=10, refill_interval=60)
        store = MemoryBucketStore(FakeClock())
        charge = Charge(store, "k", policy, store.take("k", 20, policy), 20,
                        meter=unittest.mock.Mock(cost=lambda estimate: (3, 2, 5),
                                                 unmeterable=False))
        with unittest.mock.patch.object(store, "settle", side_effect=RuntimeError):
            with self.assertRaises(RuntimeError):
                charge.close(ANSWERED)
        self.assertEqual((charge.state, charge.cost), ("held", 20))
        charge.close(ANSWERED)  # the store works again: closed now, once
        self.assertEqual((charge.state, charge.cost), ("settled", 5))
        self.assertEqual(store.peek("k", policy).remaining, 95)


class KeyReaderTests(ProxyTestCase):
    def test_health_reads_a_key_sent_as_x_api_key(self):
        self.restart(proxy_api_keys=(CLIENT_KEY,))
        self.chat()
        for headers in ({"Authorization": f"Bearer {CLIENT_KEY}"}, {"x-api-key": CLIENT_KEY}):
            with self.subTest(headers=headers):
                status, _, body = self.request("GET", "/health", key=None, headers=headers)
                self.assertEqual(status, 200)
                self.assertEqual(json.loads(body)["quota"]["remaining"], 9)


class NoStoreTests(ProxyTestCase):
    def test_answers_that_depend_on_the_callers_key_are_never_stored(self):
        self.chat()
        for path in ("/health", "/v1/usage", "/metrics", "/admin/keys", "/admin/usage",
                     "/admin/overview"):
            with self.subTest(path=path):
                status, headers, _ = self.request("GET", path)
                self.assertEqual(status, 200)
                self.assertEqual(headers.get("cache-control"), "no-store")


@unittest.skipIf(sys.version_info < (3, 11), "TOML files need tomllib (Python 3.11)")
class KeysFileSettleTests(ProxyTestCase):
    """A keys file is loaded once it has stayed unchanged for KEYS_SETTLE_SECONDS: one
    rewritten slowly in place is never read half-written. The watcher's thread is parked (an
    hour between checks) and the test makes each check itself, on the proxy's clock."""

    WHOLE = ('[[keys]]\nname = "alice"\nkey = "sk-alice"\n\n'
             '[[keys]]\nname = "gone"\nkey = "sk-gone"\ndisabled = true\n')

    def setUp(self):
        super().setUp()
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        self.path = os.path.join(tmp, "keys.toml")
        with open(self.path, "w") as f:
            f.write(self.WHOLE)
        self.proxy = ProxyServer(Config(host="127.0.0.1", port=0, state_db="off",
                                        base_api_url=self.upstream.url, keys_file=self.path),
                                 clock=self.clock, log_stream=self.log, key_check_interval=3600)
        self._serve(self.proxy)

    def rewrite(self, text):
        with open(self.path, "r+") as f:  # in place, as a slow writer does
            f.truncate(0)
            f.write(text)

    def test_a_file_rewritten_slowly_is_loaded_once_it_stays_unchanged(self):
        watcher = self.proxy.keys_watcher
        half = self.WHOLE.split("disabled")[0]  # "gone" without its disabled = true
        self.rewrite(half)
        self.assertFalse(watcher.check())
        self.assertEqual(self.chat(key="sk-gone")[0], 401)  # the old keys stay in force
        self.clock.advance(llm_proxy.KEYS_SETTLE_SECONDS - 0.1)
        self.rewrite(self.WHOLE.replace('name = "alice"', 'name = "alicia"'))  # the write goes on
        self.assertFalse(watcher.check())
        self.clock.advance(llm_proxy.KEYS_SETTLE_SECONDS - 0.1)
        self.assertFalse(watcher.check())
        self.assertEqual(self.chat(key="sk-gone")[0], 401)
        self.clock.advance(0.1)
        self.assertTrue(watcher.check())  # unchanged for the whole moment: loaded
        self.assertTrue(self.log.wait_for(lambda text: "keys file reloaded: 2 keys" in text))
        self.chat(key="sk-alice")
        self.assertTrue(self.log.wait_for(lambda text: "key=alicia" in text))
        self.assertEqual(self.chat(key="sk-gone")[0], 401)
        self.assertFalse(watcher.check())  # nothing more changed

    def test_sighup_on_an_unchanged_file_reloads_at_once(self):
        self.proxy.request_key_reload()
        self.assertTrue(self.log.wait_for(lambda text: "keys file reloaded: 2 keys" in text))


class SettingsTests(unittest.TestCase):
    """Each invalid setting is one line on stderr and exit status 2, never a traceback."""

    def start(self, **env):
        return subprocess.run([sys.executable, os.path.join(HERE, "llm_proxy.py")],
                              env={**os.environ, "PORT": "0", "HOST": "127.0.0.1", **env},
                              capture_output=True, text=True, timeout=WAIT)

    def assert_refused(self, expected, **env):
        proc = self.start(**env)
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
        self.assertIn(expected, proc.stderr)

    def test_invalid_settings_are_one_line_and_status_2(self):
        cases = [
            ({"HOST": "999.1.1.1"}, "HOST"),
            ({"HOST": "no such host"}, "HOST"),
            ({"PORT": "\u0668\u0668\u0669\u0669"}, "PORT"),          # Arabic-Indic 8899
            ({"MAX_TOKENS": "\uff11\uff10"}, "MAX_TOKENS"),             # full-width 10
            ({"REFILL_INTERVAL_SECONDS": "\u0663\u0660"}, "REFILL_INTERVAL_SECONDS"),
            ({"BASE_API_URL": "http://127.0.0.1:1/v\r\n1"}, "BASE_API_URL"),
            ({"BASE_API_URL": "http://127.0.0.1:1/v1\nX-Injected: 1"}, "BASE_API_URL"),
            ({"NATIVE_API_URL": "http://127.0.0.1:1/\rx"}, "NATIVE_API_URL"),
            ({"EXTRA_ROUTES": "POST /v1/chat/completions free"}, "POST /v1/chat/completions"),
            ({"EXTRA_ROUTES": "GET /metrics free"}, "GET /metrics"),
            ({"EXTRA_ROUTES": "GET /v1/models/x free"}, "GET /v1/models/x"),
            ({"EXTRA_ROUTES": "POST /api/blobs/x/* free"}, "POST /api/blobs/x/*"),
            ({"KEYS_FILE": "/dev/zero"}, "/dev/zero"),
        ]
        for env, expected in cases:
            with self.subTest(env=env):
                self.assert_refused(expected, **env)

    def test_a_keys_file_is_read_within_a_bound(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, "keys.json")
        with open(path, "w") as f:
            f.write('{"keys": []}' + " " * llm_proxy.MAX_KEYS_FILE_BYTES)
        with self.assertRaises(ConfigError) as caught:
            llm_proxy.read_keys_file(path)
        self.assertIn("larger than", str(caught.exception))
        fifo = os.path.join(tmp, "keys.fifo")
        os.mkfifo(fifo)
        with self.assertRaises(ConfigError) as caught:  # (and not blocked opening it)
            llm_proxy.read_keys_file(fifo)
        self.assertIn("not a regular file", str(caught.exception))

    def test_extra_routes_beside_the_built_in_ones_are_still_accepted(self):
        rows = Config.from_env({"EXTRA_ROUTES": "POST /health free, GET /v1/* free, "
                                                "POST /v1/chat/other generate"}, []).extra_routes
        self.assertEqual(len(rows), 3)

    def test_numbers_are_read_in_ascii_digits(self):
        config = Config.from_env({"PORT": " 8898 ", "REFILL_INTERVAL_SECONDS": "1.5e2",
                                  "MAX_TOKENS": "+12"}, [])
        self.assertEqual((config.port, config.refill_interval_seconds, config.max_tokens),
                         (8898, 150.0, 12))

    def test_host_takes_addresses_and_names(self):
        for host in ("127.0.0.1", "::1", "0.0.0.0", "localhost", "proxy-1.lan", "::"):
            with self.subTest(host=host):
                self.assertEqual(Config.from_env({"HOST": host}, []).host, host)

    def test_a_port_in_use_is_one_line(self):
        taken = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        proc = self.start(PORT=str(port))
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
        self.assertIn(f"cannot listen on 127.0.0.1:{port}", proc.stderr)

if __name__ == "__main__":
    unittest.main()
