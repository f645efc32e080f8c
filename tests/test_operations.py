"""What an operator sees and runs: local routes, secrets, logs, shutdown, keys file, admin."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import unittest
import llm_proxy

from tests.support import (
    CLIENT_KEY, Config, HERE, ProxyServer, ProxyTestCase, UPSTREAM_KEY, WAIT, free_port,
    parse_metrics, wait_until)

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:  # /metrics is then checked by this file's own reading of it
    text_string_to_metric_families = None


ALICE, BOB, GUEST = "sk-alice-0001", "sk-bob-0002", "sk-guest-0003"


class LocalRouteTests(ProxyTestCase):
    def test_health_shows_the_callers_bucket_without_creating_one(self):
        status, _, body = self.request("GET", "/health")
        self.assertEqual(status, 200)
        answer = json.loads(body)
        self.assertEqual(answer, {"ok": True, "quota": {
            "limit": 10, "remaining": 10, "reset_seconds": 0, "refill_tokens": 2,
            "refill_interval_seconds": 300.0}, "usage": {
            "requests": 0, "limited_requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
            "tokens_charged": 0}, "store": {"backend": "memory"}})
        self.assertEqual(len(self.proxy.store), 0)
        self.chat()
        quota = json.loads(self.request("GET", "/health")[2])["quota"]
        self.assertEqual((quota["remaining"], quota["reset_seconds"]), (9, 300))
        self.assertNotIn(str(self.upstream.server_address[1]), body.decode())

    def test_the_proxy_adds_no_server_header(self):
        """Its own answers carry none; a forwarded answer carries the upstream's own."""
        for method, path in (("GET", "/health"), ("GET", "/nope"), ("OPTIONS", "/v1/models")):
            self.assertNotIn("server", self.request(method, path)[1])
        self.assertTrue(self.chat()[1]["server"].startswith("BaseHTTP/"))

    def test_health_with_required_keys(self):
        self.restart(proxy_api_keys=("good",))
        self.assertEqual(json.loads(self.request("GET", "/health", key=None)[2]),
                         {"ok": True, "store": {"backend": "memory"}})
        self.assertEqual(self.request("GET", "/health", key="bad")[0], 401)
        self.assertIn("quota", json.loads(self.request("GET", "/health", key="good")[2]))


