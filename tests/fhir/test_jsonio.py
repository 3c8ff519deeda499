"""FHIR JSON keeps each decimal as written (https://hl7.org/fhir/R4/datatypes.html#decimal)."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpa_fhir.fhir.jsonio import ExactDecimal, canonical, dumps, loads

# JSON numbers as text, many of which a float writes otherwise: trailing zeros,
# exponents, more digits than a double holds, integers beyond 64 bits.
_digits = st.text("0123456789", min_size=1, max_size=25)
_integer_part = st.one_of(
    st.just("0"),
    st.builds(lambda a, b: a + b, st.sampled_from("123456789"), st.text("0123456789", max_size=24)),
)
numbers = st.builds(
    lambda sign, whole, fraction, exponent: sign + whole + fraction + exponent,
    st.sampled_from(["", "-"]),
    _integer_part,
    st.one_of(st.just(""), _digits.map(lambda d: "." + d)),
    st.one_of(
        st.just(""),
        st.builds(
            lambda e, s, n: e + s + n,
            st.sampled_from("eE"),
            st.sampled_from(["", "+", "-"]),
            st.integers(0, 300).map(str),
        ),
    ),
)
keys = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=6)
strings = st.text(st.sampled_from('ab:,[]{} 0123456789.eE-+"\\'), max_size=20)


def _compact(value: Any) -> str:
    """Compact JSON text, numbers given as text written as they are."""
    if isinstance(value, tuple):  # ("number", text)
        return value[1]
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, list):
        return "[" + ",".join(_compact(v) for v in value) + "]"
    return (
        "{" + ",".join(orjson.dumps(k).decode() + ":" + _compact(v) for k, v in value.items()) + "}"
    )


documents = st.recursive(
    st.one_of(numbers.map(lambda n: ("number", n)), strings),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=12,
)


def _finite(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:  # beyond a double's range: refused, as orjson does
        return False
    return True


@given(documents)
def test_every_number_is_written_back_as_it_was_given(document: Any) -> None:
    text = _compact(document)
    if not _finite(text):
        with pytest.raises(orjson.JSONDecodeError):
            loads(text)
        return
    parsed = loads(text.encode())
    assert dumps(parsed).decode() == text
    # and each value is the number orjson reads (for comparing, searching, validating)
    assert parsed == orjson.loads(text)


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("1.50", "1.50"),
        ("0.10", "0.10"),
        ("1e2", "1e2"),
        ("1E-400", "1E-400"),
        ("123456789012345678901234567890", "123456789012345678901234567890"),
        ("3.141592653589793238462643383279", "3.141592653589793238462643383279"),
    ],
)
def test_a_number_a_float_would_change_is_an_exact_decimal(text: str, kept: str) -> None:
    value = loads(f'{{"value": {text}}}'.encode())["value"]
    assert isinstance(value, ExactDecimal)
    assert (value.text, str(value), repr(value)) == (kept, kept, kept)
    assert value == float(text)
    assert copy.deepcopy(value).text == kept
    assert pickle.loads(pickle.dumps(value)).text == kept


def test_numbers_a_float_keeps_stay_plain() -> None:
    parsed = loads(b'{"a": 1.5, "b": 2, "c": 0.1, "d": -3.25, "e": 1.0}')
    assert all(type(v) in (int, float) for v in parsed.values())


def test_number_like_text_inside_strings_is_text() -> None:
    text = b'{"t":"10:00:10.50","u":"ratio 3:2.50,","v":"[1.50]"}'
    assert loads(text) == orjson.loads(text)
    assert dumps(loads(text)) == text


@pytest.mark.parametrize(
    "text", [b"[NaN]", b"[Infinity]", b'["\\ud800"]', b"[1,]", b"[1e400]", b"", b"[01.50]"]
)
def test_invalid_json_is_refused_as_orjson_refuses_it(text: bytes) -> None:
    with pytest.raises(orjson.JSONDecodeError):
        loads(text)


def test_canonical_form_ignores_key_order_but_not_precision() -> None:
    assert canonical(loads(b'{"a":1.50,"b":{"y":1,"x":2}}')) == canonical(
        loads(b'{"b":{"x":2,"y":1},"a":1.50}')
    )
    assert canonical(loads(b'{"a":1.50}')) != canonical(loads(b'{"a":1.5}'))
    assert canonical(loads(b'{"a":1.0}')) != canonical(loads(b'{"a":1}'))


@pytest.mark.parametrize(
    ("text", "written"),
    [
        (" 1.50 ", "1.50"),
        ('{ "a" : 1.50 }', '{"a":1.50}'),
        ("[ 1e2 ,\n\t0.10 ]", "[1e2,0.10]"),
        ('{"a":[\r\n -0 ]}', '{"a":[-0]}'),
        ("\n123456789012345678901", "123456789012345678901"),
    ],
)
def test_numbers_between_white_space_are_kept_as_written(text: str, written: str) -> None:
    """A body as a person or another tool lays it out keeps its numbers as they are."""
    assert dumps(loads(text.encode())).decode() == written
