"""initrules: initialize and validate PyTorch weights from YAML policies.

Example:
    >>> import torch, initrules
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    >>> policy = initrules.load_policy(text='''
    ... rules:
    ...   - match: {module: Linear, param: weight}
    ...     init: {scheme: kaiming_normal, nonlinearity: relu}
    ...   - match: {param: bias}
    ...     init: zeros
    ... ''')
    >>> report = initrules.apply(model, policy, seed=0)
    >>> report.unmatched
    []
"""

import logging

from initrules.builder import build
from initrules.engine import apply, check, derive_seed
from initrules.errors import (
    ApplyError,
    CheckError,
    InitRulesError,
    InitRulesWarning,
    PlanError,
    PolicyError,
    SourceLocation,
    UnmatchedTensorsError,
)
from initrules.loader import load_policy
from initrules.matcher import Matcher, MatchResult, TensorInfo
from initrules.planner import Plan, make_plan
from initrules.probing import ProbeFlag, ProbeRecord, ProbeReport, probe
from initrules.report import CheckFailure, LsuvResult, Report, Row, Skipped
from initrules.schema import (
    Checks,
    Expect,
    InitSpec,
    Match,
    Policy,
    Rule,
    RuleChecks,
    policy_json_schema,
)
from initrules.schemes import (
    FillContext,
    Scheme,
    SchemeArgs,
    get_scheme,
    register_scheme,
    scheme_names,
)
from initrules.sharded import rank

__all__ = [
    "ApplyError",
    "CheckError",
    "CheckFailure",
    "Checks",
    "Expect",
    "FillContext",
    "InitRulesError",
    "InitRulesWarning",
    "InitSpec",
    "LsuvResult",
    "Match",
    "MatchResult",
    "Matcher",
    "Plan",
    "PlanError",
    "Policy",
    "PolicyError",
    "ProbeFlag",
    "ProbeRecord",
    "ProbeReport",
    "Report",
    "Row",
    "Rule",
    "RuleChecks",
    "Scheme",
    "SchemeArgs",
    "Skipped",
    "SourceLocation",
    "TensorInfo",
    "UnmatchedTensorsError",
    "apply",
    "build",
    "check",
    "derive_seed",
    "get_scheme",
    "load_policy",
    "make_plan",
    "policy_json_schema",
    "probe",
    "register_scheme",
    "scheme_names",
]

__version__ = "0.1.0"


def _logs_on_this_rank(record: logging.LogRecord) -> bool:
    """Keep initrules' log records on rank 0 only, in a distributed run."""
    return rank() == 0


for _name in list(logging.root.manager.loggerDict):
    if _name == "initrules" or _name.startswith("initrules."):
        logging.getLogger(_name).addFilter(_logs_on_this_rank)
