"""Settings: every field is documented, and docs/configuration.md's table is the generated one."""

from __future__ import annotations

import pathlib

from personalkv.config import Settings, markdown_table

CONFIGURATION_DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_setting_has_a_description():
    for section in Settings.model_fields.values():
        for name, field in section.default_factory.model_fields.items():
            assert field.description, f"{section.default_factory.__name__}.{name} has no description"


def test_docs_configuration_table_is_current():
    text = CONFIGURATION_DOC.read_text()
    start = text.index("<!-- config-table:start -->") + len("<!-- config-table:start -->")
    end = text.index("<!-- config-table:end -->")
    assert text[start:end].strip() == markdown_table().strip(), (
        "docs/configuration.md's settings table is stale: "
        "regenerate it with `python -m personalkv.config`"
    )


def test_env_prefix_reaches_a_field(monkeypatch):
    monkeypatch.setenv("PERSONALKV_MODEL_DTYPE", "bfloat16")
    assert Settings().model.dtype == "bfloat16"
