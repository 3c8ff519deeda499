"""OperationOutcome issues: https://hl7.org/fhir/R4/operationoutcome.html"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Severity = Literal["fatal", "error", "warning", "information"]

_ORDER: dict[str, int] = {"fatal": 0, "error": 1, "warning": 2, "information": 3}


@dataclass(frozen=True, slots=True)
class Issue:
    """One OperationOutcome.issue: severity, IssueType code, FHIRPath location, message.

    `rule` names the constraint that produced it (an invariant key such as
    `cpa-pat-1`, or a record rule id) so that people and tests can tell rules apart.
    """

    severity: Severity
    code: str
    message: str
    expression: str | None = None
    rule: str | None = None

    @property
    def is_error(self) -> bool:
        return self.severity in ("fatal", "error")

    def to_fhir(self) -> dict[str, Any]:
        issue: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "details": {"text": self.message},
        }
        if self.rule:
            issue["diagnostics"] = f"rule: {self.rule}"
        if self.expression:
            issue["expression"] = [self.expression]
        return issue

    def line(self) -> str:
        """One human-readable line, as the CLI prints it."""
        where = f"{self.expression}: " if self.expression else ""
        rule = f" [{self.rule}]" if self.rule else ""
        return f"{self.severity.upper():<7} {where}{self.message}{rule}"


def sort_issues(issues: list[Issue]) -> list[Issue]:
    return sorted(issues, key=lambda i: (_ORDER[i.severity], i.expression or "", i.message))


def operation_outcome(issues: list[Issue]) -> dict[str, Any]:
    """An OperationOutcome; an empty list becomes the conventional 'All OK' information issue."""
    if not issues:
        return {
            "resourceType": "OperationOutcome",
            "issue": [
                {"severity": "information", "code": "informational", "details": {"text": "All OK"}}
            ],
        }
    return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in sort_issues(issues)]}
