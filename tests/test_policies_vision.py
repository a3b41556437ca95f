"""Check the shipped vision policies against transformers' own weight initialization.

`policies/vit.yaml` and `policies/resnet.yaml` must reproduce what transformers does
when it builds the model. `policies/resnet-zero-residual.yaml` must do the same except
for the last BatchNorm weight of each residual branch, which it sets to 0.

Each comparison builds a small model twice. transformers initializes the reference
after `torch.manual_seed(0)`. The other copy has every parameter filled with NaN, so a
tensor that the policy leaves alone cannot pass, and is then initialized by
`initrules.apply(..., seed=1)`. `compare_to_reference` compares them tensor by tensor.
"""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _stats import compare_to_reference
from torch import nn
from transformers import (
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from transformers.models.resnet.modeling_resnet import (
    ResNetBasicLayer,
    ResNetBottleNeckLayer,
)

import initrules

POLICY_DIR = Path(__file__).parents[1] / "policies"

# Rule names in resnet-zero-residual.yaml and resnet.yaml.
BOTTLENECK_RULE = "last batch norm of each bottleneck layer"
BASIC_RULE = "last batch norm of each basic layer"
BATCH_NORM_SCALES_RULE = "batch norm scales"

# compare_to_reference accepts a std difference of up to 5 / sqrt(n) of the std for n
# elements. A 5% error exceeds that by 0.05 * sqrt(n) - 5 standard errors, which is 7.8
# for 65,536 elements, so each case's largest tensor has at least that many.
STD_ERROR_FACTOR = 1.05


def build_vit_config() -> ViTConfig:
    # intermediate_size is 16 times hidden_size, so each MLP weight has 65,536 elements
    # and is the largest tensor. With 128 it would have 8,192, and a 5% std error would
    # be within the tolerance of the comparison.
    return ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=1024,
        image_size=32,
        patch_size=8,
    )


def build_vit_classifier() -> nn.Module:
    return ViTForImageClassification(build_vit_config())


def build_vit_with_mask_token() -> nn.Module:
    # The mask token and the pooler exist only in this form of ViTModel.
    return ViTModel(build_vit_config(), add_pooling_layer=True, use_mask_token=True)


def build_resnet_config(layer_type: str, hidden_sizes: list[int]) -> ResNetConfig:
    # Stage 0 has two layers, so the second has no shortcut projection (an Identity).
    return ResNetConfig(
        depths=[2, 1, 1, 1],
        hidden_sizes=hidden_sizes,
        embedding_size=16,
        layer_type=layer_type,
    )


def build_resnet_bottleneck() -> nn.Module:
    # With 512 output channels in the last stage, its 3x3 convolution has
    # 128 x 128 x 3 x 3 = 147,456 elements. With 256 it would have 36,864, too few for
    # the 5% test.
    config = build_resnet_config("bottleneck", [32, 64, 128, 512])
    return ResNetForImageClassification(config)


def build_resnet_basic() -> nn.Module:
    # The last stage's second 3x3 convolution has 256 x 256 x 3 x 3 = 589,824 elements.
    config = build_resnet_config("basic", [32, 64, 128, 256])
    return ResNetForImageClassification(config)


def residual_branch_last_norms(model: nn.Module) -> set[str]:
    """Return the weight names of the last BatchNorm in each residual branch.

    The branch is the `layer` Sequential of every ResNetBasicLayer and
    ResNetBottleNeckLayer. The BatchNorm of its last ResNetConvLayer comes right before
    the shortcut is added. The names are found from the module structure, independently
    of the globs in resnet-zero-residual.yaml.
    """
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, (ResNetBasicLayer, ResNetBottleNeckLayer)):
            last = len(module.layer) - 1
            names.add(f"{name}.layer.{last}.normalization.weight")
    return names


@dataclass(frozen=True)
class VisionCase:
    case_id: str
    policy: str
    build: Callable[[], nn.Module]
    largest_tensor: str
    # The rule that draws the largest tensor, and the policy file it is written in.
    largest_tensor_rule: str
    largest_tensor_rule_file: str
    zero_residual: bool = False

    @property
    def path(self) -> Path:
        return POLICY_DIR / f"{self.policy}.yaml"


