"""runtime/spec/manifest_schema.json: one file of manifest rules, shipped with the Python package, compiled
into the C++ library, interpreted by runtime/spec/schema.py (here, against hand-written expectations) and
runtime/cpp/src/schema.cpp (the differential tests in test_cpp_runtime.py hold the two together),
and documented by a table generated from it in engines/README.md."""
from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from ditrt.runtime.spec import schema
from ditrt.runtime.core.errors import ArtifactError
from ditrt.runtime.spec.schema import Context, check_object

ROOT = Path(__file__).resolve().parent.parent

# What each rule type may carry: a typo ("min_opne") would be ignored by both interpreters alike.
RULE_KEYS = {"type", "doc", "missing", "optional", "nullable", "default", "default_from"}
TYPE_KEYS = {"int": {"min", "max"}, "number": {"min", "max", "min_open", "float32"}, "bool": set(),
             "choice": {"values", "values_from", "refused"}, "const": {"value", "why"}, "equal": {"value"},
             "text": set(), "int_or_text": set(), "strings": set(), "object": {"object"}, "map": {"values"}}
CHECK_KEYS = {"ordered": {"fields", "above", "below"}, "needs": {"field", "value", "needs", "why"},
              "equal": {"field", "to", "why"}}


def _rules_of(spec):
    for rule in spec["fields"].values():
        yield rule
        if rule["type"] == "map":
            yield rule["values"]


def test_every_rule_is_well_formed():
    objects = schema.rules()["objects"]
    for name, spec in objects.items():
        assert set(spec) <= {"at", "about", "fields", "checks", "extra"}, name
        for rule in _rules_of(spec):
            assert rule["type"] in TYPE_KEYS, (name, rule)
            assert set(rule) <= RULE_KEYS | TYPE_KEYS[rule["type"]], (name, rule)
            assert rule["type"] != "object" or rule["object"] in objects
        for check in spec.get("checks", ()):
            assert set(check) == {"rule"} | CHECK_KEYS[check["rule"]], (name, check)
            named = check["fields"] if check["rule"] == "ordered" else [check["field"]] + ([check["to"]] if "to" in check else [])
            assert set(named) <= set(spec["fields"]), (name, check)


def test_the_registries_section_is_the_built_in_registries():
    """The families' defaults and the samplers' families and options that the C++ reader reads are the
    Python registries' built-in entries, in their order (a sampler added to SAMPLERS must be added here)."""
    from ditrt.runtime.spec.config import FAMILIES
    from ditrt.runtime.sampling.samplers import SAMPLERS
    assert schema.registry("samplers") == {name: {"family": s.family, "options": list(s.options)}
                                          for name, s in SAMPLERS.items()}
    assert list(schema.registry("samplers")) == list(SAMPLERS)
    assert {name: {"defaults": f.defaults.to_dict()} for name, f in FAMILIES.items()} == schema.registry("families")


def test_the_schema_ships_with_the_package_and_is_compiled_into_the_cpp_library():
    """One source: the package data names it, CMake embeds that same file, no copy is in the tree."""
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "manifest_schema.json" in package_data["ditrt.runtime.spec"]
    assert schema.SCHEMA_FILE == ROOT / "runtime" / "spec" / "manifest_schema.json"
    cmake = (ROOT / "runtime" / "cpp" / "CMakeLists.txt").read_text()
    assert "${CMAKE_CURRENT_SOURCE_DIR}/../spec/manifest_schema.json" in cmake
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert [f for f in tracked if f.endswith("manifest_schema.json")] == ["runtime/spec/manifest_schema.json"]


def test_engines_readme_table_is_the_schema_table():
    text = (ROOT / "engines" / "README.md").read_text()
    found = re.search(r"<!-- manifest-schema-table: generated, do not edit -->\n(.*?)<!-- /manifest-schema-table -->",
                      text, re.S)
    assert found, "engines/README.md lacks the generated field table"
    assert found.group(1) == schema.markdown_table(), "regenerate the table:\n" + schema.markdown_table()


def test_the_table_lists_every_field_with_its_bounds():
    """Spot checks of the generator against the schema's content, written out by hand."""
    table = schema.markdown_table()
    assert "| `model.input_size` | int in [1, 2^20] (latent side) | required |" in table
    assert "| `diffusion.num_train_timesteps` | int in [2, 100000] | required |" in table
    assert "| `defaults.*` | no other key | |" in table
    assert "- `diffusion`: 0 < `beta_start` <= `beta_end` < 1" in table
    assert len([line for line in table.splitlines() if line.startswith("| `")]) == schema.field_count()[0] + 1


DIFFUSION = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
             "variance": "learned_range"}
SIGMA = Context(refs={"model.learn_sigma": True})


