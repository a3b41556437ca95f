"""Tests of initrules.build: construct on meta, allocate once, initialize once.

The reference for every comparison is a normal construction (default init
included) followed by initrules.apply with the same seed, so build must give
the same weights and buffers while skipping the default init.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ResNetConfig,
    ResNetModel,
)

import initrules
from initrules import PlanError, UnmatchedTensorsError
from initrules.builder import parameters_on_meta
from initrules.stream import CHUNK_ELEMENTS

POLICY_DIR = Path(__file__).parents[1] / "policies"
SEED = 7

# A policy with a rule for every parameter of the small modules below.
NORMAL_EVERYWHERE = initrules.load_policy(
    text="""
rules:
  - {match: {name: "**"}, init: {scheme: normal, std: 0.02}}
"""
)


def make_gpt2() -> nn.Module:
    # wte is 20000 x 64 = 1,280,000 elements, above CHUNK_ELEMENTS, so the
    # seeded stream draws it in chunks. n_layer stays 12 because gpt2.yaml
    # hard-codes c_proj's std for 12 layers.
    config = GPT2Config(
        n_layer=12,
        n_embd=64,
        n_head=4,
        vocab_size=20000,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def make_bert() -> nn.Module:
    config = BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        vocab_size=1000,
        max_position_embeddings=128,
    )
    return BertModel(config)


def make_llama() -> nn.Module:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


# Kaiming normal with fan_out for convolutions, ones and zeros for batch norm.
# ResNetModel has no Linear layer, but the rule covers a classifier head.
RESNET_POLICY = initrules.load_policy(
    text="""
name: resnet
rules:
  - name: convolution weights
    match: {module: Conv2d, param: weight}
    init: {scheme: kaiming_normal, mode: fan_out, nonlinearity: relu}
  - name: batch norm scales
    match: {module: BatchNorm2d, param: weight}
    init: ones
  - name: linear weights
    match: {module: Linear, param: weight}
    init: {scheme: normal, std: 0.02}
  - name: biases
    match: {param: bias}
    init: zeros
