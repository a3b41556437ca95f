import pytest
import torch
from torch import nn

import initrules
from initrules import Matcher, PolicyError, TensorInfo, load_policy


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.proj = nn.Linear(8, 8)
        self.conv = nn.Conv1d(8, 8, 3)


class MyLinear(nn.Linear):
    pass


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = MyLinear(8, 4)
        self.norm = nn.LayerNorm(8)


def info(model: nn.Module, name: str) -> TensorInfo:
    """Find the TensorInfo of a named tensor through the planner's walk."""
    parameters, buffers = initrules.planner.walk_tensors(model)
    for entry in parameters + buffers:
        if entry.name == name:
            return entry.info
    raise KeyError(name)


def winner(policy_text: str, model: nn.Module, name: str) -> int | None:
    result = Matcher(load_policy(text=policy_text)).match(info(model, name))
    return None if result is None else result.rule_index


# (match mapping, tensor name, expected to match)
PREDICATES = [
    ("{module: Linear}", "blocks.0.proj.weight", True),
    ("{module: Linear}", "head.weight", True),
    ("{module: Linear, exact: true}", "head.weight", False),
    ("{module: MyLinear, exact: true}", "head.weight", True),
    ("{module: torch.nn.Linear}", "head.weight", True),
    ("{module: torch.nn.modules.linear.Linear}", "blocks.1.proj.bias", True),
    ("{module: torch.nn.Linear, exact: true}", "head.weight", False),
    ("{module: torch.nn.Conv2d}", "blocks.0.conv.weight", False),
    ("{module: not_imported.pkg.Thing}", "blocks.0.conv.weight", False),
    ("{module: 'Conv*d'}", "blocks.0.conv.weight", True),
    ("{module: 'Conv?d'}", "blocks.0.conv.weight", True),
    ("{module: [LayerNorm, Conv1d]}", "norm.weight", True),
    (
        "{module: MultiheadAttention, param: in_proj_weight}",
        "blocks.0.attn.in_proj_weight",
        True,
    ),
    ("{module: MultiheadAttention}", "blocks.0.attn.out_proj.weight", False),
    ("{within: MultiheadAttention}", "blocks.0.attn.out_proj.weight", True),
    ("{within: MultiheadAttention}", "blocks.0.attn.in_proj_weight", False),
    ("{within: Block, module: Linear}", "blocks.0.proj.weight", True),
    ("{within: Block, module: Linear}", "head.weight", False),
    ("{within: ModuleList}", "blocks.1.conv.bias", True),
    ("{param: '*_proj_*'}", "blocks.0.attn.in_proj_weight", True),
    ("{param: 'bias'}", "blocks.0.attn.in_proj_bias", False),
    ("{ndim: 3}", "blocks.0.conv.weight", True),
    ("{ndim: [1, 2]}", "blocks.0.conv.weight", False),
    ("{dtype: float32}", "norm.bias", True),
    ("{dtype: [float16, bfloat16]}", "norm.bias", False),
    ("{kind: buffer}", "norm.bias", False),
    ("{name: 'blocks.*.proj.weight'}", "blocks.1.proj.weight", True),
    ("{name: '**.weight', param: bias}", "head.bias", False),
    ("{regex: 'blocks\\.(?P<layer>\\d+)\\..*'}", "blocks.1.conv.bias", True),
    ("{regex: 'blocks'}", "blocks.1.conv.bias", False),
    ("{}", "head.bias", True),
]


@pytest.mark.parametrize(
    ("match", "name", "expected"),
    PREDICATES,
    ids=[f"{match}~{name}" for match, name, _ in PREDICATES],
)
def test_predicate(match: str, name: str, expected: bool) -> None:
    text = f"rules:\n  - match: {match}\n    init: zeros\n"
    matched = winner(text, Net(), name) == 0
    assert matched is expected, f"{match} on {name}: got {matched}"


def test_first_rule_wins_and_later_ones_are_recorded() -> None:
    policy = load_policy(
        text=(
            "rules:\n"
            "  - {match: {module: Conv1d}, init: zeros}\n"
            "  - {match: {param: weight}, init: ones}\n"
            "  - {match: {name: 'blocks.**'}, init: ones}\n"
            "  - {match: {module: Linear}, init: ones}\n"
        )
    )
    result = Matcher(policy).match(
        info(Net(), "blocks.0.conv.weight"), all_matches=True
    )
    assert result is not None
    assert result.rule_index == 0
    assert result.also_matched == (1, 2)


