"""Keys managed in place: the keys file written by the proxy (API, command line), expiry,
rotation, priority classes, per-key concurrency and the audit trail (issue 24)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import unittest

from tests.support import WAIT, FakeClock, ProxyTestCase, until

import llm_proxy
from llm_proxy import Config, ProxyServer

ADMIN = "sk-admin-SECRET-0123"
EPOCH = 1_800_000_000.0  # 2027-01-15T08:00:00Z


class KeysAdminCase(ProxyTestCase):
    """A proxy whose KEYS_FILE is in a fresh folder (not made yet), with ADMIN_API_KEY."""

    settings: dict = {}
    settle = 0  # KEYS_SETTLE_SECONDS of the watcher (on the frozen test clock: never, if > 0)

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        self.path = os.path.join(self.tmp, "keys.json")
        self.state = os.path.join(self.tmp, "state.db")
        self.wall = FakeClock(EPOCH)
        super().setUp()

    def start_proxy(self, **settings):
        settings = {"keys_file": self.path, "admin_api_key": ADMIN, "state_db": self.state,
                    "base_api_url": self.upstream.url, "quota_timezone": "UTC",
                    **self.settings, **settings}
        proxy = ProxyServer(Config(host="127.0.0.1", port=0, **settings), clock=self.clock,
                            wall=self.wall, log_stream=self.log, key_check_interval=0.05,
                            keys_settle_seconds=self.settle)
        self._serve(proxy)
        return proxy

    def start_another(self, **settings):
        """A second proxy (its own state file: the first holds its own)."""
        settings.setdefault("state_db", os.path.join(self.tmp, "state-2.db"))
        return self.start_proxy(**settings)

    def admin(self, method, path, body=None, headers=None):
        status, _, data = self.request(method, path, body, key=ADMIN, headers=headers)
        return status, json.loads(data) if data else None

    def create(self, name, **fields):
        status, body = self.admin("POST", "/admin/keys", {"name": name, **fields})
        self.assertEqual(status, 201, body)
        return body["key"]

    def entries(self):
        with open(self.path) as f:
            return json.load(f)["keys"]

    def audit(self):
        return self.admin("GET", "/admin/audit")[1]["audit"]


    def until(self, predicate):
        until(self, predicate)


class FirstRunTests(KeysAdminCase):
    settle = 3600  # a hand edit would wait an hour: the proxy's own writes do not wait at all

    def test_no_file_yet_means_no_keys_until_the_first_is_made(self):
        self.assertFalse(os.path.exists(self.path))
        for key in (None, "sk-anything"):
            self.assertEqual(self.chat(key=key)[0], 401)
        secret = self.create("alice", max_tokens=5)
        self.assertTrue(secret.startswith("sk-"))
        self.assertEqual(self.chat(key=secret)[0], 200)  # at once: no settle wait
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        [entry] = self.entries()
        self.assertEqual(entry["key_sha256"], llm_proxy.key_digest(secret))
        self.assertNotIn(secret, open(self.path).read())
        self.assertNotIn(secret, self.log.getvalue())
        self.assertEqual(entry["created_at"], "2027-01-15T08:00:00Z")

    def test_a_missing_folder_is_still_an_error(self):
        config = Config(host="127.0.0.1", port=0, keys_file=os.path.join(self.tmp, "no", "k.json"),
                        state_db="off")
        with self.assertRaises(llm_proxy.ConfigError):
            ProxyServer(config, log_stream=self.log)


class ApiTests(KeysAdminCase):

    def test_create_change_and_delete(self):
        secret = self.create("bob", max_tokens=3, priority="low", note="batch")
        status, body = self.admin("POST", "/admin/keys", {"name": "bob"})
        self.assertEqual(status, 409)
        self.assertEqual(body["error"]["code"], "key_name_taken")
        status, body = self.admin("PATCH", "/admin/keys/bob", {"max_tokens": 7, "note": None})
        self.assertEqual(status, 200, body)
        self.assertEqual(body["max_tokens"], 7)
        self.assertNotIn("note", body)
        self.assertNotIn("key_sha256", body)
        self.assertEqual(self.chat(key=secret)[1]["x-ratelimit-limit"], "7")
        self.assertEqual(self.admin("PATCH", "/admin/keys/bob", {"disabled": True})[0], 200)
        self.assertEqual(self.chat(key=secret)[0], 401)
        self.assertEqual(self.admin("PATCH", "/admin/keys/bob", {"disabled": False})[0], 200)
        self.assertEqual(self.chat(key=secret)[0], 200)
        listed = {k["name"]: k for k in self.admin("GET", "/admin/keys")[1]["keys"]}
        self.assertEqual(listed["bob"]["priority"], "low")
        self.assertEqual(listed["bob"]["created_at"], "2027-01-15T08:00:00Z")
        status, _, data = self.request("DELETE", "/admin/keys/bob", key=ADMIN)
        self.assertEqual((status, data), (204, b""))
        self.assertEqual(self.entries(), [])
        self.assertEqual(self.chat(key=secret)[0], 401)

    def test_a_bad_field_is_named_and_an_unknown_name_is_404(self):
        for body, field in (({"name": "x", "max_tokens": 0}, "max_tokens"),
                            ({"name": "x", "priority": "urgent"}, "priority"),
                            ({"name": "x", "expires_at": "soon"}, "expires_at"),
                            ({"name": "x", "colour": "red"}, "colour"),
                            ({"name": "x", "key_sha256": "0" * 64}, "key_sha256"),
                            ({"max_tokens": 5}, "name")):
            with self.subTest(field=field):
                status, answer = self.admin("POST", "/admin/keys", body)
                self.assertEqual(status, 400, answer)
                self.assertEqual(answer["error"]["param"], field)
                self.assertIn(field, answer["error"]["message"])
        self.assertFalse(os.path.exists(self.path))
        for method, path in (("PATCH", "/admin/keys/nobody"), ("DELETE", "/admin/keys/nobody"),
                             ("POST", "/admin/keys/nobody/rotate")):
            with self.subTest(method=method):
                status, answer = self.admin(method, path, {})
                self.assertEqual(status, 404)
                self.assertEqual(answer["error"]["code"], "unknown_key")

    def test_every_new_route_needs_the_admin_key(self):
        self.create("carol")
        routes = (("POST", "/admin/keys", {"name": "eve"}), ("PATCH", "/admin/keys/carol", {}),
                  ("DELETE", "/admin/keys/carol", None), ("POST", "/admin/keys/carol/rotate", {}),
                  ("GET", "/admin/audit", None))
        for method, path, body in routes:
            with self.subTest(method=method, path=path):
                for key in (None, "sk-wrong"):
                    self.assertEqual(self.request(method, path, body, key=key)[0], 401)
                status, _, _ = self.request(method, path, body, key=ADMIN,
                                            headers={"Origin": "http://evil.example"})
                self.assertEqual(status, 403)
                status, _, _ = self.request(method, path, body, key=ADMIN,
                                            headers={"Sec-Fetch-Site": "cross-site"})
                self.assertEqual(status, 403)
        self.assertEqual([e["name"] for e in self.entries()], ["carol"])

    def test_same_origin_writes_pass_with_the_admin_key_in_a_header(self):
        host = f"127.0.0.1:{self.proxy.server_address[1]}"
        status, _, data = self.request("POST", "/admin/keys", {"name": "dave"}, key=ADMIN,
                                       headers={"Origin": f"http://{host}",
                                                "Sec-Fetch-Site": "same-origin"})
        self.assertEqual(status, 201, data)
        self.assertEqual(self.request("POST", "/admin/keys", {"name": "erin"}, key=None,
                                      headers={"Origin": f"http://{host}"})[0], 401)
        self.assertEqual(self.audit()[0]["from"], "127.0.0.1 (dashboard)")

    def test_without_an_admin_key_only_this_machine_may_change_keys(self):
        self.proxy = self.start_another(admin_api_key="")
        status, _, _ = self.request("POST", "/admin/keys", {"name": "local-one"}, key=None)
        self.assertEqual(status, 201)
        self.assertEqual(self.audit_of(self.proxy)[0]["who"], "local")
        status, _, _ = self.request("POST", "/admin/keys", {"name": "other"}, key=None,
                                    headers={"X-Forwarded-For": "203.0.113.9"})
        self.assertEqual(status, 404)

    def audit_of(self, proxy):
        return [r.as_json(proxy.calendar.tz) for r in proxy.audit.rows(0, 10)]

    @unittest.skipIf(sys.version_info < (3, 11), "TOML files need tomllib (Python 3.11)")
    def test_a_toml_file_is_refused_with_how_to_convert(self):
        path = os.path.join(self.tmp, "keys.toml")
        with open(path, "w") as f:
            f.write('[[keys]]\nname = "t"\nkey = "sk-toml-key"\n')
        self.proxy = self.start_another(keys_file=path)
        status, answer = self.admin("POST", "/admin/keys", {"name": "new"})
        self.assertEqual(status, 409)
        self.assertEqual(answer["error"]["code"], "keys_file_read_only")
        self.assertIn("convert it to JSON", answer["error"]["message"])
        self.assertEqual(self.chat(key="sk-toml-key")[0], 200)

    def test_the_file_is_rewritten_in_a_stable_readable_form(self):
        with open(self.path, "w") as f:
            json.dump({"keys": [{"max_tokens": 4, "key": "sk-plain-one", "name": "zed"}]}, f)
        self.assertTrue(self.proxy.reload_keys())
        self.create("amy")
        text = open(self.path).read()
        self.assertTrue(text.startswith('{\n  "keys": [\n    {\n      "name": "zed",\n'), text)
        self.assertNotIn("sk-plain-one", text)  # only digests
        self.assertEqual(self.chat(key="sk-plain-one")[0], 200)
        self.assertEqual(llm_proxy.keys_file_text(self.entries()), text)


class HandEditRaceTests(KeysAdminCase):

    def test_a_hand_edit_between_read_and_rename_is_kept(self):
        self.create("first")
        editor = self.proxy.keys_file
        edits = []

        def hand_edit():
            if edits:
                return
            entries = self.entries() + [{"name": "by-hand", "key": "sk-by-hand-1"}]
            with open(self.path, "w") as f:
                json.dump({"keys": entries}, f)
            edits.append(1)

        editor.before_rename = hand_edit
        self.create("second")
        self.assertEqual([e["name"] for e in self.entries()], ["first", "by-hand", "second"])
        self.assertEqual(self.chat(key="sk-by-hand-1")[0], 200)
        rows = self.audit()
        self.assertEqual((rows[0]["action"], rows[0]["key"]), ("added", "second"))
        self.assertEqual((rows[1]["who"], rows[1]["action"], rows[1]["key"]),
                         ("file", "added", "by-hand"))

    def test_writers_in_threads_lose_nothing(self):
        names = [f"k{i}" for i in range(12)]
        threads = [threading.Thread(target=self.create, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        self.assertEqual(sorted(e["name"] for e in self.entries()), sorted(names))
        self.assertEqual(len(self.proxy.keys), 12)


    def test_command_line_processes_and_the_api_at_once_lose_nothing(self):
        script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "llm_proxy.py")
        env = {**os.environ, "KEYS_FILE": self.path, "STATE_DB": "off"}
        procs = [subprocess.Popen([sys.executable, script, "keys", "add", f"proc{i}"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for i in range(4)]
        threads = [threading.Thread(target=self.create, args=(f"api{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        self.assertEqual([p.wait(WAIT) for p in procs], [0, 0, 0, 0])
        self.assertEqual(sorted(e["name"] for e in self.entries()),
                         [f"api{i}" for i in range(4)] + [f"proc{i}" for i in range(4)])


class OwnWriteTests(unittest.TestCase):
    def test_a_write_landing_just_after_the_proxys_own_is_still_reloaded(self):
        """The proxy marks as loaded the version it wrote, not whatever the file holds when it
        gets round to it: `keys disable a` from the command line in between is reloaded."""
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "keys.json")
        with open(path, "w") as f:
            f.write(llm_proxy.keys_file_text([{"name": "a",
                                               "key_sha256": llm_proxy.key_digest("sk-a")}]))
        config = Config(keys_file=path)
        clock, reloads = FakeClock(100), []
        watcher = llm_proxy.KeysWatcher(path, lambda: reloads.append(1) or True, 3600,
                                        clock=clock, settle=1.0)
        self.addCleanup(watcher.close)
        mine = llm_proxy.KeysFile(path, config)
        mine.change(lambda entries: entries.append(
            {"name": "b", "key_sha256": llm_proxy.key_digest("sk-b")}))
        llm_proxy.KeysFile(path, config).change(lambda entries: entries[0].update(disabled=True))
        watcher.loaded(mine.written)  # the proxy's own write, put in force
        for _ in range(3):
            clock.advance(2)
            watcher.check()
        self.assertEqual(len(reloads), 1)


class ExpiryTests(KeysAdminCase):

    def test_expiry_at_the_boundary_in_the_routes_shape(self):
        secret = self.create("temp", expires_at="2027-01-16")  # 00:00 UTC
        self.wall.now = 1_800_000_000.0 + 16 * 3600 - 0.001  # 2027-01-15T23:59:59.999
        self.assertEqual(self.chat(key=secret)[0], 200)
        self.wall.now += 0.001
        status, _, body = self.chat(key=secret)
        error = json.loads(body)["error"]
        self.assertEqual((status, error["code"]), (401, "key_expired"))
        self.assertIn("2027-01-16", error["message"])
        status, _, body = self.request("POST", "/v1/messages", {
            "model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
            key=secret)
        self.assertEqual(status, 401)
        self.assertEqual(json.loads(body)["type"], "error")  # Anthropic's shape
        self.assertIn("2027-01-16", json.loads(body)["error"]["message"])

    def test_a_time_without_offset_is_in_the_quota_timezone(self):
        self.proxy = self.start_another(quota_timezone="Europe/Berlin")
        secret = self.create("berlin", expires_at="2027-01-15T09:00")  # 08:00 UTC
        self.wall.now = EPOCH - 1
        self.assertEqual(self.chat(key=secret)[0], 200)
        self.wall.now = EPOCH
        self.assertEqual(self.chat(key=secret)[0], 401)

    def test_keys_expiring_within_seven_days_are_marked(self):
        self.create("soon", expires_at="2027-01-20")
        self.create("later", expires_at="2027-03-01")
        keys = {k["name"]: k for k in self.admin("GET", "/admin/overview")[1]["keys"]}
        self.assertTrue(keys["soon"]["expires_soon"])
        self.assertFalse(keys["later"]["expires_soon"])


class RotateTests(KeysAdminCase):

    def test_the_old_secret_works_during_the_grace_then_401(self):
        old = self.create("rot", max_tokens=5)
        self.chat(key=old)
        status, body = self.admin("POST", "/admin/keys/rot/rotate", {"grace_seconds": 3600})
        self.assertEqual(status, 200, body)
        new = body["key"]
        self.assertNotEqual(new, old)
        self.assertNotIn(new, self.log.getvalue())
        # the same bucket: the balance carries over
        self.assertEqual(self.chat(key=new)[1]["x-ratelimit-remaining"], "3")
        self.assertEqual(self.chat(key=old)[1]["x-ratelimit-remaining"], "2")
        self.wall.advance(3600)
        self.assertEqual(self.chat(key=old)[0], 401)
        self.assertEqual(self.chat(key=new)[0], 200)

    def test_without_grace_the_old_secret_stops_at_once(self):
        old = self.create("rot2")
        new = self.admin("POST", "/admin/keys/rot2/rotate", {})[1]["key"]
        self.assertEqual(self.chat(key=old)[0], 401)
        self.assertEqual(self.chat(key=new)[0], 200)
        self.assertEqual(self.admin("POST", "/admin/keys/rot2/rotate",
                                    {"grace_seconds": -1})[0], 400)


class AuditTests(KeysAdminCase):

    def test_api_changes_are_recorded_without_secrets(self):
        secret = self.create("aud", max_tokens=9)
        self.admin("PATCH", "/admin/keys/aud", {"priority": "high"})
        new = self.admin("POST", "/admin/keys/aud/rotate", {})[1]["key"]
        self.request("DELETE", "/admin/keys/aud", key=ADMIN)
        rows = self.audit()
        self.assertEqual([(r["action"], r["key"]) for r in rows],
                         [("removed", "aud"), ("rotated", "aud"), ("changed", "aud"),
                          ("added", "aud")])
        self.assertEqual(rows[2]["fields"], ["priority"])
        self.assertEqual(rows[3]["fields"], ["key", "max_tokens"])
        self.assertEqual({r["who"] for r in rows}, {"admin"})
        self.assertEqual(rows[0]["from"], "127.0.0.1")
        logged = self.log.getvalue()
        self.assertIn("audit: added key aud by admin from 127.0.0.1: key, max_tokens", logged)
        for text in (logged, json.dumps(rows)):
            self.assertNotIn(secret, text)
            self.assertNotIn(new, text)
        # in the state file too, where `llm_proxy.py audit` reads it
        self.proxy.writer.flush()
        self.assertEqual(len(llm_proxy.read_audit_file(self.state, 0, 100)), 4)

    def test_since_and_limit(self):
        self.create("a1")
        self.wall.advance(86400)
        self.create("a2")
        self.create("a3")
        status, body = self.admin("GET", "/admin/audit?since=2027-01-16&limit=1")
        self.assertEqual(status, 200)
        self.assertEqual([r["key"] for r in body["audit"]], ["a3"])
        self.assertEqual(len(self.admin("GET", "/admin/audit?since=2027-01-16")[1]["audit"]), 2)
        self.assertEqual(self.admin("GET", "/admin/audit?limit=zero")[0], 400)

    def test_a_hand_edit_seen_at_reload_is_recorded(self):
        self.create("keep", max_tokens=4)
        self.create("drop")
        entries = [e for e in self.entries() if e["name"] != "drop"]
        entries[0]["max_tokens"] = 8
        entries.append({"name": "new-by-hand", "key": "sk-hand-2", "priority": "high"})
        with open(self.path, "w") as f:
            json.dump({"keys": entries}, f)
        self.assertTrue(self.proxy.reload_keys())
        rows = [(r["who"], r["action"], r["key"], r["fields"]) for r in self.audit()[:3]]
        self.assertCountEqual(rows, [("file", "removed", "drop", []),
                                     ("file", "added", "new-by-hand", ["key", "priority"]),
                                     ("file", "changed", "keep", ["max_tokens"])])

    def test_rows_older_than_the_retention_are_pruned(self):
        self.proxy = self.start_another(ledger_retention_days=1)
        self.create("old")
        self.proxy.writer.flush()
        self.wall.advance(2 * 86400)
        self.create("young")
        self.proxy.writer.flush()
        self.assertEqual([r.key for r in llm_proxy.read_audit_file(self.proxy.state.path, 0, 10)],
                         ["young"])


class CommandLineTests(KeysAdminCase):

    def run_cli(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        env = {"KEYS_FILE": self.path, "STATE_DB": self.state, "QUOTA_TIMEZONE": "UTC"}
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = llm_proxy.main(list(argv), env)
        return status, out.getvalue(), err.getvalue()

    def test_add_list_set_disable_rotate_delete_while_the_proxy_runs(self):
        status, out, _ = self.run_cli("keys", "add", "cli-key", "--max-tokens", "6",
                                      "--expires", "2027-01-31", "--priority", "low")
        self.assertEqual(status, 0)
        secret = out.split("): ", 1)[1].split()[0]
        self.assertTrue(secret.startswith("sk-"))
        self.assertIn("not stored anywhere", out)
        self.assertTrue(self.log.wait_for(lambda text: "keys file reloaded: 1 keys" in text))
        self.assertEqual(self.chat(key=secret)[0], 200)
        status, out, _ = self.run_cli("keys", "list")
        self.assertIn("cli-key", out)
        self.assertIn("2027-01-31", out)
        self.assertNotIn(llm_proxy.key_digest(secret), out)
        self.assertEqual(self.run_cli("keys", "set", "cli-key", "max_tokens=9", "note=x y",
                                      "priority=null")[0], 0)
        [entry] = self.entries()
        self.assertEqual((entry["max_tokens"], entry["note"]), (9, "x y"))
        self.assertNotIn("priority", entry)
        self.assertEqual(self.run_cli("keys", "disable", "cli-key")[0], 0)
        self.assertTrue(self.entries()[0]["disabled"])
        self.assertEqual(self.run_cli("keys", "enable", "cli-key")[0], 0)
        self.assertNotIn("disabled", self.entries()[0])
        status, out, _ = self.run_cli("keys", "rotate", "cli-key", "--grace", "60")
        self.assertEqual(status, 0)
        self.assertIn("previous_valid_until", self.entries()[0])
        self.assertEqual(self.run_cli("keys", "delete", "cli-key")[0], 0)
        self.assertEqual(self.entries(), [])
        status, out, _ = self.run_cli("audit")
        self.assertEqual(status, 0)
        lines = out.strip().splitlines()
        self.assertIn("removed", lines[1])
        self.assertIn("cli", lines[1])
        self.assertNotIn(secret, out)
        # the proxy reads what the command line recorded
        self.assertIn("cli", {r["who"] for r in self.audit()})

    def test_errors_are_one_line_and_a_status(self):
        self.run_cli("keys", "add", "dup")
        status, _, err = self.run_cli("keys", "add", "dup")
        self.assertEqual(status, 1)
        self.assertIn("exists already", err)
        status, _, err = self.run_cli("keys", "set", "dup", "max_tokens=lots")
        self.assertEqual(status, 1)
        self.assertIn("max_tokens", err)
        self.assertEqual(self.run_cli("keys", "delete", "nobody")[0], 1)
        self.assertEqual(len(err.strip().splitlines()), 1)

    def test_works_without_a_running_proxy_and_keygen_stays(self):
        self.proxy.shutdown()
        path = os.path.join(self.tmp, "other.json")
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = llm_proxy.main(["keys", "add", "solo"],
                                    {"KEYS_FILE": path, "STATE_DB": "off"})
        self.assertEqual(status, 0, err.getvalue())
        with open(path) as f:
            self.assertEqual(json.load(f)["keys"][0]["name"], "solo")
        with contextlib.redirect_stdout(out):
            self.assertEqual(llm_proxy.main(["keygen", "--name", "x"]), 0)


class PriorityGateTests(unittest.TestCase):
    """FairGate's classes, with threads and an injected clock, no sleeps."""

    def setUp(self):
        self.clock = FakeClock(0)
        self.gate = llm_proxy.FairGate(1, max_wait=30, clock=self.clock)
        self.order = []
        self.threads = []

    def wait_in_line(self, key, priority):
        entered = threading.Event()

        def run():
            entered.set()
            self.assertEqual(self.gate.enter(key, WAIT, lambda: False, priority), "ok")
            self.order.append(key)

        thread = threading.Thread(target=run)
        thread.start()
        self.threads.append(thread)
        entered.wait(WAIT)
        self.until(lambda: self.gate.waiting_by_key().get(key, 0) >= 1)

    def until(self, predicate):
        until(self, predicate)

    def serve_all(self, holder):
        """Hand the slot on, one waiter at a time, in the order the gate picks."""
        current = holder
        while True:
            count = len(self.order)
            self.gate.leave(current)
            if not self.gate.waiting() and count == len(self.order):
                self.until(lambda: len(self.order) > count or not self.threads_alive())
                if len(self.order) == count:
                    break
            self.until(lambda: len(self.order) > count)
            current = self.order[-1]
            if not self.gate.waiting():
                self.gate.leave(current)
                break
        for thread in self.threads:
            thread.join(WAIT)

    def threads_alive(self):
        return any(t.is_alive() for t in self.threads)

    def test_a_freed_slot_goes_to_the_highest_class_waiting(self):
        self.assertEqual(self.gate.enter("batch", WAIT, lambda: False, "low"), "ok")
        self.wait_in_line("batch", "low")
        self.wait_in_line("normal-1", "normal")
        self.wait_in_line("person", "high")
        self.serve_all("batch")
        self.assertEqual(self.order, ["person", "normal-1", "batch"])

    def test_a_low_request_that_waited_long_enough_is_served_as_normal(self):
        self.assertEqual(self.gate.enter("holder", WAIT, lambda: False), "ok")
        self.wait_in_line("batch", "low")
        self.clock.advance(30)
        self.wait_in_line("normal-1", "normal")  # came later, same class now
        self.serve_all("holder")
        self.assertEqual(self.order, ["batch", "normal-1"])

    def test_a_keys_higher_class_waiter_is_not_stuck_behind_its_own_low_one(self):
        """A front end's key may wait low for its own side work while its users wait high:
        both share the key's queue, and the key ranks by its best waiter."""
        self.assertEqual(self.gate.enter("holder", WAIT, lambda: False), "ok")
        self.wait_in_line("front-end", "low")  # its own work, queued first
        self.wait_in_line("other", "normal")
        self.wait_in_line("front-end", "high")  # one of its users
        self.serve_all("holder")
        self.assertEqual(self.order, ["front-end", "other", "front-end"])

    def test_fair_within_a_class(self):
        self.assertEqual(self.gate.enter("a", WAIT, lambda: False, "high"), "ok")
        self.wait_in_line("a", "high")
        self.wait_in_line("a", "high")
        self.wait_in_line("b", "high")
        self.serve_all("a")
        self.assertEqual(self.order[0], "b")  # fewest in flight goes first


