"""The ``initrules`` command: lint, explain, apply and schema.

Exit codes: 0 when clean, 1 when lint finds something at or above
``--fail-on``, 2 for a usage error, a file that cannot be read, or a model
that cannot be built.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from initrules.engine import apply
from initrules.errors import CheckError, InitRulesError, PolicyError
from initrules.factory import build_model, parse_model_args
from initrules.formats import FORMATS, render
from initrules.globs import GlobError, compile_glob
from initrules.lint import CODES, Finding, lint_path, sort_findings
from initrules.loader import load_policy
from initrules.matcher import Matcher
from initrules.planner import PlannedTensor, PlanProblem, make_plan, walk_tensors
from initrules.report import Report, format_args, format_shape
from initrules.schema import policy_json_schema

__all__ = ["main"]

logger = logging.getLogger(__name__)

EXIT_CLEAN = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2

# Above this many parameters, `apply` prints a line before it starts, since
# the fill takes seconds to minutes on a CPU.
_PROGRESS_THRESHOLD = 100_000_000


class _UsageError(Exception):
    """A command-line input is invalid; the message is printed as is."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # Show library warnings (unmatched tensors under `warn`) as log lines, not
    # as Python warnings with a source line.
    logging.captureWarnings(True)
    try:
        return int(args.handler(args))
    except (_UsageError, InitRulesError) as error:
        print(f"initrules {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader (for example `head`) closed the pipe; stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_CLEAN
    except OSError as error:
        print(f"initrules {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="initrules",
        description="Initialize and validate PyTorch weights from YAML policies.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log every decision at DEBUG level"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lint = commands.add_parser(
        "lint", help="check policy files, alone or against a model"
    )
    lint.add_argument(
        "paths",
        nargs="+",
        metavar="FILE",
        help="policy files, folders (searched for *.yaml and *.yml) or glob patterns",
    )
    _add_model_options(lint, required=False)
    lint.add_argument(
        "--format",
        choices=sorted(FORMATS),
        default="text",
        help="output format (default: text, 'path:line:col: CODE message' lines)",
    )
    lint.add_argument(
        "--select",
        type=_codes,
        metavar="CODES",
        help="comma-separated codes or prefixes to report (default: all)",
    )
    lint.add_argument(
        "--ignore",
        type=_codes,
        metavar="CODES",
        default=[],
        help="comma-separated codes or prefixes to leave out",
    )
    lint.add_argument(
        "--fail-on",
        choices=["error", "warning", "never"],
        default="error",
        help="lowest severity that makes the exit code 1 (default: error)",
    )
    lint.set_defaults(handler=_run_lint)

    explain = commands.add_parser(
        "explain", help="show which rule wins each tensor of a model, and why"
    )
    explain.add_argument("policy", metavar="POLICY", help="the policy file")
    _add_model_options(explain, required=True)
    explain.add_argument(
        "--param",
        metavar="GLOB",
        help="only tensors whose canonical name matches this glob",
    )
    explain.set_defaults(handler=_run_explain)

    apply_parser = commands.add_parser(
        "apply", help="build a model, initialize it and print the report"
    )
    apply_parser.add_argument("policy", metavar="POLICY", help="the policy file")
    _add_model_options(apply_parser, required=True)
    apply_parser.add_argument(
        "--var",
        action="append",
        default=[],
        type=_variable,
        metavar="NAME=NUMBER",
        help="override a var of the policy's argument expressions (repeatable)",
    )
    apply_parser.add_argument(
        "--seed",
        type=int,
        help="seed of the per-tensor generators (default: torch's global one)",
    )
    apply_parser.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help=(
            "save the state dict to FILE when every check passes (torch.save; "
            "loads with weights_only=True)"
        ),
    )
    apply_parser.add_argument(
        "--probe-input",
        type=_probe_shape,
        metavar="SHAPE",
        help=(
            "run a forward-pass probe after init on a random input: a float "
            "tensor of this shape (1x3x224x224, standard normal), or token ids "
            "(ids:1x128, uniform below the model's vocabulary size); both drawn "
            "with seed 0"
        ),
    )
    apply_parser.add_argument(
        "--plot",
        type=Path,
        metavar="FILE",
        help="write a PNG of measured against expected std (needs initrules[plot])",
    )
    apply_parser.set_defaults(handler=_run_apply)

    schema = commands.add_parser("schema", help="print the JSON Schema of policy files")
    schema.add_argument(
        "--builtin-only",
        action="store_true",
        help="describe only the built-in schemes, as schemas/policy.schema.json does",
    )
    schema.set_defaults(handler=_run_schema)
    return parser


def _add_model_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--model",
        required=required,
        metavar="MODULE:FACTORY",
        help=(
            "the model: a function or class taking keyword arguments, or a "
            "transformers model class (e.g. transformers:GPT2LMHeadModel)"
        ),
    )
    parser.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "a keyword argument of the factory, or a config field of a transformers "
            "class; VALUE is parsed as JSON, else kept as a string (repeatable)"
        ),
    )
    parser.add_argument(
        "--model-kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "a keyword argument of a transformers model class itself, besides its "
            "config (e.g. add_pooling_layer=false); parsed like --model-arg "
            "(repeatable)"
        ),
    )


