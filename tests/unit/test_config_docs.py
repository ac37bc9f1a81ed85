"""docs/configuration.md's table of keys is what the validator's own table renders (``blipmon.core.config_docs``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from blipmon.core import config_docs, schema
from blipmon.core.config import ConfigError, validate

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_committed_page_is_what_the_schema_renders() -> None:
    page = PAGE.read_text(encoding="utf-8")
    assert page == config_docs.render_page(page), (
        "docs/configuration.md is out of date: run `.venv/bin/python -m blipmon.core.config_docs` and commit it"
    )


def test_every_key_has_its_meaning_and_one_row() -> None:
    table = config_docs.render_keys()
    for key, field in schema.SCHEMA.items():
        assert field.doc, f"{key} has no meaning to show (Field.doc)"
        assert table.count(f"| `{key}` |") == 1, key


def test_a_bound_the_validator_enforces_is_the_bound_the_page_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Moving a bound moves both the check and the row: the page cannot keep an old range."""
    field = dataclasses.replace(schema.SCHEMA["train.batch_size"], maximum=4096, doc_allowed=None)
    monkeypatch.setitem(schema.SCHEMA, "train.batch_size", field)
    assert "| `train.batch_size` | integer | `8` | [1, 4096] |" in config_docs.render_keys()
    with pytest.raises(ConfigError, match="train.batch_size = 4097"):
        validate({"train": {"batch_size": 4097}})


def test_the_prose_around_the_table_stays() -> None:
    page = "# Title\n\nintro\n\n" + config_docs.BEGIN + "\nold table\n" + config_docs.END + "\n\nmore prose\n"
    out = config_docs.render_page(page)
    assert out.startswith("# Title\n\nintro\n\n" + config_docs.BEGIN + "\n| key | type |")
    assert out.endswith(config_docs.END + "\n\nmore prose\n") and "old table" not in out