CASES = [
    VisionCase(
        case_id="vit-classifier",
        policy="vit",
        build=build_vit_classifier,
        largest_tensor="vit.layers.0.mlp.fc1.weight",
        largest_tensor_rule="linear and convolution weights",
        largest_tensor_rule_file="vit",
    ),
    VisionCase(
        case_id="vit-mask-token",
        policy="vit",
        build=build_vit_with_mask_token,
        largest_tensor="layers.0.mlp.fc1.weight",
        largest_tensor_rule="linear and convolution weights",
        largest_tensor_rule_file="vit",
    ),
    VisionCase(
        case_id="resnet-bottleneck",
        policy="resnet",
        build=build_resnet_bottleneck,
        largest_tensor="resnet.encoder.stages.3.layers.0.layer.1.convolution.weight",
        largest_tensor_rule="convolutions",
        largest_tensor_rule_file="resnet",
    ),
    VisionCase(
        case_id="resnet-basic",
        policy="resnet",
        build=build_resnet_basic,
        largest_tensor="resnet.encoder.stages.3.layers.0.layer.1.convolution.weight",
        largest_tensor_rule="convolutions",
        largest_tensor_rule_file="resnet",
    ),
    VisionCase(
        case_id="resnet-zero-residual-bottleneck",
        policy="resnet-zero-residual",
        build=build_resnet_bottleneck,
        largest_tensor="resnet.encoder.stages.3.layers.0.layer.1.convolution.weight",
        largest_tensor_rule="convolutions",
        largest_tensor_rule_file="resnet",
        zero_residual=True,
    ),
    VisionCase(
        case_id="resnet-zero-residual-basic",
        policy="resnet-zero-residual",
        build=build_resnet_basic,
        largest_tensor="resnet.encoder.stages.3.layers.0.layer.1.convolution.weight",
        largest_tensor_rule="convolutions",
        largest_tensor_rule_file="resnet",
        zero_residual=True,
    ),
]
CASE_IDS = [case.case_id for case in CASES]


def build_reference(case: VisionCase) -> nn.Module:
    """Build the model as transformers initializes it, seeded with 0.

    For the zero-residual policy, the reference is transformers' model with the last
    BatchNorm weight of each residual branch set to 0 by hand.
    """
    torch.manual_seed(0)
    model = case.build()
    if case.zero_residual:
        with torch.no_grad():
            for name in residual_branch_last_norms(model):
                model.get_parameter(name).zero_()
    return model


def build_with_policy(
    case: VisionCase, policy: Path | initrules.Policy
) -> tuple[nn.Module, initrules.Report]:
    model = case.build()
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    report = initrules.apply(model, policy, seed=1)
    return model, report


def scaled_init(init: dict[str, Any], factor: float) -> dict[str, Any]:
    """Return a rule's `init` mapping with the std of its draws multiplied by `factor`.

    A scheme with a `std` argument gets it scaled. Kaiming normal with ReLU gain has no
    such argument, so it becomes the equivalent normal draw, std sqrt(2 / fan), scaled.
    """
    if "std" in init:
        std = init["std"]
        scaled_std = f"({std}) * {factor!r}" if isinstance(std, str) else std * factor
        return {**init, "std": scaled_std}
    if init.get("scheme") == "kaiming_normal":
        assert init.get("nonlinearity") == "relu", f"unsupported Kaiming init {init}"
        assert init.get("a", 0) == 0, f"unsupported Kaiming init {init}"
        fan = init.get("mode", "fan_in")
        return {"scheme": "normal", "mean": 0.0, "std": f"{factor!r} * sqrt(2 / {fan})"}
    raise ValueError(f"no std to scale in init {init}")