class CorsTests(ProxyTestCase):
    """Which web pages may call the proxy is decided by the server (CORS_ORIGINS), and no page
    reaches the admin surface."""

    def preflight(self, origin, path="/v1/chat/completions"):
        return self.request("OPTIONS", path, key=None, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, x-stainless-os"})

    def test_with_keys_required_any_page_may_call_the_api(self):
        self.restart(proxy_api_keys=(CLIENT_KEY,))
        status, headers, body = self.preflight("http://ui.local")
        self.assertEqual((status, body), (204, b""))
        self.assertEqual(headers["access-control-allow-origin"], "*")
        self.assertEqual(headers["access-control-allow-headers"], "authorization, x-stainless-os")
        self.assertIn("POST", headers["access-control-allow-methods"])
        _, headers, _ = self.chat(headers={"Origin": "http://ui.local"})
        exposed = headers["access-control-expose-headers"].lower()
        for name in ("retry-after", "x-ratelimit-remaining", "x-ratelimit-reset-seconds"):
            self.assertIn(name, exposed)

    def test_in_open_mode_no_page_may_call_the_api(self):
        """A page the operator opens could POST text/plain with no preflight and read the
        answer: the server refuses it before anything is charged or forwarded."""
        status, _, body = self.request("POST", "/v1/chat/completions",
                                       b'{"model": "m", "messages": []}', key=None,
                                       headers={"Origin": "http://evil.example",
                                                "Content-Type": "text/plain"})
        self.assert_openai_error(status, body, 403, "origin_not_allowed")
        self.assertEqual(self.preflight("http://evil.example")[0], 403)
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.remaining(), 10)
        status, headers, _ = self.chat()  # clients that send no Origin are unaffected
        self.assertEqual(status, 200)
        self.assertNotIn("access-control-allow-origin", headers)
        port = self.proxy.server_address[1]  # the proxy's own pages are not another origin
        self.assertEqual(self.chat(headers={"Origin": f"http://127.0.0.1:{port}",
                                            "Host": f"127.0.0.1:{port}"})[0], 200)

    def test_listed_origins_only_each_refused_in_its_apis_shape(self):
        self.restart(cors_origins=("http://chat.lan",))
        _, headers, _ = self.chat(headers={"Origin": "http://chat.lan"})
        self.assertEqual((headers["access-control-allow-origin"], headers["vary"]),
                         ("http://chat.lan", "Origin"))
        for path, body, check in (
                ("/v1/chat/completions", {"model": "m", "messages": []},
                 lambda b: b["error"]["code"]),
                ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": []},
                 lambda b: b["error"]["type"]),
                ("/api/chat", {"model": "m", "messages": []}, lambda b: b["error"])):
            with self.subTest(path=path):
                status, _, answer = self.request("POST", path, body,
                                                 headers={"Origin": "http://other.lan"})
                self.assertEqual(status, 403)
                self.assertTrue(check(json.loads(answer)))
        self.assertEqual(self.upstream.requests[1:], [])

    def test_admin_routes_answer_no_page_and_no_proxied_request(self):
        for path in ("/metrics", "/admin/keys"):
            with self.subTest(path=path):
                status, headers, _ = self.request("GET", path)
                self.assertEqual(status, 200)  # loopback, no admin key set
                self.assertNotIn("access-control-allow-origin", headers)
                self.assertEqual(self.request("GET", path,
                                              headers={"Origin": "http://localhost:3000"})[0], 403)
                # behind nginx on the same host every request comes from 127.0.0.1
                for header in ({"X-Forwarded-For": "203.0.113.9"},
                               {"Forwarded": "for=203.0.113.9"}):
                    self.assertEqual(self.request("GET", path, headers=header)[0], 404)
        self.restart(admin_api_key="sk-admin")
        self.assertEqual(self.request("GET", "/metrics", key="sk-admin",
                                      headers={"Origin": "http://localhost:3000"})[0], 403)

    def test_the_setting_is_checked(self):
        self.assertEqual(Config.from_env({"CORS_ORIGINS": "https://a.lan/, http://b:8080"},
                                         []).cors_origins, ("https://a.lan", "http://b:8080"))
        for bad in ("a.lan", "*, http://a.lan", "ftp://x"):
            with self.subTest(bad=bad):
                with self.assertRaises(llm_proxy.ConfigError):
                    Config.from_env({"CORS_ORIGINS": bad}, [])


