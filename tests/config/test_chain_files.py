"""Chain files load in every form users write, and every mistake is reported where it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from pluginchain._config.files import load_file, parse_text
from pluginchain._config.issues import ConfigError
from pluginchain._config.registry import default_registry
from pluginchain._config.validation import validate_document
from pluginchain._engine.plan import compile_plan
from tests.support.scripted import scripted_registry

EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.fixture(scope="module")
def registry():
    return default_registry()


def errors_of(document, registry) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate_document(document, registry)
    return [str(issue) for issue in caught.value.issues]


def test_the_spec_basic_setup_loads_as_written(registry):
    chains = load_file(EXAMPLES / "spec" / "basic-setup.json", registry)
    [entry] = [p.entry for p in chains["default"].plugins]
    assert (entry.name, entry.stage, entry.enabled) == ("rate_limiter", "pre_request", True)
    assert (entry.config["limit"], entry.config["window"]) == (100, "1m")


def test_the_spec_parallel_setup_loads_as_written_comments_included(registry):
    text = (EXAMPLES / "spec" / "parallel-setup.json").read_text()
    assert "// Must run sequentially" in text and text.lstrip().startswith('"plugin_chain"')
    chains = load_file(EXAMPLES / "spec" / "parallel-setup.json", registry)
    plan = compile_plan(chains, registry)
    [first, second] = plan.get("default").stages["pre_request"]
    assert [p.id for p in first.sequential] == ["rate_limiter"]
    assert [p.id for p in second.parallel] == ["external_validator", "content_validator"]


def test_yaml_files_and_named_chains(tmp_path):
    path = tmp_path / "chains.yaml"
    path.write_text(
        "chains:\n"
        "  default:\n"
        "    - {name: scripted, id: a}\n"
        "  premium:\n"
        "    plugins:\n"
        "      - {name: scripted, id: b, priority: 2, parallel: true}\n"
        "      - {name: scripted, id: c, priority: 2, parallel: true}\n"
    )
    registry = scripted_registry()
    chains = load_file(path, registry)
    assert sorted(chains) == ["default", "premium"]
    assert [p.entry.instance_id for p in chains["premium"].plugins] == ["b", "c"]


def test_a_bare_plugin_list_is_the_default_chain():
    chains = validate_document([{"name": "scripted"}], scripted_registry())
    assert list(chains) == ["default"]


def test_every_error_is_reported_with_its_location(registry):
    document = {
        "plugins": [
            {"name": "rate_limiter", "config": {"limit": 0, "window": "soon"}},
            {"name": "content_filter", "parallel": True, "config": {"banned_patterns": ["ok", "(unclosed"]}},
            {"name": "no_such_plugin"},
            {"name": "rate_limiter", "stage": "later", "colour": "red"},
            {"name": "content_validator", "timeout": "-1s", "on_error": "shrug"},
        ]
    }
    errors = errors_of(document, registry)
    assert "plugins[1] (content_filter).config.banned_patterns[1]: not a valid RE2 pattern: missing )" in errors
    assert any(e.startswith("plugins[0] (rate_limiter).config.limit:") for e in errors)
    assert any(e.startswith("plugins[0] (rate_limiter).config.window: not a duration: 'soon'") for e in errors)
    assert any(e.startswith("plugins[2] (no_such_plugin).name: unknown plugin 'no_such_plugin'") for e in errors)
    assert "plugins[3] (rate_limiter).colour: unknown field" in errors
    assert any(e.startswith("plugins[3] (rate_limiter).stage: Input should be 'pre_request'") for e in errors)
    assert any(e.startswith("plugins[4] (content_validator).timeout:") for e in errors)
    assert any(e.startswith("plugins[4] (content_validator).on_error:") for e in errors)
    assert len(errors) >= 8


def test_stage_and_parallel_must_suit_the_plugin_class(registry):
    errors = errors_of(
        [
            {"name": "rate_limiter", "stage": "post_request"},
            {"name": "rate_limiter", "id": "second", "parallel": True},
        ],
        registry,
    )
    assert errors[0] == "[0] (rate_limiter).stage: rate_limiter cannot run in post_request; it supports: pre_request"
    assert errors[1] == "[1] (second).parallel: rate_limiter does not support parallel execution"


def test_duplicate_ids_need_an_explicit_id():
    errors = errors_of([{"name": "scripted"}, {"name": "scripted"}], scripted_registry())
    assert errors == ["[1] (scripted).id: duplicate plugin id 'scripted' (also [0]); give each instance a unique `id`"]
    assert validate_document([{"name": "scripted"}, {"name": "scripted", "id": "two"}], scripted_registry())


def test_unknown_config_fields_are_errors(registry):
    errors = errors_of([{"name": "rate_limiter", "config": {"limit": 5, "burst": 10}}], registry)
    assert errors == ["[0] (rate_limiter).config.burst: unknown field"]


def test_shape_errors_name_where_they_are():
    registry = scripted_registry()
    assert errors_of({"plugins": {"name": "scripted"}}, registry) == ["plugins: expected a list of plugins, got an object"]
    assert errors_of({"plugins": [], "chains": {}}, registry) == ["use one of `plugins`, `plugin_chain` or `chains`, not several"]
    assert errors_of({"plugins": ["scripted"]}, registry) == ["plugins[0]: expected a plugin object, got a string"]
    assert errors_of({"plugins": [], "version": 2}, registry) == [
        "version: unknown field; expected `plugins`, `plugin_chain` or `chains` (and `no_default_chain`)"
    ]
    assert errors_of({"chains": {"default": [], "Bad Name": []}}, registry) == [
        "chains.Bad Name: chain name 'Bad Name' must be lower-case letters, digits, '-', '_' or '.'"
    ]


def test_syntax_errors_name_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"plugins": [}')
    with pytest.raises(ConfigError) as caught:
        load_file(path, scripted_registry())
    assert str(path) in str(caught.value) and "not valid JSON" in str(caught.value)


def test_json_with_comments_and_trailing_commas_parses():
    assert parse_text('[{"name": "x", // the plugin\n "priority": 1,},]') == [{"name": "x", "priority": 1}]


@pytest.mark.parametrize(
    ("written", "problem"),
    [
        ("NaN", "must be a finite number"),
        ("Infinity", "must be a finite number"),
        ("1" + "0" * 400, "out of range"),
        ('"0s"', "must be positive"),
    ],
)
def test_a_duration_that_is_no_usable_number_is_an_error(written, problem):
    # JSON parsers accept NaN and Infinity: a NaN timeout would never fire.
    document = parse_text('[{"name": "scripted", "timeout": %s}]' % written)
    errors = errors_of(document, scripted_registry())
    assert len(errors) == 1 and errors[0].startswith("[0] (scripted).timeout:") and problem in errors[0], errors