"""
)


def make_resnet() -> nn.Module:
    config = ResNetConfig(
        depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], embedding_size=8
    )
    return ResNetModel(config)


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], nn.Module]
    policy: Path | initrules.Policy
    buffers: tuple[str, ...]


CASES = {
    "gpt2": Case("gpt2", make_gpt2, POLICY_DIR / "gpt2.yaml", ()),
    "bert": Case(
        "bert",
        make_bert,
        POLICY_DIR / "bert.yaml",
        ("embeddings.position_ids", "embeddings.token_type_ids"),
    ),
    "llama": Case(
        "llama",
        make_llama,
        POLICY_DIR / "llama.yaml",
        ("model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"),
    ),
    "resnet": Case(
        "resnet",
        make_resnet,
        RESNET_POLICY,
        (
            "embedder.embedder.normalization.running_mean",
            "embedder.embedder.normalization.running_var",
            "embedder.embedder.normalization.num_batches_tracked",
            "encoder.stages.3.layers.0.layer.2.normalization.running_var",
        ),
    ),
}
DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


@functools.cache
def built_and_reference(
    case_name: str, dtype_name: str
) -> tuple[nn.Module, initrules.Report, nn.Module]:
    """Return a built model, its report, and a normally constructed reference.

    Cached because the tests only read the models.
    """
    case = CASES[case_name]
    dtype = DTYPES[dtype_name]
    model, report = initrules.build(case.make, case.policy, dtype=dtype, seed=SEED)
    reference = case.make()
    if dtype is not None:
        reference = reference.to(dtype)
    initrules.apply(reference, case.policy, seed=SEED)
    return model, report, reference


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("case_name", CASES)
def test_weights_equal_apply(case_name: str, dtype_name: str) -> None:
    model, report, reference = built_and_reference(case_name, dtype_name)
    built = dict(model.named_parameters(remove_duplicate=False))
    expected = dict(reference.named_parameters(remove_duplicate=False))
    assert report.ok
    assert list(built) == list(expected)
    for name, tensor in built.items():
        assert tensor.dtype == expected[name].dtype, name
        assert torch.equal(tensor, expected[name]), name


def test_gpt2_covers_chunks() -> None:
    model, _, _ = built_and_reference("gpt2", "float32")
    largest = max(param.numel() for param in model.parameters())
    assert largest > CHUNK_ELEMENTS


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("case_name", ["bert", "llama", "resnet"])
def test_buffers_equal_normal(case_name: str, dtype_name: str) -> None:
    model, _, reference = built_and_reference(case_name, dtype_name)
    built = dict(model.named_buffers())
    expected = dict(reference.named_buffers())
    assert list(built) == list(expected)
    for name in CASES[case_name].buffers:
        assert name in built, name
    for name, buffer in built.items():
        assert buffer.device == expected[name].device, name
        assert buffer.dtype == expected[name].dtype, name
        assert torch.equal(buffer, expected[name]), name


def test_bf16_keeps_int_buffers() -> None:
    model, _, _ = built_and_reference("bert", "bfloat16")
    assert model.embeddings.position_ids.dtype == torch.int64


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_gpt2_head_tied(dtype_name: str) -> None:
    model, _, _ = built_and_reference("gpt2", dtype_name)
    assert model.lm_head.weight is model.transformer.wte.weight


REAL_RESETS: list[str] = []


class Counted(nn.Module):
    """A module whose reset_parameters records each call on real memory."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(4, 3))
        self.frozen = nn.Parameter(torch.empty(3), requires_grad=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            REAL_RESETS.append("weight")
        if not self.frozen.is_meta:
            REAL_RESETS.append("frozen")
        nn.init.normal_(self.weight)
        nn.init.ones_(self.frozen)


def test_counted_resets_normally() -> None:
    REAL_RESETS.clear()
    Counted()
    assert REAL_RESETS == ["weight", "frozen"]


def test_build_skips_default_init() -> None:
    REAL_RESETS.clear()
    initrules.build(Counted, NORMAL_EVERYWHERE, seed=SEED)
    assert REAL_RESETS == []


class RandomWrites(TorchDispatchMode):
    """Count in-place random fills of real (non-meta) tensors on this thread."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        name = func.overloadpacket.__name__
        target = args[0] if args else None
        if (
            name in ("uniform_", "normal_")
            and isinstance(target, torch.Tensor)
            and not target.is_meta
        ):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_linear_default_init_writes() -> None:
    with RandomWrites() as writes:
        nn.Linear(8, 4)
    # kaiming_uniform_ on the weight, uniform_ on the bias.
    assert writes.count == 2


def test_meta_linear_writes_nothing() -> None:
    with RandomWrites() as writes, parameters_on_meta():
        nn.Linear(8, 4)
    assert writes.count == 0


def test_requires_grad_survives() -> None:
    model, _ = initrules.build(Counted, NORMAL_EVERYWHERE, seed=SEED)
    assert model.weight.requires_grad
    assert not model.frozen.requires_grad


def test_frozen_submodule_survives() -> None:
    def make() -> nn.Module:
        model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
        model[0].requires_grad_(False)
        return model

    model, _ = initrules.build(make, NORMAL_EVERYWHERE, seed=SEED)
    assert not model[0].weight.requires_grad
    assert not model[0].bias.requires_grad
    assert model[1].weight.requires_grad


class Holder(nn.Module):
    pass


class SharedScale(nn.Module):
    """Two submodules holding one Parameter object, registered twice."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.Parameter(torch.ones(4))
        self.first = Holder()
        self.second = Holder()
        self.first.scale = shared
        self.second.scale = shared


def test_shared_parameter_normally_tied() -> None:
    model = SharedScale()
    assert model.first.scale is model.second.scale


def test_shared_parameter_stays_tied() -> None:
    model, _ = initrules.build(SharedScale, NORMAL_EVERYWHERE, seed=SEED)
    assert model.first.scale is model.second.scale


class Recorder:
    """Wrap a factory and keep the model it returned, to inspect after an error."""

    def __init__(self, make: Callable[[], nn.Module]) -> None:
        self.make = make
        self.models: list[nn.Module] = []

    def __call__(self) -> nn.Module:
        model = self.make()
        self.models.append(model)
        return model


def make_linear() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 2))