class SecretTests(ProxyTestCase):
    def test_keys_never_reach_logs_or_responses(self):
        self.restart(base_api_key=UPSTREAM_KEY, limit_response="429")
        answers = []
        for _ in range(11):
            answers.append(self.chat())
        answers.append(self.chat(headers={"X-Fake-Scenario": "status-500"}))
        answers.append(self.request("GET", "/health"))
        answers.append(self.request("GET", f"/v1/models?key={CLIENT_KEY}"))
        self.restart(base_api_key=UPSTREAM_KEY, base_api_url=f"http://127.0.0.1:{free_port()}/v1")
        answers.append(self.chat())
        text = self.log.getvalue()
        self.assertIn(llm_proxy.short_hash(llm_proxy.key_digest(CLIENT_KEY)), text)
        for secret in (UPSTREAM_KEY, CLIENT_KEY):
            self.assertNotIn(secret, text)
            for _, headers, body in answers:
                self.assertNotIn(secret.encode(), body)
                self.assertNotIn(secret, json.dumps(headers))

    def test_access_log_line(self):
        self.chat()
        self.assertTrue(self.log.wait_for(lambda text: "remaining=9" in text))
        line = self.log.getvalue().strip().splitlines()[-1]
        self.assertRegex(line, r'127\.0\.0\.1 key=[0-9a-f]{10} "POST /v1/chat/completions" 200 '
                               r'cost=1 remaining=9 \d+\.\dms$')

    def test_quotes_in_logged_fields_cannot_forge_a_line(self):
        """A path such as /v1/x" 200 cost=0 ... would write a forged request into the text log;
        quotes and backslashes are escaped, as nginx does (\\x22)."""
        self.request("GET", '/v1/x%22%20200%20cost=0%20remaining=9%200.1ms%0a%5c')
        self.request("GET", '/v1/x%22+200+cost=0+remaining=9+0.1ms"/')
        self.assertTrue(self.log.wait_for(lambda text: text.count(" 40") >= 2))
        for line in self.log.getvalue().splitlines():
            self.assertEqual(line.count('"'), 2, line)  # the one quoted request field
        self.assertIn("\\x22", self.log.getvalue())

    def test_control_characters_are_escaped_in_the_log(self):
        self.raw(b"GET /v1/\x1b[31mred HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(self.log.wait_for(lambda text: "400" in text))
        self.assertNotIn("\x1b", self.log.getvalue())
        self.assertIn("\\x1b", self.log.getvalue())


class ServerTests(ProxyTestCase):
    def test_drain_waits_for_in_flight_requests(self):
        _, resp = self.open_stream(scenario="gate")
        resp.readline()
        self.assertFalse(self.proxy.drain(timeout=0.1))
        self.upstream.release.set()
        resp.read()
        self.assertTrue(self.proxy.drain(timeout=WAIT))

    def test_sigterm_stops_the_process_cleanly(self):
        env = {**os.environ, "PORT": "0", "HOST": "127.0.0.1", "BASE_API_URL": self.upstream.url}
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "llm_proxy.py")], env=env,
                                stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.kill)
        first = proc.stderr.readline()
        self.assertIn("listening on http://127.0.0.1:", first)
        port = int(first.rsplit(":", 1)[1])
        startup = proc.stderr.readline() + proc.stderr.readline()
        self.assertIn("buckets: 10 tokens, +2 every 300 s", startup)
        self.assertNotIn(self.upstream.url, startup)  # the host and port, not the URL path
        proxy = type("P", (), {"server_address": ("127.0.0.1", port)})
        self.assertEqual(self.request("GET", "/health", proxy=proxy)[0], 200)
        proc.terminate()
        self.assertEqual(proc.wait(WAIT), 0)


class ProcessTests(ProxyTestCase):
    """The proxy as a process: stopping it while it serves, and pointing it at itself."""

    def start(self, **env):
        env = {**os.environ, "PORT": "0", "HOST": "127.0.0.1", "BASE_API_URL": self.upstream.url,
               **env}
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "llm_proxy.py")], env=env,
                                stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.kill)
        first = proc.stderr.readline()
        port = int(first.rsplit(":", 1)[1])
        return proc, type("P", (), {"server_address": ("127.0.0.1", port)})

    def test_sigterm_refuses_new_connections_and_ends_what_is_left_at_the_drain_timeout(self):
        proc, proxy = self.start(DRAIN_TIMEOUT="1")
        conn, resp = self.open_stream(scenario="gate", proxy=proxy)
        self.assertTrue(resp.readline().startswith(b"data: "))  # a stream the upstream holds
        proc.terminate()

        def refused():
            try:
                with socket.create_connection(proxy.server_address, timeout=WAIT) as sock:
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                    return b" 503 " in sock.recv(65536).split(b"\r\n")[0]  # shutting down
            except (ConnectionRefusedError, ConnectionResetError):
                return True  # no longer listening (or it was closed while connecting)
        self.assertTrue(wait_until(refused))  # new connections get an answer, never a hang
        rest = resp.read()  # after DRAIN_TIMEOUT: the stream's last event, then its end
        self.assertIn("shutting down", json.loads(rest.split(b"data: ")[-1])["error"]["message"])
        self.assertEqual(proc.wait(WAIT), 1)  # the exit status says the drain was cut short
        self.assertIn("cut short", proc.stderr.read())
        self.upstream.release.set()

    def test_a_proxy_pointed_at_itself_answers_508_once_and_warns(self):
        port = free_port()
        proc, proxy = self.start(PORT=str(port), BASE_API_URL=f"http://127.0.0.1:{port}/v1",
                                 MAX_TOKENS="1000")
        startup = "".join(proc.stderr.readline() for _ in range(4))  # upstream ... warning
        self.assertIn("BASE_API_URL is this proxy's own address", startup)
        status, _, body = self.chat(proxy=proxy)
        self.assert_openai_error(status, body, 508, "loop_detected")
        proc.terminate()
        log = proc.stderr.read()
        self.assertEqual(log.count('"POST /v1/chat/completions"'), 2)  # one hop, then 508
        self.assertEqual(proc.wait(WAIT), 0)

    def test_forwarded_requests_carry_via(self):
        self.chat(headers={"Via": "1.1 edge"})
        self.assertRegex(self.upstream.requests[0][2]["Via"], r"^1\.1 edge, 1\.1 llm_proxy-[0-9a-f]{8}$")


