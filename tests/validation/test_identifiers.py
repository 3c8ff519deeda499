from hypothesis import given
from hypothesis import strategies as st

from cpa_fhir.validation.identifiers import (
    is_valid_nhs_number,
    is_valid_sctid,
    nhs_number_check_digit,
    verhoeff_valid,
)

_VERHOEFF_CHECK = "0123456789"


def verhoeff_digit(digits: str) -> str:
    """The digit that makes `digits + d` Verhoeff-valid (searching is enough for a test)."""
    return next(d for d in _VERHOEFF_CHECK if verhoeff_valid(digits + d))


def test_known_nhs_numbers() -> None:
    assert is_valid_nhs_number("9434765919")
    assert not is_valid_nhs_number("9434765918")
    assert not is_valid_nhs_number("943476591")
    assert not is_valid_nhs_number("94347659190")
    assert not is_valid_nhs_number("943476591X")
    assert not is_valid_nhs_number("٩٤٣٤٧٦٥٩١٩")  # non-ASCII digits


@given(st.text(alphabet="0123456789", min_size=9, max_size=9))
def test_nhs_number_check_digit_is_the_only_valid_last_digit(first_nine: str) -> None:
    check = nhs_number_check_digit(first_nine)
    valid = [d for d in range(10) if is_valid_nhs_number(first_nine + str(d))]
    assert valid == ([] if check is None else [check])


@given(st.text(alphabet="0123456789", min_size=9, max_size=9), st.integers(0, 8), st.integers(1, 9))
def test_a_single_digit_error_is_caught(first_nine: str, position: int, delta: int) -> None:
    check = nhs_number_check_digit(first_nine)
    if check is None:
        return
    number = first_nine + str(check)
    wrong = number[:position] + str((int(number[position]) + delta) % 10) + number[position + 1 :]
    assert not is_valid_nhs_number(wrong)


def test_known_snomed_ids() -> None:
    for code in (
        "1092421000000100",
        "1092211000000107",
        "1092221000000101",
        "734163000",
        "736253002",
        "325691000000100",
        "391155006",
        "166121000000101",
    ):
        assert is_valid_sctid(code), code
    assert not is_valid_sctid("1092421000000101")
    assert not is_valid_sctid("12345")
    assert not is_valid_sctid("0734163000")


@given(
    st.text(alphabet="0123456789", min_size=5, max_size=17).filter(lambda s: s[0] != "0"),
    st.integers(0, 16),
    st.integers(1, 9),
)
def test_verhoeff_catches_any_single_digit_error(stem: str, position: int, delta: int) -> None:
    code = stem + verhoeff_digit(stem)
    assert is_valid_sctid(code)
    position %= len(code)
    wrong = code[:position] + str((int(code[position]) + delta) % 10) + code[position + 1 :]
    assert not verhoeff_valid(wrong)
