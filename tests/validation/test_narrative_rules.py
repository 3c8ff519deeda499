"""A narrative is the basic XHTML FHIR allows (txt-1) with some content (txt-2): what a
viewer would run, fetch from elsewhere or fail to read is refused, wherever the
narrative sits (a resource's own, a contained resource's)."""

from __future__ import annotations

from typing import Any

import pytest

from cpa_fhir.conformance import default_package
from cpa_fhir.validation import Validator

VALIDATOR = Validator(default_package())
NS = 'xmlns="http://www.w3.org/1999/xhtml"'


def _broken(div: str, *, contained: bool = False) -> list[str | None]:
    text = {"status": "generated", "div": div}
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
    }
    if contained:
        resource["contained"] = [{**resource, "id": "inner", "text": text}]
        resource["hasMember"] = [{"reference": "#inner"}]
    else:
        resource["text"] = text
    return [i.rule for i in VALIDATOR.validate(resource) if i.is_error]


@pytest.mark.parametrize(
    "div",
    [
        f"<div {NS}>Care plan agreed at review</div>",
        f'<div {NS}><p>Seen <b>today</b>; see <a href="https://example.org/x">notes</a></p></div>',
        f'<div {NS}><table><tr><td colspan="2" style="color: red">x</td></tr></table></div>',
        f'<div {NS}><img src="data:image/png;base64,iVBORw0KGgo=" alt="chart"/></div>',
        f'<div {NS} xml:lang="en-GB" lang="en-GB"><a name="top"/>Next review <a href="#top">up</a></div>',
        f'<div {NS}>A link to <a href="Patient/c-patient">the patient</a> &amp; &#160;more</div>',
    ],
)
def test_basic_xhtml_is_a_narrative(div: str) -> None:
    assert _broken(div) == []


@pytest.mark.parametrize(
    ("div", "rule"),
    [
        (f"<div {NS}><script>alert(1)</script>Notes</div>", "txt-1"),
        (f'<div {NS}><p onclick="alert(1)">Notes</p></div>', "txt-1"),
        (f'<div {NS}><a href="javascript:alert(1)">Notes</a></div>', "txt-1"),
        (f'<div {NS}><a href=" JaVa&#x09;Script:alert(1)">Notes</a></div>', "txt-1"),
        (
            f'<div {NS}><p style="background: url(https://tracker.example/x)">Notes</p></div>',
            "txt-1",
        ),
        (f"<div {NS}><iframe>Notes</iframe></div>", "txt-1"),
        (f"<div {NS}><form>Notes</form></div>", "txt-1"),
        (f"<div {NS}><del>Notes</del></div>", "txt-1"),
        (f"<p {NS}>Notes</p>", "txt-1"),
        ("<div>Notes</div>", "txt-1"),
        (f"<div {NS}>Notes", "txt-1"),
        (f"<div {NS}>Notes&nbsp;here</div>", "txt-1"),
        (f'<!DOCTYPE div [<!ENTITY a "aaaa">]><div {NS}>&a;</div>', "txt-1"),
        (f'<div {NS} xmlns:x="https://example.org/x"><x:thing>Notes</x:thing></div>', "txt-1"),
        (f"<div {NS}>   <p> </p></div>", "txt-2"),
    ],
)
def test_what_a_viewer_would_run_or_cannot_read_is_refused(div: str, rule: str) -> None:
    assert rule in _broken(div)
    assert rule in _broken(div, contained=True)