class KeysFileTests(ProxyTestCase):
    """KEYS_FILE: named keys with their own policies, reloaded without a restart."""

    def write_keys(self, entries, name="keys.json"):
        path = os.path.join(self.tmp, name)
        with open(path + ".tmp", "w") as f:
            json.dump({"keys": entries}, f)
        os.replace(path + ".tmp", path)
        return path

    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        self.entries = [
            {"name": "alice", "key": ALICE, "max_tokens": 3},
            {"name": "bob", "key_sha256": llm_proxy.key_digest(BOB), "request_token_cost": 2,
             "models": ["fake-a", "fake-b"]},
            {"name": "guest", "key": GUEST, "limit_response": "429", "max_tokens": 1,
             "refill_interval_seconds": 60},
            {"name": "gone", "key": "sk-disabled", "disabled": True},
        ]
        self.path = self.write_keys(self.entries)
        self.restart(keys_file=self.path, proxy_api_keys=("sk-plain",))

    def restart(self, **settings):
        self.proxy = self.start_proxy(key_check_interval=0.05, **settings)

    def start_proxy(self, key_check_interval=1.0, **settings):
        settings.setdefault("base_api_url", self.upstream.url)
        settings.setdefault("state_db", "off")
        # (loaded as soon as seen changed: these files are replaced whole; the wait for a file
        # being written is KeysFileSettleTests')
        proxy = ProxyServer(Config(host="127.0.0.1", port=0, **settings), clock=self.clock,
                            log_stream=self.log, key_check_interval=key_check_interval,
                            keys_settle_seconds=0)
        self._serve(proxy)
        return proxy

    def test_per_key_overrides(self):
        for expected in ("2", "1", "0"):
            self.assertEqual(self.chat(key=ALICE)[1]["x-ratelimit-remaining"], expected)
        self.assertIn(b"limit reached", self.chat(key=ALICE)[2])
        self.assertEqual(self.chat(key=BOB)[1]["x-ratelimit-remaining"], "8")  # cost 2
        self.assertEqual(self.chat(key=GUEST)[0], 200)
        status, headers, body = self.chat(key=GUEST)
        self.assert_openai_error(status, body, 429, "rate_limit_exceeded")
        self.assertEqual(headers["retry-after"], "60")
        # PROXY_API_KEYS still work, with the global settings
        self.assertEqual(self.chat(key="sk-plain")[1]["x-ratelimit-remaining"], "9")

    def test_only_listed_keys_disabled_keys_and_models(self):
        for key in (None, "sk-unknown"):
            self.assert_openai_error(*self.chat(key=key)[::2], 401, "invalid_api_key")
        status, _, body = self.chat(key="sk-disabled")
        self.assertIn("disabled", self.assert_openai_error(status, body, 401)["message"])
        status, _, body = self.chat(key=BOB, model="fake-c")
        error = self.assert_openai_error(status, body, 403, "model_not_allowed")
        self.assertIn("fake-a, fake-b", error["message"])
        status, _, body = self.request("POST", "/v1/embeddings", {"model": "e", "input": "x"},
                                       key=BOB)
        self.assertEqual(status, 403)
        self.assertEqual(self.chat(key=BOB, model="fake-b")[0], 200)
        self.assertEqual(len(self.upstream.requests), 1)

    def test_logs_show_the_key_name(self):
        self.chat(key=ALICE)
        self.chat(key="sk-plain")
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") == 2))
        text = self.log.getvalue()
        self.assertIn('key=alice "POST /v1/chat/completions" 200', text)
        self.assertIn(f"key={llm_proxy.key_digest('sk-plain')[:10]} ", text)
        for secret in (ALICE, "sk-plain"):
            self.assertNotIn(secret, text)

    def test_reload_on_file_change_keeps_balances(self):
        for _ in range(2):
            self.chat(key=ALICE)  # 1 left of 3
        self.chat(key=BOB)        # 8 left of 10
        entries = [dict(self.entries[0], max_tokens=20), dict(self.entries[1], max_tokens=5),
                   {"name": "carol", "key": "sk-carol"}]
        self.write_keys(entries)
        self.assertTrue(self.log.wait_for(lambda text: "keys file reloaded: 4 keys" in text))
        self.assertEqual(self.chat(key=ALICE)[1]["x-ratelimit-remaining"], "0")   # kept
        self.assertEqual(self.chat(key=BOB)[1]["x-ratelimit-remaining"], "3")     # 5, clamped
        self.assertEqual(self.chat(key="sk-carol")[0], 200)                         # added
        self.assertEqual(self.chat(key=GUEST)[0], 401)                              # removed

    def test_invalid_reload_keeps_the_old_keys(self):
        with open(self.path + ".new", "w") as f:  # (replaced whole: never read half-written)
            f.write('{"keys": [{"name": "alice", "key": "x", "max_tokenz": 3}]}')
        os.replace(self.path + ".new", self.path)
        self.assertTrue(self.log.wait_for(lambda text: "keys file not reloaded" in text))
        line = [l for l in self.log.getvalue().splitlines() if "not reloaded" in l][0]
        self.assertIn("keys[0] (alice): unknown field 'max_tokenz'", line)
        self.assertEqual(self.chat(key=ALICE)[1]["x-ratelimit-remaining"], "2")
        self.assertEqual(self.chat(key=GUEST)[0], 200)

    def test_reload_on_sighup(self):
        env = {**os.environ, "PORT": "0", "HOST": "127.0.0.1", "BASE_API_URL": self.upstream.url,
               "KEYS_FILE": self.path}
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "llm_proxy.py")], env=env,
                                stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.wait, WAIT)
        self.addCleanup(proc.kill)
        port = int(proc.stderr.readline().rsplit(":", 1)[1])
        proxy = type("P", (), {"server_address": ("127.0.0.1", port)})
        self.assertEqual(self.request("GET", "/health", key=GUEST, proxy=proxy)[0], 200)
        # same size, same inode, same mtime: only the signal can make the proxy read it again
        before = os.stat(self.path)
        with open(self.path, "r+") as f:
            text = f.read()
            f.seek(0)
            f.write(text.replace('"guest"', '"gu3st"'))
        os.utime(self.path, ns=(before.st_atime_ns, before.st_mtime_ns))
        proc.send_signal(signal.SIGHUP)
        while "keys file reloaded" not in proc.stderr.readline():
            pass
        self.chat(key=GUEST, proxy=proxy)
        while True:
            line = proc.stderr.readline()
            if "POST" in line:
                break
        self.assertIn("key=gu3st", line)

    def test_invalid_file_at_start_up(self):
        cases = [
            ([{"name": "a", "key": "k", "colour": "blue"}], "keys[0] (a): unknown field 'colour'"),
            ([{"key": "k"}], "keys[0]: name is required"),
            ([{"name": "a", "key": "k", "key_sha256": "0" * 64}], "exactly one of key"),
            ([{"name": "a", "key": "k"}, {"name": "a", "key": "j"}], "keys[1] (a): name is used"),
            ([{"name": "a", "key": "k", "max_tokens": 0}], "keys[0] (a): max_tokens must be"),
            ([{"name": "a", "key_sha256": "xyz"}], "keys[0] (a): key_sha256 must be 64 hex"),
        ]
        for entries, expected in cases:
            with self.subTest(expected=expected):
                path = self.write_keys(entries, "bad.json")
                proc = subprocess.run([sys.executable, os.path.join(HERE, "llm_proxy.py")],
                                      env={**os.environ, "KEYS_FILE": path, "PORT": "0"},
                                      capture_output=True, text=True, timeout=WAIT)
                self.assertEqual(proc.returncode, 2)
                self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
                self.assertIn(path, proc.stderr)
                self.assertIn(expected, proc.stderr)

    @unittest.skipIf(sys.version_info < (3, 11), "TOML keys files need tomllib (Python 3.11)")
    def test_toml_keys_file(self):
        path = os.path.join(self.tmp, "keys.toml")
        with open(path, "w") as f:
            f.write('[[keys]]\nname = "tom"\nkey = "sk-tom"\nmax_tokens = 2\n'
                    'models = ["fake-a"]\n')
        self.restart(keys_file=path)
        self.assertEqual(self.chat(key="sk-tom")[1]["x-ratelimit-remaining"], "1")
        self.assertEqual(self.chat(key="sk-tom", model="other")[0], 403)

    def test_keygen_output_is_accepted(self):
        out = subprocess.run([sys.executable, os.path.join(HERE, "llm_proxy.py"), "keygen",
                              "--name", "dana"], capture_output=True, text=True,
                             timeout=WAIT).stdout
        key = re.search(r"(sk-\S+)", out).group(1)
        self.assertGreaterEqual(len(key), 3 + 43)  # 32 random bytes, base64
        entry = json.loads(out.split("JSON entry:")[1].split("TOML entry:")[0])
        self.assertEqual(entry, {"name": "dana", "key_sha256": llm_proxy.key_digest(key)})
        self.assertNotIn(key, out.split("JSON entry:")[1])  # only the digest goes in the file
        self.restart(keys_file=self.write_keys([entry]))
        self.assertEqual(self.chat(key=key)[0], 200)

    def test_key_lookup_among_many_keys(self):
        entries = [{"name": f"k{i}", "key_sha256": llm_proxy.key_digest(f"sk-{i}")}
                   for i in range(10_000)]
        self.restart(keys_file=self.write_keys(entries))
        self.assertEqual(self.chat(key="sk-9999")[0], 200)
        self.assertEqual(self.chat(key="sk-10000")[0], 401)