def _codes(text: str) -> list[str]:
    codes = [code.strip().upper() for code in text.split(",") if code.strip()]
    if not codes:
        raise argparse.ArgumentTypeError("expected at least one code, as in IR101")
    for code in codes:
        if not any(known.startswith(code) for known in CODES):
            raise argparse.ArgumentTypeError(
                f"unknown code {code!r}; valid codes: {', '.join(CODES)}"
            )
    return codes


# --- lint ----------------------------------------------------------------------


def _expand_paths(patterns: Sequence[str]) -> list[str]:
    """Expand folders and globs; each file once, in the order given."""
    paths: dict[str, str] = {}
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = [
                str(path)
                for suffix in ("*.yaml", "*.yml")
                for path in Path(pattern).rglob(suffix)
                if path.is_file() and not _hidden(path.relative_to(pattern))
            ]
        elif glob.has_magic(pattern) and not os.path.exists(pattern):
            found = [
                path
                for path in glob.glob(pattern, recursive=True)
                if os.path.isfile(path)
            ]
        else:
            found = [pattern]
        if not found:
            raise _UsageError(f"no policy files match {pattern!r}")
        for path in sorted(found):
            paths.setdefault(os.path.realpath(path), path)
    return list(paths.values())


def _hidden(relative: Path) -> bool:
    # Folders such as .git, .venv and .github hold YAML that is not a policy.
    return any(part.startswith(".") for part in relative.parts)


def _selected(finding: Finding, select: list[str] | None, ignore: list[str]) -> bool:
    if finding.code == "IR001":
        # A file that is not a valid policy always fails, whatever is selected.
        return True
    if select is not None and not any(finding.code.startswith(c) for c in select):
        return False
    return not any(finding.code.startswith(code) for code in ignore)


def _run_lint(args: argparse.Namespace) -> int:
    if args.select and not args.model and all(c.startswith("IR2") for c in args.select):
        raise _UsageError(
            "the selected codes (IR2xx) need a model; add --model MODULE:FACTORY"
        )
    model = _model(args, device="meta") if args.model else None
    findings: list[Finding] = []
    for path in _expand_paths(args.paths):
        try:
            findings += lint_path(path, model=model)
        except PolicyError as error:
            raise _UsageError(str(error)) from None
    findings = sort_findings(
        f for f in findings if _selected(f, args.select, args.ignore)
    )
    output = render(findings, args.format)
    if output:
        print(output)
    if args.fail_on == "never":
        return EXIT_CLEAN
    failing = ("error",) if args.fail_on == "error" else ("error", "warning")
    return EXIT_FINDINGS if any(f.severity in failing for f in findings) else EXIT_CLEAN


