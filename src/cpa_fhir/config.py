"""Where the declarative artifacts live, and reading them from disk (the edge).

The sharing policy is `policy/sharing.toml` of this source checkout, or the
file named by $CPA_FHIR_POLICY; the pure consent engine receives it parsed.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from cpa_fhir._artifacts import find_artifact
from cpa_fhir.consent import SharingPolicy, parse_policy
from cpa_fhir.errors import PolicyError


def default_policy_path() -> Path:
    env = os.environ.get("CPA_FHIR_POLICY")
    if env:
        return Path(env)
    found = find_artifact("policy/sharing.toml")
    if found is None:
        raise PolicyError("the sharing policy was not found: set CPA_FHIR_POLICY to its file")
    return found


def load_policy(path: Path | None = None) -> SharingPolicy:
    """Read and check a sharing policy; PolicyError says what is wrong with it."""
    path = path or default_policy_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError(f"cannot read the sharing policy {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(f"the sharing policy {path} is not valid TOML: {exc}") from None
    try:
        return parse_policy(data)
    except PolicyError as exc:
        # parse_policy sees only data: the reader of the message needs the file too.
        raise PolicyError(f"{path}: {exc.message}", expression=exc.expression) from None


__all__ = ["default_policy_path", "load_policy"]