def test_unmatched_raises_despite_keep() -> None:
    policy = initrules.load_policy(
        text="""
on_unmatched: keep
rules:
  - {match: {param: weight}, init: {scheme: normal, std: 0.02}}
"""
    )
    recorder = Recorder(make_linear)
    with pytest.raises(UnmatchedTensorsError) as caught:
        initrules.build(recorder, policy, seed=SEED)
    assert caught.value.names == ["0.bias"]
    assert "every parameter needs a rule" in str(caught.value)
    for name, param in recorder.models[0].named_parameters():
        assert param.is_meta, name


def test_keep_rule_raises() -> None:
    policy = initrules.load_policy(
        text="""
rules:
  - {match: {param: weight}, init: {scheme: normal, std: 0.02}}
  - {name: keep biases, match: {param: bias}, init: keep}
"""
    )
    recorder = Recorder(make_linear)
    with pytest.raises(PlanError) as caught:
        initrules.build(recorder, policy, seed=SEED)
    message = str(caught.value)
    assert not isinstance(caught.value, UnmatchedTensorsError)
    assert "rule 2 'keep biases'" in message
    assert "'0.bias'" in message
    for name, param in recorder.models[0].named_parameters():
        assert param.is_meta, name


def test_non_module_factory_raises() -> None:
    with pytest.raises(TypeError, match="got list"):
        initrules.build(lambda: [nn.Linear(3, 2)], NORMAL_EVERYWHERE)


class MetaBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(3))
        self.register_buffer("table", torch.empty(3, device="meta"))


def test_meta_buffer_raises() -> None:
    recorder = Recorder(lambda: nn.Sequential(nn.Linear(3, 3), MetaBuffer()))
    with pytest.raises(PlanError, match=r"'1\.table'"):
        initrules.build(recorder, NORMAL_EVERYWHERE, seed=SEED)
    for name, param in recorder.models[0].named_parameters():
        assert param.is_meta, name


def test_meta_patch_restored() -> None:
    original = nn.Module.register_parameter
    with parameters_on_meta():
        inside = nn.Linear(2, 2)
        assert nn.Module.register_parameter is not original
    assert nn.Module.register_parameter is original
    assert inside.weight.is_meta
    assert not nn.Linear(2, 2).weight.is_meta


def test_patch_restored_on_error() -> None:
    original = nn.Module.register_parameter

    def broken() -> nn.Module:
        nn.Linear(2, 2)
        raise RuntimeError("factory failed on purpose")

    with pytest.raises(RuntimeError, match="factory failed on purpose"):
        initrules.build(broken, NORMAL_EVERYWHERE)
    assert nn.Module.register_parameter is original
    assert not nn.Linear(2, 2).weight.is_meta


def test_nested_builds_restore() -> None:
    original = nn.Module.register_parameter

    def outer() -> nn.Module:
        inner, _ = initrules.build(make_linear, NORMAL_EVERYWHERE, seed=1)
        return nn.Sequential(inner, nn.Linear(2, 2))

    model, _ = initrules.build(outer, NORMAL_EVERYWHERE, seed=SEED)
    assert nn.Module.register_parameter is original
    for name, param in model.named_parameters():
        assert not param.is_meta, name