def write_policy_with_scaled_rule(
    case: VisionCase, directory: Path, factor: float
) -> Path:
    """Copy the case's policy to `directory`, scaling the std of the case's rule.

    The file that contains the rule is copied as well, so a policy that extends it
    reads the modified copy. Returns the path of the case's policy in `directory`.
    """
    for policy in {case.policy, case.largest_tensor_rule_file}:
        shutil.copy(POLICY_DIR / f"{policy}.yaml", directory / f"{policy}.yaml")

    rule_path = directory / f"{case.largest_tensor_rule_file}.yaml"
    document = yaml.safe_load(rule_path.read_text())
    rules = [
        rule
        for rule in document["rules"]
        if rule.get("name") == case.largest_tensor_rule
    ]
    assert len(rules) == 1, (
        f"expected one rule named {case.largest_tensor_rule!r} in {rule_path.name}, "
        f"found {len(rules)}"
    )
    rules[0]["init"] = scaled_init(rules[0]["init"], factor)
    rule_path.write_text(yaml.safe_dump(document, sort_keys=False))
    return directory / f"{case.policy}.yaml"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_policy_matches_transformers_init(case: VisionCase) -> None:
    reference = build_reference(case)
    model, report = build_with_policy(case, case.path)

    assert report.unmatched == []
    reported_names = {row.name for row in report.rows}
    parameter_names = {name for name, _ in model.named_parameters()}
    assert parameter_names - reported_names == set()
    mismatches = compare_to_reference(reference, model)
    assert mismatches == [], "\n".join(mismatches)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_comparison_detects_five_percent_std_error(
    case: VisionCase, tmp_path: Path
) -> None:
    policy_path = write_policy_with_scaled_rule(case, tmp_path, STD_ERROR_FACTOR)
    reference = build_reference(case)
    model, report = build_with_policy(case, policy_path)

    largest_size = max(param.numel() for param in model.parameters())
    assert model.get_parameter(case.largest_tensor).numel() == largest_size
    assert report.row(case.largest_tensor).rule_name == case.largest_tensor_rule
    mismatches = compare_to_reference(reference, model)
    prefix = f"{case.largest_tensor}: std "
    flagged = [line for line in mismatches if line.startswith(prefix)]
    assert flagged, "no std mismatch for the largest tensor:\n" + "\n".join(mismatches)


@pytest.mark.parametrize(
    ("build", "zero_rule"),
    [(build_resnet_bottleneck, BOTTLENECK_RULE), (build_resnet_basic, BASIC_RULE)],
    ids=["bottleneck", "basic"],
)
def test_zero_residual_zeroes_last_batch_norms(
    build: Callable[[], nn.Module], zero_rule: str
) -> None:
    model = build()
    report = initrules.apply(model, POLICY_DIR / "resnet-zero-residual.yaml", seed=1)
    last_norms = residual_branch_last_norms(model)
    # Two layers in stage 0 and one in each of the three other stages.
    assert len(last_norms) == 5

    other_norms = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.BatchNorm2d):
            continue
        weight_name = f"{name}.weight"
        if weight_name in last_norms:
            assert torch.equal(module.weight, torch.zeros_like(module.weight))
            assert report.row(weight_name).rule_name == zero_rule
        else:
            other_norms.append(weight_name)
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert report.row(weight_name).rule_name == BATCH_NORM_SCALES_RULE
        assert torch.equal(module.bias, torch.zeros_like(module.bias))
    # The stem, the shortcut projections and the other BatchNorms in the branches.
    assert len(other_norms) > len(last_norms)


def test_vit_std_follows_initializer_range() -> None:
    config = build_vit_config()
    config.initializer_range = 0.05
    report = initrules.apply(
        ViTForImageClassification(config), POLICY_DIR / "vit.yaml", seed=0
    )

    for name in [
        "vit.embeddings.position_embeddings",
        "vit.embeddings.cls_token",
        "vit.embeddings.patch_embeddings.projection.weight",
        "vit.layers.1.attention.q_proj.weight",
        "classifier.weight",
    ]:
        assert report.row(name).args["std"] == pytest.approx(0.05, rel=1e-12), name


def test_resnet_classifier_follows_linear_reset() -> None:
    # transformers draws the classifier as torch's Linear.reset_parameters does, so the
    # weight and the bias are uniform in [-bound, bound], bound = 1 / sqrt(in_features).
    model = build_resnet_bottleneck()
    report = initrules.apply(model, POLICY_DIR / "resnet.yaml", seed=0)
    bound = 1 / math.sqrt(512)

    bias_row = report.row("classifier.1.bias")
    assert bias_row.args["a"] == pytest.approx(-bound, rel=1e-12)
    assert bias_row.args["b"] == pytest.approx(bound, rel=1e-12)
    weight = model.get_parameter("classifier.1.weight")
    assert weight.abs().max().item() <= bound
    assert report.row("classifier.1.weight").expected_std == pytest.approx(
        bound / math.sqrt(3), rel=1e-6
    )
