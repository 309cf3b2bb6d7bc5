"""The docs and the code stay in step: reasons, attributes and policy keys, each on its page;
the README stays short and starts with the two commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from extproc.config import _KEYS
from extproc.diagnosis import HINTS
from extproc.filter_config import (
    MESSAGE_TIMEOUT,
    METADATA_NAMESPACE,
    REQUEST_ATTRIBUTES,
    RESPONSE_ATTRIBUTES,
    SAMPLE_ATTRIBUTES,
)

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ROOT / "docs"
REASONS = (DOCS / "reasons.md").read_text(encoding="utf-8")
FILTER_SETTINGS = (DOCS / "filter-settings.md").read_text(encoding="utf-8")
POLICY = (DOCS / "policy.md").read_text(encoding="utf-8")
COMMANDS = (DOCS / "commands.md").read_text(encoding="utf-8")
# A newcomer reads the README in five minutes; everything else is a page of docs/.
README_MAX_LINES = 250
EXAMPLE = (ROOT / "examples" / "policy.yaml").read_text(encoding="utf-8")


class TestPages:
    @pytest.mark.parametrize("reason", sorted(HINTS))
    def test_every_reason_is_in_the_catalogue_table(self, reason):
        """Each reason code has a row with its hint in docs/reasons.md, opening with the
        anchor the live page links to (`reason-CODE`)."""
        assert f'| <a id="reason-{reason}"></a>`{reason}` |' in REASONS
        assert HINTS[reason] in REASONS

    @pytest.mark.parametrize(
        "attribute",
        REQUEST_ATTRIBUTES + RESPONSE_ATTRIBUTES + tuple(a for a, _ in SAMPLE_ATTRIBUTES),
    )
    def test_every_attribute_is_listed(self, attribute):
        """docs/filter-settings.md lists every attribute the filter config asks Envoy for."""
        assert f"`{attribute}`" in FILTER_SETTINGS

    def test_filter_settings(self):
        """docs/filter-settings.md states the timeout and metadata namespace the code uses."""
        assert f"`{MESSAGE_TIMEOUT}`" in FILTER_SETTINGS
        assert f'["{METADATA_NAMESPACE}"]' in FILTER_SETTINGS

    @pytest.mark.parametrize("key", sorted(_KEYS))
    def test_every_policy_key_is_documented(self, key):
        """Each policy key has a row in docs/policy.md and a line in the example policy
        (commented out where the key has no default, like a secret's file)."""
        assert f"| `{key}` |" in POLICY
        assert f"\n{key}:" in EXAMPLE or f"\n# {key}:" in EXAMPLE


class TestReadme:
    def test_short(self):
        """The README fits in a five-minute read: at most README_MAX_LINES lines."""
        assert len(README.splitlines()) <= README_MAX_LINES

    def test_links_land_on_files(self):
        """Every relative link in the README names a file of the repository (the site's
        own build checks docs/; the README is outside it)."""
        targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
        relative = [t for t in targets if not t.startswith(("http://", "https://"))]
        assert relative
        assert [t for t in relative if not (ROOT / t).exists()] == []

    def test_two_commands_come_first(self):
        """The README shows make run and make test before anything else."""
        first_block = README.split("```")[1]
        assert "make run" in first_block
        assert "make test" in first_block


class TestCommandsTable:
    def test_every_serve_flag_is_in_the_commands_page(self):
        """Each `extproc serve` option appears in docs/commands.md's table."""
        from extproc.cli import build_parser

        parser = build_parser()
        serve = parser._subparsers._group_actions[0].choices["serve"]  # argparse keeps them here
        flags = [
            o for action in serve._actions for o in action.option_strings if o.startswith("--")
        ]
        row = next(line for line in COMMANDS.splitlines() if line.startswith("| `extproc serve "))
        missing = [flag for flag in flags if flag != "--help" and flag not in row]
        assert missing == []


THREAT_MODEL = (ROOT / "docs" / "threat-model.md").read_text(encoding="utf-8")


class TestThreatModel:
    """docs/threat-model.md stays true: every test it names exists, every key has rows."""

    @pytest.mark.parametrize(
        "reference",
        sorted(set(re.findall(r"`(tests/[\w/]+\.py)((?:::\w+)*)`", THREAT_MODEL))),
        ids="".join,
    )
    def test_named_test_exists(self, reference):
        path, names = reference
        source = (ROOT / path).read_text(encoding="utf-8")
        for name in filter(None, names.split("::")):
            assert re.search(rf"^\s*(?:async )?(?:def|class) {name}\b", source, re.M), (
                f"{path} has no {name}"
            )

    @pytest.mark.parametrize("key", sorted(_KEYS))
    def test_every_policy_key_has_rows(self, key):
        assert f"`{key}`" in THREAT_MODEL.split("## Policy keys and their rows")[1]
