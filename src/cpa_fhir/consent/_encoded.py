"""Base64 content in a resource: an attachment's or a signature's `data`, an
extension's `valueBase64Binary`.

What it holds is not text the labelling rules can read as written. Text of a media
type the policy names readable (`readable_media_types`, e.g. text/plain) is decoded
in its charset and read as any other; anything else (a scanned letter, a PDF, a
photo, text that does not decode) is content no rule can label, and takes the most
restrictive category.
"""

from __future__ import annotations

import binascii
import codecs
from base64 import b64decode
from collections.abc import Iterator
from typing import Any

import orjson

from cpa_fhir.consent._references import Path

# Keys whose string values are base64Binary in R4 (Attachment.data, Signature.data,
# Binary.data, the base64Binary choice of an extension's value). `data` elsewhere
# (Consent.provision.data) is a list, never a string.
ENCODED_KEYS = frozenset({"data", "valueBase64Binary"})
# Each key as JSON writes it before a string value (a quote in a string is escaped).
_MARKERS = tuple(f'"{key}":"'.encode() for key in sorted(ENCODED_KEYS))
# The resource's own parts that are not its content (as `element = "*"` skips them);
# contained resources are labelled as resources of their own.
_NOT_CONTENT = frozenset({"resourceType", "id", "meta", "text", "contained"})


def is_encoded(key: str, value: Any) -> bool:
    return key in ENCODED_KEYS and isinstance(value, str)


def _may_hold_encoded(resource: dict[str, Any]) -> bool:
    """Whether the resource has such a key with a string value anywhere: its JSON,
    written in C, is searched for the key, since walking it in Python for what few
    resources hold costs a fifth of labelling them."""
    try:
        written = orjson.dumps(resource, default=lambda _: None)
    except (TypeError, orjson.JSONEncodeError):
        return True  # cannot be written so: walk it
    return any(marker in written for marker in _MARKERS)


def encoded_values(resource: dict[str, Any]) -> Iterator[tuple[Path, str, dict[str, Any]]]:
    """Each base64 value in the resource's content: its path, the value, and the
    object holding it (whose contentType says what it is)."""
    if not _may_hold_encoded(resource):
        return

    def walk(node: Any, path: Path) -> Iterator[tuple[Path, str, dict[str, Any]]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if is_encoded(key, value):
                    yield (*path, key), value, node
                elif isinstance(value, (dict, list)):
                    yield from walk(value, (*path, key))
        elif isinstance(node, list):
            for i, item in enumerate(node):
                if isinstance(item, (dict, list)):
                    yield from walk(item, (*path, i))

    for key, value in resource.items():
        if key in _NOT_CONTENT:
            continue
        if is_encoded(key, value):
            yield (key,), value, resource
        elif isinstance(value, (dict, list)):
            yield from walk(value, (key,))


def decoded_text(value: str, holder: dict[str, Any], readable: frozenset[str]) -> str | None:
    """The text a base64 value holds, when its holder's contentType is one of the
    `readable` media types and it decodes in its charset (UTF-8 when none is given),
    with its bytes read as Latin-1 too (words in ASCII are found whatever charset it
    claims); else None: the engine cannot read it."""
    content_type = holder.get("contentType")
    if not isinstance(content_type, str) or not readable:
        return None
    media_type, *parameters = (p.strip() for p in content_type.split(";"))
    if media_type.lower() not in readable:
        return None
    charset = "utf-8"
    for parameter in parameters:
        name, _, given = parameter.partition("=")
        if name.strip().lower() == "charset":
            charset = given.strip().strip('"')
    try:
        codec = codecs.lookup(charset)
        raw = b64decode("".join(value.split()), validate=True)
        return raw.decode(codec.name) + "\x00" + raw.decode("latin-1")
    except (LookupError, binascii.Error, ValueError):
        return None