def test_defaults_are_filled_and_numbers_are_floats():
    values = check_object("diffusion", DIFFUSION, "diffusion", SIGMA)
    assert values == {**DIFFUSION, "prediction": "epsilon", "clip_denoised": False}
    values = check_object("transport", {"path_type": "Linear", "prediction": "velocity", "train_eps": 0}, "transport")
    assert values["train_eps"] == 0.0 and isinstance(values["train_eps"], float) and values["sample_eps"] == 0.0


@pytest.mark.parametrize("edit, message", [
    ({"num_train_timesteps": 1}, "manifest field diffusion.num_train_timesteps must be an integer from 2 to 100000, got 1"),
    ({"num_train_timesteps": 1000.0}, "diffusion.num_train_timesteps must be an integer from 2 to 100000, got 1000.0"),
    ({"num_train_timesteps": None}, "diffusion.num_train_timesteps must be an integer from 2 to 100000, got None"),
    ({"beta_schedule": "cosine"}, "diffusion.beta_schedule must be one of 'linear', got 'cosine'"),
    ({"beta_start": 0}, "diffusion.beta_start must be a number > 0, got 0"),
    ({"clip_denoised": 0}, "diffusion.clip_denoised is 0: this runtime samples as the official sample.py"),
    ({"beta_start": 0.5, "beta_end": 0.1},
     "manifest fields diffusion.beta_start 0.5 and beta_end 0.1 need 0 < beta_start <= beta_end < 1"),
    ({"beta_end": 1.0}, "need 0 < beta_start <= beta_end < 1"),
])
def test_field_and_cross_field_refusals_name_the_field(edit, message):
    with pytest.raises(ArtifactError, match=re.escape(message)):
        check_object("diffusion", {**DIFFUSION, **edit}, "diffusion", SIGMA)


def test_needs_and_equal_checks():
    with pytest.raises(ArtifactError, match=re.escape("diffusion.variance is learned_range, but model.learn_sigma is false")):
        check_object("diffusion", DIFFUSION, "diffusion", Context(refs={"model.learn_sigma": False}))
    assert check_object("diffusion", {**DIFFUSION, "variance": "fixed_large"}, "diffusion",
                        Context(refs={"model.learn_sigma": False}))["variance"] == "fixed_large"
    with pytest.raises(ArtifactError, match=re.escape("c.null is 9, but it must equal num_classes = 10")):
        check_object("condition", {"num_classes": 10, "null": 9}, "c")


def test_refused_values_give_their_reason_and_extra_keys_are_refused_where_the_schema_says():
    with pytest.raises(ArtifactError, match=re.escape("transport.path_type is 'GVP': only the Linear path is implemented")):
        check_object("transport", {"path_type": "GVP", "prediction": "velocity"}, "transport")
    assert check_object("transport", {"path_type": "Linear", "prediction": "velocity", "anything": 1}, "transport") == {
        "path_type": "Linear", "prediction": "velocity", "train_eps": 0.0, "sample_eps": 0.0}
    family = Context(choices={"samplers of the family": ["ddim"], "guidance.guided_channels": ["official"]},
                     defaults={"sampler": "ddim", "steps": 250, "cfg_scale": 4.0, "guidance": "official"})
    with pytest.raises(ArtifactError, match=re.escape("defaults has unknown keys ['a', 'seed']; it takes sampler, steps, "
                                                      "cfg_scale, guidance, eta")):
        check_object("defaults", {"seed": 1, "a": 2}, "defaults", family)
    assert check_object("defaults", {"eta": None}, "defaults", family) == {
        "sampler": "ddim", "steps": 250, "cfg_scale": 4.0, "guidance": "official"}


def test_map_values_are_checked_against_a_reference():
    context = Context(refs={"model.in_channels": 4})
    assert check_object("guidance", {"guided_channels": {"official": 3, "standard": 4}}, "guidance", context) == {
        "guided_channels": {"official": 3, "standard": 4}}
    with pytest.raises(ArtifactError, match=re.escape("guidance.guided_channels.standard must be an integer from 1 to 4, got 5")):
        check_object("guidance", {"guided_channels": {"standard": 5}}, "guidance", context)
    with pytest.raises(ArtifactError, match=re.escape("guidance.guided_channels must be a non-empty object, got {}")):
        check_object("guidance", {"guided_channels": {}}, "guidance", context)


def test_a_broken_schema_is_a_programming_error_not_an_artifact_error(monkeypatch):
    broken = json.loads(schema.SCHEMA_FILE.read_text())
    broken["objects"]["transport"]["fields"]["path_type"]["type"] = "strnig"
    monkeypatch.setattr(schema, "rules", lambda: broken)
    with pytest.raises(ValueError, match="unknown rule type 'strnig'"):
        check_object("transport", {"path_type": "Linear"}, "transport")
