"""The narrative rules (txt-1, txt-2; https://hl7.org/fhir/R4/narrative.html#rules),
natively: FHIRPath's htmlChecks() is not in the engine. Pure.

A narrative's div is XHTML: one `div` in the XHTML namespace holding only the basic
formatting of HTML 4.0 (chapters 7-11 but section 9.4, and 15), links and images,
with no script, form, frame, object, head or body, no event attributes, nothing
that fetches from elsewhere but an image, and some content that is not white space.
The trust's own clients read narrative back, and a viewer renders it: what a
browser would run must not be stored.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

XHTML = "http://www.w3.org/1999/xhtml"
XML = "http://www.w3.org/XML/1998/namespace"

# HTML 4.0 chapters 7 (structure, less head and body), 8 (language), 9 (text, less
# 9.4: ins and del), 10 (lists), 11 (tables) and 15 (alignment and fonts, less the
# deprecated), with `a` and `img`.
ELEMENTS = frozenset(
    {
        "div", "span", "h1", "h2", "h3", "h4", "h5", "h6", "address", "bdo",
        "em", "strong", "dfn", "code", "samp", "kbd", "var", "cite", "abbr", "acronym",
        "blockquote", "q", "sub", "sup", "p", "br", "pre",
        "ul", "ol", "li", "dl", "dt", "dd",
        "table", "caption", "thead", "tfoot", "tbody", "colgroup", "col", "tr", "th", "td",
        "tt", "i", "b", "big", "small", "hr",
        "a", "img",
    }
)  # fmt: skip
ATTRIBUTES = frozenset(
    {
        # core and language
        "id", "class", "style", "title", "lang", "dir",
        # links and images
        "href", "name", "hreflang", "rel", "rev", "charset", "type", "src", "alt",
        "longdesc", "height", "width",
        # text, lists and tables
        "cite", "start", "value", "summary", "border", "frame", "rules", "cellspacing",
        "cellpadding", "span", "abbr", "axis", "headers", "scope", "rowspan", "colspan",
        "align", "valign", "char", "charoff",
    }
)  # fmt: skip
# What a link or image may point at: no script, nothing a browser would run.
_SAFE_URL = re.compile(r"(?i)\s*(?:https?:|mailto:|tel:|urn:|#|/|\.|[^:/?#]*(?:[/?#]|$))")
_IMAGE_URL = re.compile(
    r"(?i)\s*(?:https?:|data:image/(?:png|gif|jpeg|webp);|#|/|\.|[^:/?#]*(?:[/?#]|$))"
)
# Anything in a style that fetches or runs: url(), expression(), @import, behaviour.
_UNSAFE_STYLE = re.compile(r"(?i)url\s*\(|expression\s*\(|@import|behavior\s*:|-moz-binding")


def narrative_issues(div: str) -> list[tuple[str, str]]:
    """Which of the txt-1 and txt-2 rules a narrative's div breaks, and how, as (rule,
    message) pairs (empty when none)."""
    if "<!" in div:
        # A DOCTYPE, entity declaration or CDATA section: not a narrative's XHTML, and
        # an entity could make a small text expand without bound.
        return [("txt-1", "the narrative holds a declaration or CDATA section")]
    try:
        root = ET.fromstring(div)
    except ET.ParseError as exc:
        return [("txt-1", f"the narrative is not well-formed XHTML: {exc}")]
    if root.tag != f"{{{XHTML}}}div":
        return [("txt-1", "the narrative SHALL be one div element in the XHTML namespace")]
    problems: list[tuple[str, str]] = []
    content = False
    for element in root.iter():
        namespace, _, name = element.tag.rpartition("}")
        if namespace != "{" + XHTML or name not in ELEMENTS:
            problems.append(("txt-1", f"the element <{name}> is not allowed in a narrative"))
            continue
        content = content or name == "img" or bool((element.text or "").strip())
        content = content or (element is not root and bool((element.tail or "").strip()))
        for attribute, value in element.attrib.items():
            space, _, local = attribute.rpartition("}")
            if space == "{" + XML and local == "lang":
                continue
            if space or local not in ATTRIBUTES:
                problems.append(
                    ("txt-1", f"the attribute {local} of <{name}> is not allowed in a narrative")
                )
            elif local in ("href", "longdesc", "cite") and not _SAFE_URL.match(value):
                problems.append(
                    ("txt-1", f"the {local} of <{name}> is not a link a narrative may hold")
                )
            elif local == "src" and (name != "img" or not _IMAGE_URL.match(value)):
                problems.append(
                    ("txt-1", f"the src of <{name}> is not an image a narrative may show")
                )
            elif local == "style" and _UNSAFE_STYLE.search(value):
                problems.append(("txt-1", f"the style of <{name}> fetches or runs something"))
    if not content:
        problems.append(("txt-2", "the narrative SHALL have some non-whitespace content"))
    return problems
