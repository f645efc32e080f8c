"""The README against the code: its settings table is read against the SETTINGS rows, and the
links between the README and docs/ lead somewhere."""

from __future__ import annotations

import os
import re
import unittest

from llm_proxy import SETTINGS

from tests.support import HERE

README = os.path.join(HERE, "README.md")

#: A settings-table row: "| `NAME` (`ALIAS`), `OTHER` | default | meaning |".
_ROW = re.compile(r"^\|\s*(`[^|]*)\|([^|]*)\|")
_NAME = re.compile(r"`([A-Z][A-Z0-9_]*)`(?:\s*\(([^)]*)\))?")


def settings_table(text: str) -> dict[str, tuple[frozenset[str], str]]:
    """The README's settings table: each variable with its aliases and its default cell."""
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    table: dict[str, tuple[frozenset[str], str]] = {}
    for line in section.splitlines():
        row = _ROW.match(line)
        if row is None:
            continue
        for name, aliases in _NAME.findall(row.group(1)):
            table[name] = (frozenset(re.findall(r"`([A-Z][A-Z0-9_]*)`", aliases)),
                           row.group(2).strip())
    return table


def default_cell(default: str) -> str:
    """How the table writes a default: `value`, or the word empty."""
    return f"`{default}`" if default else "empty"


class SettingsTableTests(unittest.TestCase):
    """The README documents every setting (the developers' guide), read from SETTINGS at run
    time: a row added to SETTINGS without its line in the table fails here, and so does a line
    left behind for a setting that no longer exists."""

    @classmethod
    def setUpClass(cls):
        with open(README, encoding="utf-8") as f:
            cls.table = settings_table(f.read())

    def test_the_table_is_read(self):
        self.assertIn("HOST", self.table)
        self.assertEqual(self.table["BASE_API_URL"][0], frozenset({"UPSTREAM_BASE_URL"}))
        self.assertEqual(self.table["PORT"][1], "`8899`")

    def test_every_setting_has_its_row_with_its_aliases_and_default(self):
        for setting in SETTINGS:
            with self.subTest(setting=setting.env):
                if setting.env not in self.table:
                    self.fail("no row in the README's settings table")
                aliases, default = self.table[setting.env]
                self.assertEqual(aliases, frozenset(setting.aliases), "aliases")
                self.assertTrue(default.startswith(default_cell(setting.default)),
                                f"default: the table says {default!r}, the code "
                                f"{setting.default!r}")

    def test_every_variable_in_the_table_is_a_setting(self):
        names = {setting.env for setting in SETTINGS}
        aliases = {alias for setting in SETTINGS for alias in setting.aliases}
        for name, (its_aliases, _default) in self.table.items():
            with self.subTest(variable=name):
                if name not in names:
                    self.fail("the table documents a setting the code does not have")
                self.assertEqual(its_aliases - aliases, set(), "aliases the code does not have")


class LinkTests(unittest.TestCase):
    """The README and docs/ link to each other's sections: every relative link names a file
    that exists and, with a #fragment, a heading in it."""

    @staticmethod
    def anchors(path: str) -> set[str]:
        """GitHub's anchors: a heading lowercased, punctuation dropped, spaces made hyphens."""
        with open(path, encoding="utf-8") as f:
            text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
        found: set[str] = set()
        for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
            anchor = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
            while anchor in found:
                anchor += "-1"
            found.add(anchor)
        return found

    def test_relative_links_lead_to_a_file_and_heading(self):
        documents = [README] + [os.path.join(HERE, "docs", name)
                                for name in sorted(os.listdir(os.path.join(HERE, "docs")))
                                if name.endswith(".md")]
        for document in documents:
            with open(document, encoding="utf-8") as f:
                links = re.findall(r"\]\(([^)\s]+)\)", f.read())
            for link in links:
                if re.match(r"[a-z]+:", link):
                    continue  # an absolute URL
                with self.subTest(document=os.path.relpath(document, HERE), link=link):
                    target, _, fragment = link.partition("#")
                    path = (os.path.normpath(os.path.join(os.path.dirname(document), target))
                            if target else document)
                    self.assertTrue(os.path.exists(path), "no such file")
                    if fragment:
                        self.assertIn(fragment, self.anchors(path), "no such heading")


if __name__ == "__main__":
    unittest.main()
