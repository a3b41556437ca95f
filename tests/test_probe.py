"""Behaviour of `initrules.probe`: records, flags, restored state, report output.

Models are real `torch.nn` modules or small transformers models built from their
config classes. Random draws come from fixed seeds or fixed generators, so every
statistic checked here is the same on each run.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math

import pytest
import torch
from torch import nn

from initrules.probing import DEFAULT_GROWTH_LIMIT, ProbeReport, probe

MLP_DEPTH = 48
MLP_WIDTH = 256
KAIMING_STD = math.sqrt(2 / MLP_WIDTH)


# --- helper modules -----------------------------------------------------------


class Counter(nn.Module):
    """Changes its buffers on every call, in place and by rebinding."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.register_buffer("total", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.total = self.total + x.sum()
        return x


class Noise(nn.Module):
    """Draws from the global generator on every call, in train and eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.randn_like(x)


class Raiser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.error = ValueError("forward failed on purpose")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise self.error


class ModeSpy(nn.Module):
    """Stores the training flag and grad mode seen during each call."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, torch.is_grad_enabled()))
        return x


class Stateful(nn.Module):
    """A small transformers ResNet followed by modules with state or randomness."""

    def __init__(self) -> None:
        super().__init__()
        self.resnet = tiny_resnet()
        self.counter = Counter()
        self.dropout = nn.Dropout(0.5)
        self.noise = Noise()
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.resnet(x).pooler_output.flatten(1)
        features = self.counter(features)
        return self.head(self.noise(self.dropout(features)))


class Reordered(nn.Module):
    """Declares its children as a, b, c but calls b, a, c, a."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(self.c(self.a(self.b(x))))


class Shared(nn.Module):
    """Holds one Linear under two attribute names and calls it under both."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = self.first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class TupleOutput(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.argmax(-1), x * 2


class DictOutput(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ids": x.argmax(-1), "values": x * 3}


class Argmax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(-1)


class CompiledLike(nn.Module):
    """Holds its model under `_orig_mod`, as torch.compile's wrapper does."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._orig_mod(x)


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class KeywordModel(nn.Module):
    """Takes a forward argument named `model`, like probe's own first parameter."""

    def forward(self, x: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
        return x + model


# --- builders -----------------------------------------------------------------


def tiny_resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(
        depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], embedding_size=8
    )
    return ResNetModel(config)


def deep_mlp(std: float, seed: int) -> tuple[nn.Sequential, torch.Tensor]:
    """Return a ReLU MLP with N(0, std) weights and zero biases, and its input."""
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(MLP_DEPTH):
        linear = nn.Linear(MLP_WIDTH, MLP_WIDTH)
        nn.init.normal_(linear.weight, std=std, generator=generator)
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
    inputs = torch.randn(64, MLP_WIDTH, generator=generator)
    return nn.Sequential(*layers), inputs


def image() -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise AssertionError("module not found in model")


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.named_buffers()}


def buffer_objects(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_buffers())


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def modules_with_hooks(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if module._forward_hooks]