def test_also_matched_only_on_request() -> None:
    policy = load_policy(
        text="rules: [{match: {}, init: zeros}, {match: {}, init: ones}]"
    )
    result = Matcher(policy).match(info(Net(), "head.bias"))
    assert result is not None
    assert result.also_matched == ()


def test_regex_captures_named_groups() -> None:
    policy = load_policy(
        text="rules:\n"
        "  - match: {regex: 'blocks\\.(?P<layer>\\d+)\\.(?P<part>\\w+)\\..*'}\n"
        "    init: zeros\n"
    )
    result = Matcher(policy).match(info(Net(), "blocks.1.proj.weight"))
    assert result is not None
    assert dict(result.captures) == {"layer": "1", "part": "proj"}


def test_no_rule_matches() -> None:
    assert (
        winner("rules: [{match: {module: GRU}, init: zeros}]", Net(), "head.bias")
        is None
    )


def test_runaway_regex_times_out() -> None:
    model = nn.Module()
    # Overlapping branches make the backtracking exponential in the name's
    # length, so 200 characters exceed any timeout on any machine.
    model.add_module("a" * 200, nn.Linear(2, 2))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    policy = load_policy(
        text="rules:\n  - name: slow\n    match: {regex: '(a|a)+b'}\n    init: zeros\n"
    )
    with pytest.raises(PolicyError) as excinfo:
        initrules.apply(model, policy)
    assert str(excinfo.value) == (
        "<text>:2:5: the regex '(a|a)+b' of rule 1 'slow' timed out after 0.25 s on "
        f"the tensor name '{'a' * 60}...{'a' * 53}.weight'; simplify it (avoid "
        "repeats whose branches overlap, such as '(a|aa)+' or '(a+)+')"
    )
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_module_test_is_cached_per_class() -> None:
    policy = load_policy(text="rules: [{match: {module: Linear}, init: zeros}]")
    matcher = Matcher(policy)
    model = Net()
    for name in ("blocks.0.proj.weight", "blocks.1.proj.weight", "head.weight"):
        matcher.match(info(model, name))
    predicate = matcher._rules[0].module
    assert predicate is not None
    assert predicate.cache == {nn.Linear: True, MyLinear: True}


def test_unresolved_qualified_class_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    policy = load_policy(text="rules: [{match: {module: nn.Linear}, init: zeros}]")
    with caplog.at_level("WARNING", logger="initrules.matcher"):
        Matcher(policy)
    assert caplog.messages == [
        "module class 'nn.Linear' is not a class of any imported module, so no "
        "module can match it; check the path or use the bare class name"
    ]


INDEXED_POLICY = """
rules:
  - {match: {name: "blocks.1.attn.*"}, init: zeros}
  - {match: {name: "**.{proj,conv}.bias"}, init: zeros}
  - {match: {regex: 'blocks\\.(?P<layer>\\d+)\\.conv\\.weight'}, init: zeros}
  - {match: {name: "blocks.*.proj.weight", module: MyLinear}, init: zeros}
  - {match: {module: Linear, param: weight}, init: ones}
  - {match: {name: "**.weight", ndim: 2}, init: ones}
  - {match: {name: "h?ad.bias"}, init: zeros}
  - {match: {name: "blocks.0.**"}, init: zeros}
  - {match: {param: "*"}, init: zeros}
"""


def test_indexed_match_equals_linear_scan() -> None:
    # The fast path (candidates per static key, globs indexed by a literal
    # segment) must pick the same rule as testing every rule in order.
    policy = load_policy(text=INDEXED_POLICY)
    model = Net()
    names = [name for name, _ in model.named_parameters()]
    fast = Matcher(policy)
    scan = Matcher(policy)
    for name in names * 2:  # the second pass runs on the cached candidates
        tensor = info(model, name)
        indexed = fast.match(tensor)
        linear = scan.match(tensor, all_matches=True)
        assert indexed is not None, name
        assert linear is not None, name
        assert indexed.rule_index == linear.rule_index, name
        assert dict(indexed.captures) == dict(linear.captures), name


def test_indexed_match_keeps_captures() -> None:
    policy = load_policy(text=INDEXED_POLICY)
    result = Matcher(policy).match(info(Net(), "blocks.1.conv.weight"))
    assert result is not None
    assert result.rule_index == 2
    assert dict(result.captures) == {"layer": "1"}
