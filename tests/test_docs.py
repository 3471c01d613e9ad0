"""
The configuration reference names every setting with its default.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.config import SETTINGS

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


class ConfigurationDocTests(SynchronousTestCase):
    def test_every_setting_documented(self) -> None:
        with open(os.path.join(ROOT, "docs", "configuration.md")) as handle:
            text = handle.read()
        for setting in SETTINGS:
            row = f"| `{setting.env}` | `--{setting.option}` | "
            self.assertIn(row, text, setting.env)
            line = text[text.index(row):].splitlines()[0]
            expected = f"`{setting.default}`" if setting.default else "empty"
            self.assertIn(f"| {expected} |", line, setting.env)

    def test_readme_opens_with_the_two_commands(self) -> None:
        with open(os.path.join(ROOT, "README.md")) as handle:
            first_block = handle.read().split("```sh\n", 1)[1].split("```", 1)[0]
        self.assertIn("./dev serve", first_block)
        self.assertIn("./dev test", first_block)
        with open(os.path.join(ROOT, ".ci", "run")) as handle:
            self.assertIn("./dev test", handle.read())
