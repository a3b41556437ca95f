"""Property tests: any text given to the loader yields a Policy or a PolicyError."""

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from initrules import Policy, PolicyError, load_policy, scheme_names

NAMES = st.sampled_from(
    ["**.bias", "h.*.attn.c_proj.weight", "wte.weight", "{a,b}.w", "h.[0-3].*"]
)
MODULES = st.sampled_from(["Linear", "torch.nn.Linear", "Conv*d", "LayerNorm"])
MATCH = st.fixed_dictionaries(
    {},
    optional={
        "name": NAMES,
        "module": st.one_of(MODULES, st.lists(MODULES, min_size=1, max_size=3)),
        "param": st.sampled_from(["weight", "bias", "*_proj"]),
        "ndim": st.one_of(st.integers(0, 5), st.lists(st.integers(0, 5), max_size=3)),
        "dtype": st.sampled_from(["float32", "bfloat16", "int64"]),
        "exact": st.booleans(),
    },
).map(lambda match: match if "module" in match else match | {"exact": False})
INIT = st.one_of(
    st.sampled_from(["zeros", "ones", "xavier_uniform", "orthogonal", "keep"]),
    st.builds(
        lambda std: {"scheme": "normal", "std": std},
        st.floats(0, 1, allow_nan=False),
    ),
    st.builds(
        lambda mode, nonlinearity: {
            "scheme": "kaiming_normal",
            "mode": mode,
            "nonlinearity": nonlinearity,
        },
        st.sampled_from(["fan_in", "fan_out"]),
        st.sampled_from(["relu", "linear", "tanh"]),
    ),
)
RULE = st.fixed_dictionaries(
    {"match": MATCH, "init": INIT}, optional={"name": st.text(max_size=12)}
)
POLICY = st.fixed_dictionaries(
    {"rules": st.lists(RULE, max_size=4)},
    optional={
        "version": st.just(1),
        "name": st.text(max_size=20),
        "on_unmatched": st.sampled_from(["error", "warn", "keep"]),
    },
)

# Values that a mutation may put anywhere in a policy.
ODD_VALUES = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.sampled_from(["1e999", "\u202e", "\U0001f600", "\x85", "0x10", "~", "&a"]),
)


def mutate(data: object, draw: st.DrawFn) -> object:
    """Replace, delete or add one key or item somewhere inside ``data``."""
    if isinstance(data, dict) and data:
        key = draw(st.sampled_from(sorted(data, key=str)))
        action = draw(st.sampled_from(["replace", "delete", "add", "descend"]))
        changed = dict(data)
        if action == "replace":
            changed[key] = draw(ODD_VALUES)
        elif action == "delete":
            del changed[key]
        elif action == "add":
            changed[draw(st.text(min_size=1, max_size=8))] = draw(ODD_VALUES)
        else:
            changed[key] = mutate(data[key], draw)
        return changed
    if isinstance(data, list) and data:
        index = draw(st.integers(0, len(data) - 1))
        changed_list = list(data)
        changed_list[index] = mutate(data[index], draw)
        return changed_list
    return draw(ODD_VALUES)


@st.composite
def policy_texts(draw: st.DrawFn) -> str:
    data: object = draw(POLICY)
    if draw(st.booleans()):
        data = mutate(data, draw)
    text = yaml.safe_dump(data, allow_unicode=draw(st.booleans()))
    edit = draw(st.sampled_from(["none", "truncate", "insert", "tabs"]))
    if edit == "truncate" and text:
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif edit == "insert":
        position = draw(st.integers(0, len(text)))
        text = text[:position] + draw(st.text(max_size=4)) + text[position:]
    elif edit == "tabs":
        text = text.replace("  ", "\t")
    return text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy_texts())
def test_load_gives_policy_or_positioned_error(text: str) -> None:
    try:
        policy = load_policy(text=text)
    except PolicyError as error:
        assert error.line is not None, f"no line in {error!s} for {text!r}"
        assert error.column is not None, f"no column in {error!s} for {text!r}"
        assert error.line >= 1
        assert str(error).startswith(f"<text>:{error.line}:{error.column}: ")
    else:
        assert isinstance(policy, Policy)


class QuotedDumper(yaml.SafeDumper):
    """Quote every string, since PyYAML's YAML 1.1 dumper leaves strings such
    as '0E0' plain, which YAML 1.2 (and so the loader) reads as numbers."""


QuotedDumper.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style='"'
    ),
)


@settings(max_examples=200, deadline=None)
@given(POLICY)
def test_valid_policies_round_trip(data: dict[str, object]) -> None:
    policy = load_policy(text=yaml.dump(data, Dumper=QuotedDumper))
    assert len(policy.rules) == len(data["rules"])  # type: ignore[arg-type]
    for rule in policy.rules:
        assert rule.init.scheme in scheme_names()
        assert rule.location is not None