def _model(args: argparse.Namespace, *, device: str | None) -> nn.Module:
    # `python -m initrules` puts the working directory first on sys.path, but
    # the console script puts its own bin folder there, so `--model
    # my_models:build` would not find my_models.py in the working directory.
    working_directory = os.getcwd()
    if working_directory not in sys.path:
        sys.path.insert(0, working_directory)
    return build_model(
        args.model,
        parse_model_args(args.model_arg),
        model_kwargs=parse_model_args(args.model_kwarg),
        device=device,
    )


# --- explain -------------------------------------------------------------------


def _run_explain(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy)
    model = _model(args, device="meta")
    matcher = Matcher(policy)
    try:
        pattern = compile_glob(args.param) if args.param else None
    except GlobError as error:
        raise _UsageError(f"invalid --param glob: {error}") from None
    parameters, buffers = walk_tensors(model)
    # The plan resolves expressions and splits tensors into blocks.
    plan = make_plan(model, policy, allow_meta=True, raise_problems=False)
    planned: dict[str, list[PlannedTensor]] = {}
    for item in plan.planned:
        planned.setdefault(item.entry.name, []).append(item)
    problems = {problem.entry.name: problem for problem in plan.problems}
    shown = 0
    for entry in parameters + buffers:
        info = entry.info
        names = [info.name, *entry.aliases]
        if pattern is not None and not any(map(pattern.fullmatch, names)):
            continue
        shown += 1
        shape = format_shape(entry.tensor.shape)
        print(f"{info.name} ({info.module_class.__name__}, {shape}, {info.dtype})")
        if entry.aliases:
            print(
                f"  tied: also named {', '.join(entry.aliases)}; the rule for "
                f"{info.name} initializes it"
            )
        result = matcher.match(info, all_matches=True)
        if result is None:
            print(
                "  no rule matched"
                if info.kind == "parameter"
                else "  untouched buffer"
            )
            for index, predicate, value in matcher.near_misses(info):
                label = policy.rules[index].label(index)
                print(f"  {label} fails only on {predicate} (tensor has {value})")
            continue
        print(f"  winner: {result.rule.label(result.rule_index)}")
        _print_inits(
            planned.get(info.name, []), result.rule_index, problems.get(info.name)
        )
        for index in result.also_matched:
            print(f"  also matched: {policy.rules[index].label(index)}")
    if shown == 0:
        raise _UsageError(f"no tensor of the model matches {args.param!r}")
    return EXIT_CLEAN


def _print_inits(
    items: list[PlannedTensor], winner: int, problem: PlanProblem | None
) -> None:
    """Print the resolved init of a tensor, or of each of its blocks."""
    if problem is not None:
        print(f"    cannot initialize: {problem.reason}")
    for item in items:
        where = "" if item.chunk is None else f" [{item.chunk}]"
        rule = item.match
        by = (
            ""
            if rule.rule_index == winner
            else f" (by {rule.rule.label(rule.rule_index)})"
        )
        expressions = rule.rule.init.expressions
        args_text = format_args(
            {
                key: f"{value} from {expressions[key].text!r}"
                if key in expressions
                else value
                for key, value in item.args.model_dump().items()
            }
        )
        print(f"    init{where}: {item.scheme.name}({args_text}){by}")


# --- apply and schema --------------------------------------------------------------


def _variable(text: str) -> tuple[str, float]:
    """Parse ``NAME=NUMBER`` for --var."""
    name, equals, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not equals or not name.isidentifier() or number is None:
        raise argparse.ArgumentTypeError(
            f"invalid --var {text!r}: expected NAME=NUMBER, such as n_layer=24"
        )
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(
            f"invalid --var {text!r}: the number must be finite"
        )
    return name, number


_IDS_PREFIX = "ids:"


