import pytest

from initrules.globs import GlobError, compile_glob

# (pattern, name, expected match)
CASES = [
    ("transformer.h.*.attn.c_proj.weight", "transformer.h.3.attn.c_proj.weight", True),
    (
        "transformer.h.*.attn.c_proj.weight",
        "transformer.h.3.x.attn.c_proj.weight",
        False,
    ),
    ("h.*", "h.0", True),
    ("h.*", "h.0.weight", False),
    ("*.weight", "weight", False),
    ("h.0*.w", "h.07.w", True),
    ("**", "a", True),
    ("**", "a.b.c", True),
    ("**.bias", "bias", True),
    ("**.bias", "h.0.attn.bias", True),
    ("**.bias", "h.0.attn.xbias", False),
    ("**.bias", "h.0.attn.bias.x", False),
    ("h.**.bias", "h.bias", True),
    ("h.**.bias", "h.0.attn.bias", True),
    ("h.**.bias", "hx.bias", False),
    ("h.**.bias", "x.h.bias", False),
    ("h.**", "h", True),
    ("h.**", "h.0.w", True),
    ("h.**", "hh.0", False),
    ("**.**.w", "a.w", True),
    ("h.?.w", "h.1.w", True),
    ("h.?.w", "h.12.w", False),
    ("h.?.w", "h...w", False),
    ("h.[0-3].w", "h.2.w", True),
    ("h.[0-3].w", "h.4.w", False),
    ("h.[!0-3].w", "h.4.w", True),
    ("h.[!0-3].w", "h.2.w", False),
    ("h.[^0-3].w", "h.4.w", True),
    ("[]x]", "]", True),
    ("[a-]", "-", True),
    ("h.{attn,mlp}.c_proj.weight", "h.mlp.c_proj.weight", True),
    ("h.{attn,mlp}.c_proj.weight", "h.ln.c_proj.weight", False),
    ("{attn.c_proj,mlp.c_fc}.weight", "attn.c_proj.weight", True),
    ("{attn.c_proj,mlp.c_fc}.weight", "attn.c_fc.weight", False),
    ("h.{q,k,v}_proj.*", "h.k_proj.bias", True),
    (r"a\*b", "a*b", True),
    (r"a\*b", "axb", False),
    (r"a\.b", "a.b", True),
    (r"a\?", "a?", True),
    (r"a\{b\}", "a{b}", True),
    ("wte.weight", "wte.weight", True),
    ("wte.weight", "xwte.weight", False),
    ("wte", "wte.weight", False),
]


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    CASES,
    ids=[f"{pattern}~{name}" for pattern, name, _ in CASES],
)
def test_glob_semantics(pattern: str, name: str, expected: bool) -> None:
    matched = compile_glob(pattern).fullmatch(name) is not None
    assert matched is expected, f"{pattern!r} on {name!r}: got {matched}"


BAD = [
    ("", "pattern is empty"),
    (
        "a..b",
        "pattern 'a..b' has an empty segment (a leading, trailing or doubled dot)",
    ),
    (".a", "pattern '.a' has an empty segment (a leading, trailing or doubled dot)"),
    (
        "a.**b",
        "pattern 'a.**b': '**' must be a whole segment, as in 'a.**.b'; "
        "use '*' inside the segment '**b'",
    ),
    ("h.[0-3", "pattern 'h.[0-3' has '[' without a closing ']'"),
    ("h.{a,b", "pattern 'h.{a,b' has '{' without a closing '}'"),
    ("h.a}", "pattern 'h.a}' has '}' without '{'"),
    ("{a,{b}}", "pattern '{a,{b}}' nests braces, which is not supported"),
    ("a\\", "pattern 'a\\\\' ends with a lone backslash"),
    (
        "[z-a]",
        "pattern '[z-a]' has an invalid class: bad character range z-a at position 1",
    ),
]


@pytest.mark.parametrize(
    ("pattern", "message"), BAD, ids=[p or "empty" for p, _ in BAD]
)
def test_glob_errors(pattern: str, message: str) -> None:
    with pytest.raises(GlobError) as excinfo:
        compile_glob(pattern)
    assert str(excinfo.value) == message