class PriorityOverHttpTests(KeysAdminCase):
    settings = {"max_upstream_concurrency": 1}

    def test_the_high_key_goes_before_the_low_key_that_queued_first(self):
        holder = self.create("holder")
        low, high = self.create("batch", priority="low"), self.create("person", priority="high")
        held = self.hold_stream(holder)
        answers = []
        threads = []
        for key, model in ((low, "from-low"), (high, "from-high")):
            thread = threading.Thread(target=lambda k=key, m=model: answers.append(
                self.chat(key=k, model=m)[0]))
            thread.start()
            threads.append(thread)
            bucket = "key:" + llm_proxy.key_digest(key)
            self.until(lambda b=bucket: b in self.proxy.gate.waiting_by_key())
        self.upstream.release.set()
        held.read()
        for thread in threads:
            thread.join(WAIT)
        models = [json.loads(r[3])["model"] for r in self.upstream.requests]
        self.assertEqual(models, ["hold", "from-high", "from-low"])
        self.assertEqual(answers, [200, 200])


class MaxConcurrentTests(KeysAdminCase):

    def test_requests_beyond_max_concurrent_wait_their_turn(self):
        slots = llm_proxy.KeySlots(0)
        self.assertEqual(slots.wait("k", 1, WAIT, lambda: False), "ok")
        results = []
        thread = threading.Thread(target=lambda: results.append(
            slots.wait("k", 1, WAIT, lambda: False)))
        thread.start()
        self.until(lambda: slots.waiting("k") == 1)
        self.assertEqual(results, [])
        slots.leave("k")
        thread.join(WAIT)
        self.assertEqual(results, ["ok"])
        slots.leave("k")
        self.assertEqual(slots.wait("k", 1, WAIT, lambda: False), "ok")
        self.assertEqual(slots.wait("k", 1, 0, lambda: False), "timeout")

    def test_over_http_a_request_beyond_max_concurrent_waits_instead_of_429(self):
        secret = self.create("one-at-a-time", max_concurrent=1)
        held = self.hold_stream(secret)
        answers = []
        thread = threading.Thread(target=lambda: answers.append(self.chat(key=secret)[0]))
        thread.start()
        self.until(lambda: self.proxy.key_slots.waiting("key:" + llm_proxy.key_digest(secret)))
        self.assertEqual(answers, [])  # waiting its turn, not refused
        self.upstream.release.set()
        held.read()
        thread.join(WAIT)
        self.assertEqual(answers, [200])

    def test_a_request_let_in_before_the_cap_was_set_frees_no_counted_slot(self):
        """A request admitted while the key had no cap was not counted: when it ends it must
        not take the count of one admitted under the cap set meanwhile."""
        secret = self.create("later-capped")
        bucket = "key:" + llm_proxy.key_digest(secret)
        early = self.hold_stream(secret)  # in flight, uncounted
        self.assertEqual(self.admin("PATCH", "/admin/keys/later-capped",
                                    {"max_concurrent": 1})[0], 200)
        counted = self.hold_stream(secret)  # the one the cap lets in
        early.conn.sock.shutdown(socket.SHUT_RDWR)  # its client hangs up: that request ends
        self.assertTrue(self.log.wait_for(lambda text: "client closed" in text))
        answers = []
        thread = threading.Thread(target=lambda: answers.append(self.chat(key=secret)[0]))
        thread.start()
        self.until(lambda: self.proxy.key_slots.waiting(bucket) == 1)  # not let in beside it
        self.assertEqual(answers, [])
        self.upstream.release.set()
        counted.read()
        thread.join(WAIT)
        self.assertEqual(answers, [200])

    def test_it_waits_at_most_the_queue_timeout(self):
        self.proxy = self.start_another(upstream_queue_timeout=0.01)
        secret = self.create("one", max_concurrent=1)
        held = self.hold_stream(secret)
        status, _, body = self.chat(key=secret)
        self.assertEqual(status, 200)  # limit_response "message": the limit in words
        self.assertIn("too many requests at once", body.decode())
        self.upstream.release.set()
        held.read()


