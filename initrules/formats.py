"""Render lint findings as text, JSON, GitHub workflow annotations or SARIF 2.1.0."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path, PurePath
from typing import Any

from initrules.lint import CODES, Finding

__all__ = ["FORMATS", "render"]

_SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


def _text(findings: Sequence[Finding]) -> str:
    lines = [str(finding) for finding in findings]
    errors = sum(finding.severity == "error" for finding in findings)
    warnings = len(findings) - errors
    if findings:
        lines.append(
            f"Found {len(findings)} finding(s): {errors} error(s), "
            f"{warnings} warning(s)."
        )
    else:
        lines.append("All checks passed.")
    return "\n".join(lines)


def _json(findings: Sequence[Finding]) -> str:
    return json.dumps(
        [
            {
                "path": finding.path,
                "line": finding.line,
                "column": finding.column,
                "code": finding.code,
                "name": finding.name,
                "severity": finding.severity,
                "message": finding.message,
            }
            for finding in findings
        ],
        indent=2,
    )


def _escape_data(text: str) -> str:
    # GitHub's workflow command format: '%', CR and LF are escaped in the
    # message; property values also escape ':' and ','.
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _github(findings: Sequence[Finding]) -> str:
    lines = []
    for finding in findings:
        properties = ",".join(
            [
                f"file={_escape_property(finding.path)}",
                f"line={finding.line}",
                f"col={finding.column}",
                f"title={_escape_property(f'{finding.code} {finding.name}')}",
            ]
        )
        lines.append(
            f"::{finding.severity} {properties}::{_escape_data(finding.message)}"
        )
    return "\n".join(lines)


def _uri(path: str) -> str:
    """Return a path as a SARIF URI: file:// when absolute, else relative."""
    pure = PurePath(path)
    if pure.is_absolute():
        return Path(path).as_uri()
    return urllib.parse.quote(pure.as_posix())


def _sarif(findings: Sequence[Finding]) -> str:
    rules = [
        {
            "id": code.code,
            "name": code.name,
            "shortDescription": {"text": code.summary},
            "defaultConfiguration": {"level": code.severity},
        }
        for code in CODES.values()
    ]
    results: list[dict[str, Any]] = [
        {
            "ruleId": finding.code,
            "level": finding.severity,
            "message": {"text": finding.message},
            "locations": [
                {
                    "physicalLocation": {
                        "artifactLocation": {"uri": _uri(finding.path)},
                        # NOTE: columns count code points; SARIF's default
                        # unit is UTF-16 code units, which differ past the BMP.
                        "region": {
                            "startLine": finding.line,
                            "startColumn": finding.column,
                        },
                    }
                }
            ],
        }
        for finding in findings
    ]
    log = {
        "version": "2.1.0",
        "$schema": _SARIF_SCHEMA,
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "initrules",
                        "informationUri": "https://pypi.org/project/initrules/",
                        "rules": rules,
                    }
                },
                "results": results,
            }
        ],
    }
    return json.dumps(log, indent=2)


FORMATS: dict[str, Callable[[Sequence[Finding]], str]] = {
    "text": _text,
    "json": _json,
    "github": _github,
    "sarif": _sarif,
}


def render(findings: Sequence[Finding], output_format: str) -> str:
    """Render findings in one of :data:`FORMATS`."""
    return FORMATS[output_format](findings)