class AdminTests(ProxyTestCase):
    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        self.keys_path = os.path.join(self.tmp, "keys.json")
        with open(self.keys_path, "w") as f:
            json.dump({"keys": [{"name": 'al"ice', "key": ALICE, "max_tokens": 3},
                                {"name": "bob", "key": BOB}]}, f)
        self.restart(keys_file=self.keys_path)

    def metrics(self, key=None):
        status, headers, body = self.request("GET", "/metrics", key=key)
        self.assertEqual(status, 200, body)
        self.assertTrue(headers["content-type"].startswith("text/plain; version=0.0.4"))
        return body.decode()

    def test_metrics_after_a_known_sequence(self):
        for _ in range(4):
            self.chat(key=ALICE)          # 3 admitted, 1 limited
        self.chat(key=BOB, headers={"X-Fake-Scenario": "status-503"})
        self.request("GET", "/v1/models", key=BOB)
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") == 6))
        text = self.metrics()
        samples = parse_metrics(text)
        chat = "/v1/chat/completions"
        self.assertEqual(samples[("llm_proxy_requests_total",
                                  (("key", 'al"ice'), ("route", chat), ("status", "2xx")))], 4)
        self.assertEqual(samples[("llm_proxy_requests_total",
                                  (("key", "bob"), ("route", chat), ("status", "5xx")))], 1)
        self.assertEqual(samples[("llm_proxy_requests_total",
                                  (("key", "bob"), ("route", "/v1/models"), ("status", "2xx")))], 1)
        self.assertEqual(samples[("llm_proxy_limited_requests_total", (("key", 'al"ice'),))], 1)
        self.assertEqual(samples[("llm_proxy_tokens_charged_total", (("key", 'al"ice'),))], 3)
        self.assertNotIn(("llm_proxy_tokens_charged_total", (("key", "bob"),)), samples)
        self.assertEqual(samples[("llm_proxy_upstream_errors_total", (("kind", "5xx"),))], 1)
        self.assertEqual(samples[("llm_proxy_buckets", ())], 1)
        self.assertEqual(samples[("llm_proxy_keys", ())], 2)
        self.assertEqual(samples[("llm_proxy_requests_in_flight", ())], 1)  # this very request
        self.assertEqual(samples[("llm_proxy_upstream_latency_seconds_count", ())], 5)
        self.assertEqual(samples[("llm_proxy_upstream_ttfb_seconds_bucket", (("le", "+Inf"),))], 5)
        self.assertIn('key="al\\"ice"', text)  # label values are escaped
        if text_string_to_metric_families is not None:  # the official parser agrees
            families = {f.name: f for f in text_string_to_metric_families(text)}
            self.assertEqual(families["llm_proxy_upstream_ttfb_seconds"].type, "histogram")
            self.assertIn("llm_proxy_requests", families)

    def test_admin_keys(self):
        self.chat(key=ALICE)
        self.assertTrue(self.log.wait_for(lambda text: " cost=1 " in text))
        status, _, body = self.request("GET", "/admin/keys")
        report = json.loads(body)
        alice = [k for k in report["keys"] if k["name"] == 'al"ice'][0]
        self.assertEqual((alice["limit"], alice["balance"], alice["next_refill_seconds"]),
                         (3, 2, 300))
        self.assertEqual((alice["requests"], alice["tokens_charged"]), (1, 1))
        for secret in (ALICE, BOB, llm_proxy.key_digest(ALICE)):
            self.assertNotIn(secret.encode(), body)

    def test_admin_key_when_set(self):
        self.restart(keys_file=self.keys_path, admin_api_key="sk-admin")
        for path in ("/metrics", "/admin/keys"):
            with self.subTest(path=path):
                for key in (None, "sk-wrong", ALICE):
                    self.assertEqual(self.request("GET", path, key=key)[0], 401)
                self.assertEqual(self.request("GET", path, key="sk-admin")[0], 200)

    def test_without_admin_key_only_loopback_clients(self):
        class FarAway(llm_proxy.ProxyHandler):
            def setup(self):
                super().setup()
                self.client_address = ("203.0.113.9", 40000)
        far = ProxyServer(Config(host="127.0.0.1", port=0, base_api_url=self.upstream.url,
                                 state_db="off"),
                          log_stream=self.log, handler=FarAway)
        self._serve(far)
        for path in ("/metrics", "/admin/keys"):
            with self.subTest(path=path):
                self.assert_openai_error(*self.request("GET", path, proxy=far)[::2], 404)
                self.assertEqual(self.request("GET", path)[0], 200)

    def test_json_logs(self):
        self.restart(keys_file=self.keys_path, log_format="json")
        self.chat(key=ALICE)
        self.assertTrue(self.log.wait_for(lambda text: '"cost": 1' in text))
        entry = json.loads(self.log.getvalue().strip().splitlines()[-1])
        self.assertEqual({k: entry[k] for k in ("client", "key", "method", "path", "status",
                                                 "cost", "remaining")},
                         {"client": "127.0.0.1", "key": 'al"ice', "method": "POST",
                          "path": "/v1/chat/completions", "status": 200, "cost": 1,
                          "remaining": 2})
        self.assertIsInstance(entry["duration_ms"], float)
        self.assertRegex(entry["time"], r"^\d{4}-\d\d-\d\dT")