def changed_buffers(model: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    after = dict(model.named_buffers())
    return [
        name for name, value in before.items() if not torch.equal(after[name], value)
    ]


# --- non-finite outputs -------------------------------------------------------


def test_resnet_inf_conv_is_first_nonfinite() -> None:
    model = tiny_resnet()
    conv = model.encoder.stages[1].layers[0].layer[0].convolution
    with torch.no_grad():
        conv.weight.fill_(float("inf"))
    name = module_name(model, conv)

    report = probe(model, image())

    assert name == "encoder.stages.1.layers.0.layer.0.convolution"
    assert report.first_nonfinite == name
    assert not report.ok
    assert report.flags[0].kind == "nonfinite"
    assert report.flags[0].module == name
    assert repr(name) in report.flags[0].message


def test_finite_model_has_no_nonfinite() -> None:
    report = probe(tiny_resnet(), image())

    assert report.first_nonfinite is None
    assert all(record.finite for record in report.records)


# --- growth and shrink --------------------------------------------------------


def test_double_kaiming_mlp_flags_growth() -> None:
    model, inputs = deep_mlp(2 * KAIMING_STD, seed=0)

    flags = probe(model, inputs).flags

    assert [flag.kind for flag in flags] == ["growth"]
    assert "Linear modules '*'" in flags[0].message
    assert f"'{2 * (MLP_DEPTH - 1)}'" in flags[0].message
    assert flags[0].module == str(2 * (MLP_DEPTH - 1))


@pytest.mark.parametrize("seed", range(5))
def test_kaiming_mlp_has_no_flags(seed: int) -> None:
    model, inputs = deep_mlp(KAIMING_STD, seed=seed)

    report = probe(model, inputs)

    assert report.flags == []
    assert report.ok


def test_half_kaiming_mlp_flags_shrink() -> None:
    model, inputs = deep_mlp(KAIMING_STD / 2, seed=0)

    flags = probe(model, inputs).flags

    assert [flag.kind for flag in flags] == ["shrink"]
    assert "shrinks" in flags[0].message


def test_growth_limit_changes_flags() -> None:
    model, inputs = deep_mlp(2 * KAIMING_STD, seed=0)
    records = probe(model, inputs).records

    assert not ProbeReport(records).ok
    assert ProbeReport(records, growth_limit=1e20).ok
    assert ProbeReport(records, growth_limit=math.inf).ok


@pytest.mark.parametrize("limit", [1.0, 0.5, -3.0, math.nan])
def test_growth_limit_must_exceed_one(limit: float) -> None:
    with pytest.raises(ValueError, match="growth_limit must be greater than 1"):
        ProbeReport([], growth_limit=limit)


def test_default_growth_limit() -> None:
    assert ProbeReport([]).growth_limit == DEFAULT_GROWTH_LIMIT
    assert DEFAULT_GROWTH_LIMIT == 10.0


def test_two_layer_family_is_not_flagged() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        model[1].weight.mul_(1000)

    report = probe(model, torch.randn(4, 8))

    assert report.ok


def test_family_excludes_modules_without_parameters() -> None:
    # The ReLU outputs grow as fast as the Linear ones, but only the Linear
    # family may be flagged.
    model, inputs = deep_mlp(2 * KAIMING_STD, seed=0)

    flags = probe(model, inputs).flags

    assert not any("ReLU" in flag.message for flag in flags)


# --- restored state -----------------------------------------------------------


def test_train_mode_model_state_restored() -> None:
    torch.manual_seed(0)
    model = Stateful().train()
    before_buffers = buffers(model)
    before_objects = buffer_objects(model)
    before_modes = modes(model)
    before_rng = torch.get_rng_state()

    report = probe(model, image())

    assert len(report.records) > 0
    assert changed_buffers(model, before_buffers) == []
    assert all(buffer is before_objects[name] for name, buffer in model.named_buffers())
    assert modes(model) == before_modes
    assert torch.equal(torch.get_rng_state(), before_rng)


def test_batchnorm_stats_bit_identical() -> None:
    model = tiny_resnet().train()
    norm = model.embedder.embedder.normalization
    running_mean = norm.running_mean.clone()
    running_var = norm.running_var.clone()
    tracked = norm.num_batches_tracked.clone()

    probe(model, image())

    assert torch.equal(norm.running_mean, running_mean)
    assert torch.equal(norm.running_var, running_var)
    assert torch.equal(norm.num_batches_tracked, tracked)


def test_mutated_buffers_restored() -> None:
    model = nn.Sequential(nn.Linear(4, 4), Counter())
    counter = model[1]
    calls = counter.calls
    total = counter.total

    probe(model, torch.randn(3, 4))

    assert counter.calls is calls
    assert counter.total is total
    assert counter.calls.item() == 0
    assert counter.total.item() == 0.0


def test_mutated_buffers_change_without_probe() -> None:
    # Shows that Counter really changes its buffers, so that the test above
    # would fail if the probe did not restore them.
    counter = Counter()
    total = counter.total

    counter(torch.ones(3))

    assert counter.calls.item() == 1
    assert counter.total is not total


def test_mixed_modes_restored() -> None:
    model = Stateful().train()
    model.resnet.encoder.stages[1].eval()
    model.dropout.eval()
    model.head.eval()
    before = modes(model)

    probe(model, image())

    assert modes(model) == before
    assert model.resnet.encoder.stages[0].training
    assert not model.resnet.encoder.stages[1].training


def test_rng_restored_for_next_draw() -> None:
    model = nn.Sequential(nn.Linear(4, 4), Noise(), nn.Dropout(0.5)).train()
    inputs = torch.randn(3, 4)

    torch.manual_seed(7)
    probe(model, inputs)
    after_probe = torch.rand(5)
    torch.manual_seed(7)
    without_probe = torch.rand(5)

    assert torch.equal(after_probe, without_probe)


def test_forward_runs_in_eval_mode_without_grad() -> None:
    spy = ModeSpy()
    model = nn.Sequential(nn.Linear(4, 4), spy).train()

    probe(model, torch.randn(2, 4))

    assert spy.seen == [(False, False)]
    assert spy.training
    assert torch.is_grad_enabled()


def test_hooks_removed_after_probe() -> None:
    model = Stateful()

    probe(model, image())

    assert modules_with_hooks(model) == []


def test_own_hooks_survive_probe() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    calls: list[str] = []
    model[0].register_forward_hook(lambda module, args, output: calls.append("own"))

    probe(model, torch.randn(2, 4))

    assert calls == ["own"]
    assert len(model[0]._forward_hooks) == 1


# --- forward that raises ------------------------------------------------------


def raising_model() -> tuple[nn.Module, Raiser]:
    raiser = Raiser()
    model = nn.Sequential(nn.Linear(4, 4), Counter(), Noise(), raiser)
    model.train()
    model[0].eval()
    return model, raiser


def test_forward_error_propagates_unchanged() -> None:
    model, raiser = raising_model()

    with pytest.raises(ValueError) as caught:
        probe(model, torch.randn(2, 4))

    assert caught.value is raiser.error


def test_forward_error_leaves_no_hooks() -> None:
    model, _ = raising_model()

    with pytest.raises(ValueError):
        probe(model, torch.randn(2, 4))

    assert modules_with_hooks(model) == []


def test_forward_error_restores_state() -> None:
    model, _ = raising_model()
    before_modes = modes(model)
    before_buffers = buffers(model)
    inputs = torch.randn(2, 4)
    before_rng = torch.get_rng_state()

    with pytest.raises(ValueError):
        probe(model, inputs)

    assert modes(model) == before_modes
    assert changed_buffers(model, before_buffers) == []
    assert torch.equal(torch.get_rng_state(), before_rng)


# --- execution order and names ------------------------------------------------


def test_records_follow_call_order() -> None:
    report = probe(Reordered(), torch.randn(2, 4))

    assert [record.name for record in report.records] == ["b", "a", "c", "a"]
    assert [record.index for record in report.records] == [0, 1, 2, 3]


def test_shared_module_takes_first_name() -> None:
    report = probe(Shared(), torch.randn(2, 4))

    assert [record.name for record in report.records] == ["first", "first"]


def test_root_leaf_has_empty_name() -> None:
    report = probe(nn.Linear(3, 3), torch.randn(2, 3))

    assert [record.name for record in report.records] == [""]
    assert report.records[0].has_parameters


def test_orig_mod_segment_is_dropped() -> None:
    bare = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    wrapped = CompiledLike(bare)

    report = probe(wrapped, torch.randn(2, 4))

    assert [record.name for record in report.records] == ["0", "1", "2"]


def test_data_parallel_segment_is_dropped() -> None:
    bare = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    wrapped = nn.DataParallel(bare)

    report = probe(wrapped, torch.randn(2, 4))

    assert [record.name for record in report.records] == ["0", "1", "2"]


def test_has_parameters_per_module() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    records = probe(model, torch.randn(2, 4)).records

    assert records[0].has_parameters
    assert not records[1].has_parameters


# --- output kinds -------------------------------------------------------------


def test_tuple_output_uses_first_float_tensor() -> None:
    inputs = torch.randn(5, 4)

    record = probe(TupleOutput(), inputs).records[0]

    assert record.mean == pytest.approx((inputs * 2).mean().item())
    assert record.std == pytest.approx((inputs * 2).std().item())
    assert record.numel == 20


def test_dict_output_uses_first_float_tensor() -> None:
    inputs = torch.randn(5, 4)

    record = probe(DictOutput(), inputs).records[0]

    assert record.max_abs == pytest.approx((inputs * 3).abs().max().item())
    assert record.numel == 20


def test_integer_output_has_no_statistics() -> None:
    record = probe(Argmax(), torch.randn(5, 4)).records[0]

    assert record.mean is None
    assert record.std is None
    assert record.max_abs is None
    assert record.finite
    assert record.numel == 0


def test_empty_output_has_no_statistics() -> None:
    record = probe(nn.Linear(4, 4), torch.randn(0, 4)).records[0]

    assert record.mean is None
    assert record.std is None
    assert record.finite


def test_single_element_std_is_zero() -> None:
    record = probe(nn.Linear(4, 1), torch.randn(1, 4)).records[0]

    assert record.std == 0.0
    assert record.numel == 1


def test_half_precision_statistics_in_float32() -> None:
    model = nn.Linear(8, 8).to(torch.bfloat16)
    inputs = torch.randn(4, 8).to(torch.bfloat16)
    expected = model(inputs).detach().float()

    record = probe(model, inputs).records[0]

    assert record.mean == expected.mean().item()
    assert record.std == expected.std().item()


def test_float64_beyond_float32_is_finite() -> None:
    # 1e300 is finite in float64 but overflows to inf when cast to float32.
    record = probe(Scale(1e300), torch.ones(4, dtype=torch.float64)).records[0]

    assert record.finite
    assert record.max_abs == math.inf


def test_model_keyword_reaches_forward() -> None:
    module = KeywordModel()

    report = probe(module, torch.ones(2), model=torch.full((2,), 3.0))

    assert report.records[0].mean == 4.0


def test_gpt2_records_and_no_flags() -> None:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=3,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2Model(config)
    tokens = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))

    report = probe(model, tokens)
    names = [record.name for record in report.records]

    assert "h.0.attn.c_attn" in names
    assert "h.2.mlp.c_fc" in names
    assert names[0] == "wte"
    assert report.flags == []