try:
    from tests.browser import Browser, find_chromium
except ImportError:  # (the driver needs POSIX pipes)
    Browser, find_chromium = None, lambda: None
CHROMIUM = find_chromium()


@unittest.skipIf(CHROMIUM is None, "no Chromium: set BROWSER_BIN or install chromium")
class DashboardKeysBrowserTests(KeysAdminCase):
    """The dashboard's key management in headless Chromium, on a first run (no keys file):
    create a key, use it, disable it (401), enable and rotate it, see the audit lines."""

    @classmethod
    def setUpClass(cls):
        cls.browser = Browser(CHROMIUM)
        cls.addClassCleanup(cls.browser.close)

    def signed_in(self):
        page = self.browser.new_page(1280, 1000)
        self.addCleanup(page.close)
        page.goto(self.proxy.url.replace("0.0.0.0", "127.0.0.1") + "/admin")
        page.wait_for("!document.getElementById('login').hidden")
        page.type("#admin-key", ADMIN)
        page.click("#login-form button[type=submit]")
        page.wait_for("!document.getElementById('content').hidden")
        return page

    def curl(self, key):
        """The status of a chat request sent by curl (by http.client where curl is missing)."""
        if shutil.which("curl") is None:
            return self.chat(key=key)[0]
        out = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
             f"Authorization: Bearer {key}", "-H", "Content-Type: application/json", "-d",
             '{"model": "fake-a", "messages": [{"role": "user", "content": "hi"}]}',
             self.proxy.url.replace("0.0.0.0", "127.0.0.1") + "/v1/chat/completions"],
            capture_output=True, text=True, timeout=WAIT)
        return int(out.stdout)

    def page_errors(self, page):
        """The page's errors but the sign-in's probe without a key (401 by design)."""
        return [e for e in page.errors if "401" not in e["text"]
                or "/admin/overview" not in e["text"]]

    def row_button(self, page, name, action):
        page.evaluate(f"document.querySelector('tr[data-key={json.dumps(name)}] "
                      f"button[data-action={action}]').click()")

    def test_create_use_disable_rotate_and_audit(self):
        page = self.signed_in()
        page.wait_for("!document.getElementById('key-form').hidden")
        page.type("#kf-name", "web-user")
        page.type("#kf-max_tokens", "50")
        page.type("#kf-expires_at", "2027-01-20")
        page.evaluate("document.getElementById('kf-priority').value = 'high'")
        page.click("#kf-submit")
        page.wait_for("document.getElementById('secret-value').textContent.startsWith('sk-')")
        self.assertFalse(page.evaluate("document.getElementById('secret-box').hidden"))
        self.assertIn("shown only this once", page.text("#secret-box"))
        secret = page.text("#secret-value")
        [entry] = self.entries()
        self.assertEqual((entry["max_tokens"], entry["priority"], entry["expires_at"]),
                         (50, "high", "2027-01-20"))
        self.assertEqual(self.curl(secret), 200)  # used at once
        page.wait_for("document.querySelector('tr[data-key=\"web-user\"]') !== null")
        self.assertIn("expires within 7 days",
                      page.text('tr[data-key="web-user"] td.name'))
        page.click("#hide-secret")

        self.row_button(page, "web-user", "disable")
        page.wait_for("document.querySelector('tr[data-key=\"web-user\"]')"
                      ".classList.contains('disabled')")
        self.assertEqual(self.curl(secret), 401)
        self.row_button(page, "web-user", "enable")
        page.wait_for("!document.querySelector('tr[data-key=\"web-user\"]')"
                      ".classList.contains('disabled')")
        self.assertEqual(self.curl(secret), 200)

        self.row_button(page, "web-user", "edit")
        self.assertEqual(page.evaluate("document.getElementById('kf-max_tokens').value"), "50")
        page.evaluate("document.getElementById('kf-max_tokens').value = ''")
        page.type("#kf-max_tokens", "70")
        page.evaluate("document.getElementById('kf-note').value = 'from the page'")
        page.click("#kf-submit")
        page.wait_for("document.getElementById('manage-status').textContent === "
                      "'web-user: saved.'")
        [entry] = self.entries()
        self.assertEqual((entry["max_tokens"], entry["note"], entry["priority"]),
                         (70, "from the page", "high"))

        page.evaluate("window.confirm = () => true")
        self.row_button(page, "web-user", "rotate")
        page.wait_for("document.getElementById('secret-value').textContent.startsWith('sk-')")
        new = page.text("#secret-value")
        self.assertNotEqual(new, secret)
        self.assertEqual(self.chat(key=new)[0], 200)
        self.assertEqual(self.chat(key=secret)[0], 200)  # an hour of grace
        self.wall.advance(3600)
        self.assertEqual(self.chat(key=secret)[0], 401)

        page.wait_for("document.querySelectorAll('#audit tbody tr').length >= 5")
        actions = page.evaluate("[...document.querySelectorAll('#audit tbody tr')]"
                                ".map((tr) => tr.cells[3].textContent + ' ' + "
                                "tr.cells[4].textContent + ' ' + tr.cells[2].textContent)")
        self.assertEqual([a.split(" ")[:2] for a in actions[:5]],
                         [["rotated", "web-user"], ["changed", "web-user"],
                          ["changed", "web-user"], ["changed", "web-user"],
                          ["added", "web-user"]])
        self.assertTrue(all(a.endswith("(dashboard)") for a in actions[:5]))
        self.assertEqual(self.audit()[1]["fields"], ["max_tokens", "note"])  # what changed
        self.assertNotIn(new, page.evaluate("document.getElementById('audit').textContent"))
        self.assertEqual(self.page_errors(page), [])

    def test_delete_is_confirmed(self):
        self.create("to-delete")
        page = self.signed_in()
        page.wait_for("document.querySelector('tr[data-key=\"to-delete\"]') !== null")
        page.evaluate("window.confirm = () => false")
        self.row_button(page, "to-delete", "delete")
        self.assertEqual([e["name"] for e in self.entries()], ["to-delete"])
        page.evaluate("window.confirm = () => true")
        self.row_button(page, "to-delete", "delete")
        page.wait_for("document.querySelector('tr[data-key=\"to-delete\"]') === null")
        self.assertEqual(self.entries(), [])
        self.assertEqual(self.page_errors(page), [])


class AuditSchemaTests(unittest.TestCase):

    def test_a_version_1_state_file_gets_the_audit_table_and_keeps_its_rows(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "state.db")
        db = sqlite3.connect(path, isolation_level=None)
        db.executescript(llm_proxy.MIGRATIONS[0] + "PRAGMA user_version = 1;")
        db.execute("INSERT INTO counters VALUES ('key:x', 1, 0, 2, 3, 4)")
        db.close()
        state = llm_proxy.StateFile(path)
        self.addCleanup(state.close)
        self.assertEqual(state.db.execute("PRAGMA user_version").fetchone(), (2,))
        self.assertEqual(state.db.execute("SELECT requests FROM counters").fetchall(), [(1,)])
        row = llm_proxy.AuditRow(5.0, "cli", "me@host", "added", "k", ("key",))
        llm_proxy.insert_audit(state.db, row)
        self.assertEqual(llm_proxy.audit_rows(state.db, 0, 10), [row])
