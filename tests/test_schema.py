import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

import initrules

SCHEMA_FILE = Path(__file__).parents[1] / "schemas" / "policy.schema.json"


def rendered_schema() -> str:
    return json.dumps(initrules.policy_json_schema(), indent=2, sort_keys=True) + "\n"


def test_checked_in_schema_is_current() -> None:
    if os.environ.get("INITRULES_UPDATE_SCHEMA") == "1":
        SCHEMA_FILE.write_text(rendered_schema(), encoding="utf-8")
    assert SCHEMA_FILE.read_text(encoding="utf-8") == rendered_schema(), (
        "schemas/policy.schema.json is stale; regenerate it with "
        "INITRULES_UPDATE_SCHEMA=1 pytest tests/test_schema.py"
    )


def test_schema_lists_every_scheme() -> None:
    schema = initrules.policy_json_schema()
    choices = schema["$defs"]["InitSpec"]["oneOf"]
    assert choices[0]["enum"] == initrules.scheme_names()
    assert [choice["title"] for choice in choices[1:]] == initrules.scheme_names()


def test_schema_allows_one_or_many_modules() -> None:
    module = initrules.policy_json_schema()["$defs"]["Match"]["properties"]["module"]
    assert {"type": "string"} in module["anyOf"]
    assert {"items": {"type": "string"}, "type": "array"} in module["anyOf"]


def test_scheme_arguments_forbid_extras() -> None:
    choices = initrules.policy_json_schema()["$defs"]["InitSpec"]["oneOf"][1:]
    kaiming = next(choice for choice in choices if choice["title"] == "kaiming_normal")
    assert kaiming["additionalProperties"] is False
    assert set(kaiming["properties"]) == {
        "scheme",
        "a",
        "mode",
        "nonlinearity",
        "fans",
        "fan_in",
        "fan_out",
        "chunks",
        "dim",
    }


SHIPPED = sorted((Path(__file__).parents[1] / "policies").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_shipped_policies_load(path: Path) -> None:
    policy = initrules.load_policy(path)
    assert policy.rules, f"{path.name} has no rules"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_shipped_policies_point_at_schema(path: Path) -> None:
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line == (
        "# yaml-language-server: $schema=../schemas/policy.schema.json"
    )


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_schema_accepts_shipped_policies(path: Path) -> None:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    jsonschema.validate(document, initrules.policy_json_schema())


SCHEMA_REJECTS = {
    "unknown-key": {"rules": [{"match": {"nmae": "x"}, "init": "zeros"}]},
    "unknown-scheme": {"rules": [{"match": {}, "init": "kaiming"}]},
    "foreign-argument": {
        "rules": [{"match": {}, "init": {"scheme": "normal", "gain": 2}}]
    },
    "missing-init": {"rules": [{"match": {}}]},
    "missing-rules": {"name": "x"},
    "bad-on-unmatched": {"on_unmatched": "ignore", "rules": []},
    "ndim-as-string": {"rules": [{"match": {"ndim": "2"}, "init": "zeros"}]},
}


@pytest.mark.parametrize(
    "document", list(SCHEMA_REJECTS.values()), ids=list(SCHEMA_REJECTS)
)
def test_schema_rejects_bad_policies(document: dict[str, object]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, initrules.policy_json_schema())