# --- report output ------------------------------------------------------------


def inf_report() -> ProbeReport:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[float("inf"), 0.0]]))
        model.bias.zero_()
    return probe(model, torch.ones(3, 2))


def test_to_dict_is_strict_json() -> None:
    data = inf_report().to_dict()

    text = json.dumps(data, allow_nan=False)

    assert json.loads(text) == data


def test_to_dict_writes_nonfinite_as_strings() -> None:
    record = inf_report().to_dict()["records"][0]

    assert record["mean"] == "inf"
    assert record["std"] == "nan"
    assert record["max_abs"] == "inf"
    assert record["finite"] is False


def test_to_dict_lists_flags() -> None:
    data = inf_report().to_dict()

    assert data["ok"] is False
    assert data["first_nonfinite"] == ""
    assert [flag["kind"] for flag in data["flags"]] == ["nonfinite"]


def test_str_mentions_flags() -> None:
    report = inf_report()
    model, inputs = deep_mlp(2 * KAIMING_STD, seed=0)
    growth = probe(model, inputs)

    assert report.flags[0].message in str(report)
    assert "the root module (Linear)" in str(report)
    assert growth.flags[0].message in str(growth)


def test_dead_last_layer_flags_shrink() -> None:
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])
    with torch.no_grad():
        model[5].weight.zero_()
        model[5].bias.zero_()
    flags = probe(model, torch.randn(2, 64)).flags
    assert [flag.kind for flag in flags] == ["shrink"]
    assert "shrinks to zero" in flags[0].message


def test_dead_first_layer_flags_growth() -> None:
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    flags = probe(model, torch.randn(2, 64)).flags
    assert [flag.kind for flag in flags] == ["growth"]
    assert "grows without bound" in flags[0].message
