"""The README and the code stay in step: reasons, attributes and policy keys."""

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
)

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLE = (ROOT / "examples" / "policy.yaml").read_text(encoding="utf-8")


class TestReadme:
    @pytest.mark.parametrize("reason", sorted(HINTS))
    def test_every_reason_is_in_the_catalogue_table(self, reason):
        """Each reason code has a row with its hint in the README."""
        assert f"| `{reason}` |" in README
        assert HINTS[reason] in README

    @pytest.mark.parametrize("attribute", REQUEST_ATTRIBUTES + RESPONSE_ATTRIBUTES)
    def test_every_attribute_is_listed(self, attribute):
        """The README lists every attribute the filter config asks Envoy for."""
        assert f"`{attribute}`" in README

    def test_filter_settings(self):
        """The README states the timeout and metadata namespace the code uses."""
        assert f"`{MESSAGE_TIMEOUT}`" in README
        assert f'["{METADATA_NAMESPACE}"]' in README

    @pytest.mark.parametrize("key", sorted(_KEYS))
    def test_every_policy_key_is_documented(self, key):
        """Each policy key has a row in the README and a line in the example policy
        (commented out where the key has no default, like a secret's file)."""
        assert f"| `{key}` |" in README
        assert f"\n{key}:" in EXAMPLE or f"\n# {key}:" in EXAMPLE

    def test_two_commands_come_first(self):
        """The README shows make run and make test before anything else."""
        first_block = README.split("```")[1]
        assert "make run" in first_block
        assert "make test" in first_block


class TestCommandsTable:
    def test_every_serve_flag_is_in_the_readme(self):
        """Each `extproc serve` option appears in the README's Commands table."""
        from extproc.cli import build_parser

        parser = build_parser()
        serve = parser._subparsers._group_actions[0].choices["serve"]  # argparse keeps them here
        flags = [
            o for action in serve._actions for o in action.option_strings if o.startswith("--")
        ]
        row = next(line for line in README.splitlines() if line.startswith("| `extproc serve "))
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