def test_overlapping_builds_restore() -> None:
    original = nn.Module.register_parameter
    first_started = threading.Event()
    second_started = threading.Event()
    first_done = threading.Event()

    def make_first() -> nn.Module:
        first_started.set()
        # Timeouts keep a fix that serializes builds from deadlocking here.
        second_started.wait(timeout=2)
        return nn.Linear(3, 2)

    def make_second() -> nn.Module:
        second_started.set()
        first_done.wait(timeout=2)
        return nn.Linear(3, 2)

    def build_first() -> None:
        initrules.build(make_first, NORMAL_EVERYWHERE, seed=SEED)
        first_done.set()

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            first = pool.submit(build_first)
            # The second build starts while the first one's factory runs.
            first_started.wait(timeout=2)
            second = pool.submit(
                initrules.build, make_second, NORMAL_EVERYWHERE, seed=SEED
            )
            first.result()
            second.result()
        restored = nn.Module.register_parameter is original
    finally:
        # The bug leaves the patch installed, which would put every later
        # test's parameters on meta.
        nn.Module.register_parameter = original  # type: ignore[method-assign]
    assert restored


def test_float64_parameters() -> None:
    model, _ = initrules.build(
        make_resnet, RESNET_POLICY, dtype=torch.float64, seed=SEED
    )
    for name, param in model.named_parameters():
        assert param.dtype == torch.float64, name


def test_float64_equals_apply() -> None:
    model, _ = initrules.build(
        make_resnet, RESNET_POLICY, dtype=torch.float64, seed=SEED
    )
    reference = make_resnet().to(torch.float64)
    initrules.apply(reference, RESNET_POLICY, seed=SEED)
    expected = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, expected[name]), name


@pytest.mark.parametrize("case_name", ["bert", "llama", "resnet"])
def test_float64_buffers(case_name: str) -> None:
    case = CASES[case_name]
    model, _ = initrules.build(
        case.make, case.policy, dtype=torch.float64, device="cpu", seed=SEED
    )
    expected = dict(case.make().named_buffers())
    for name, buffer in model.named_buffers():
        if expected[name].is_floating_point():
            assert buffer.dtype == torch.float64, name
        else:
            assert buffer.dtype == expected[name].dtype, name


def test_device_argument() -> None:
    model, _ = initrules.build(
        make_linear, NORMAL_EVERYWHERE, device=torch.device("cpu"), seed=SEED
    )
    for name, param in model.named_parameters():
        assert param.device == torch.device("cpu"), name


SIMPLE_POLICY = """\
rules:
  - {match: {param: weight}, init: {scheme: normal, std: 0.02}}
  - {match: {param: bias}, init: zeros}
"""


def test_meta_device_rejected() -> None:
    policy = initrules.load_policy(text=SIMPLE_POLICY)
    with pytest.raises(ValueError, match="not 'meta'"):
        initrules.build(lambda: nn.Linear(4, 4), policy, device="meta")


def test_lazy_module_is_plan_error() -> None:
    policy = initrules.load_policy(text=SIMPLE_POLICY)
    with pytest.raises(PlanError, match="lazy modules are not materialized"):
        initrules.build(lambda: nn.LazyLinear(3), policy)


def test_other_threads_build_real_parameters() -> None:
    # While one thread is inside parameters_on_meta(), a module built in
    # another thread keeps real parameters.
    inside = threading.Event()
    done = threading.Event()

    def hold_block() -> None:
        with parameters_on_meta():
            inside.set()
            done.wait(timeout=10)

    holder = threading.Thread(target=hold_block)
    holder.start()
    try:
        assert inside.wait(timeout=10)
        assert not nn.Linear(2, 2).weight.is_meta
    finally:
        done.set()
        holder.join(timeout=10)
    with parameters_on_meta():
        assert nn.Linear(2, 2).weight.is_meta


@pytest.mark.parametrize("option", ["only", "skip_loaded"])
def test_partial_options_are_rejected(option: str) -> None:
    # build allocates every parameter without values, so none may be left out.
    policy = initrules.load_policy(text=SIMPLE_POLICY)
    with pytest.raises(TypeError, match=f"build does not take {option}"):
        initrules.build(lambda: nn.Linear(4, 4), policy, **{option: ["weight"]})