def _probe_shape(text: str) -> tuple[bool, tuple[int, ...]]:
    """Parse ``1x3x224x224`` or ``ids:1x128`` into (token ids?, shape)."""
    ids = text.startswith(_IDS_PREFIX)
    sizes = text.removeprefix(_IDS_PREFIX).split("x")
    if not all(size.isascii() and size.isdigit() and int(size) > 0 for size in sizes):
        raise argparse.ArgumentTypeError(
            f"invalid shape {text!r}: expected positive sizes joined by 'x', such "
            "as 1x3x224x224, or ids:1x128 for token ids"
        )
    return ids, tuple(int(size) for size in sizes)


def _vocabulary_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module.num_embeddings
    raise _UsageError(
        "--probe-input ids:... needs the model's vocabulary size, but the model "
        "has no config.vocab_size and no nn.Embedding; give a float shape instead"
    )


def _probe_input(model: nn.Module, spec: tuple[bool, tuple[int, ...]]) -> torch.Tensor:
    ids, shape = spec
    generator = torch.Generator().manual_seed(0)
    try:
        if ids:
            high = _vocabulary_size(model)
            return torch.randint(0, high, shape, generator=generator)
        return torch.randn(shape, generator=generator)
    except RuntimeError as error:
        # torch reports a failed allocation as a RuntimeError.
        raise _UsageError(
            f"cannot create a probe input of shape {format_shape(shape)}: {error}"
        ) from None


def _run_apply(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy)
    for path in (args.out, args.plot):
        if path is not None:
            _check_writable(path)
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        # Found before the (possibly long) initialization, not after it.
        raise _UsageError(
            "--plot needs matplotlib, which is not installed; install it with: "
            "pip install 'initrules[plot]'"
        )
    model = _model(args, device=None)
    probe_inputs = None
    if args.probe_input is not None:
        probe_inputs = _probe_input(model, args.probe_input)
    count = sum(
        parameter.numel()
        for parameter in model.parameters()
        if not isinstance(parameter, UninitializedParameter)
    )
    if count > _PROGRESS_THRESHOLD:
        print(f"initializing {count:,} parameters ...", file=sys.stderr, flush=True)
    try:
        report = apply(
            model,
            policy,
            seed=args.seed,
            probe_inputs=probe_inputs,
            vars=dict(args.var),
        )
    except CheckError as error:
        # The report is the useful output, and the exit code reports the failed checks.
        print(error.report)
        if args.plot is not None:
            _plot(error.report, args.plot)
        print(
            f"initrules apply: {len(error.report.failures)} check(s) failed",
            file=sys.stderr,
        )
        return EXIT_FINDINGS
    print(report)
    if args.plot is not None:
        _plot(report, args.plot)
    if args.out is not None:
        try:
            torch.save(model.state_dict(), args.out)
        except (OSError, RuntimeError) as error:
            # torch.save reports some file errors as RuntimeError.
            raise _UsageError(f"cannot write {args.out}: {error}") from None
        print(f"saved the state dict to {args.out}")
    return EXIT_CLEAN


def _plot(report: Report, path: Path) -> None:
    try:
        report.plot(path)
    except ImportError as error:
        raise _UsageError(str(error)) from None
    print(f"wrote the plot to {path}")


def _check_writable(path: Path) -> None:
    """Reject an output path before the (possibly long) initialization."""
    if not str(path) or path.is_dir():
        raise _UsageError(f"cannot write {str(path)!r}: expected a file name")
    if not path.parent.is_dir():
        raise _UsageError(f"cannot write {path}: the folder does not exist")


def _run_schema(args: argparse.Namespace) -> int:
    # NOTE: --builtin-only is not implemented yet: the schema lists every
    # registered scheme, including those of installed plugins.
    print(json.dumps(policy_json_schema(), indent=2, sort_keys=True))
    return EXIT_CLEAN


if __name__ == "__main__":
    sys.exit(main())
