"""A fast path for common FHIRPath invariant shapes, matching fhirpathpy exactly (pure).

fhirpathpy walks its parse tree for every evaluation and wraps every value in a
node object; for the invariants a profile walk runs thousands of times that is
most of the validation cost. `compile_fast` turns the parse tree of an expression
built only from the subset below into nested Python closures over plain JSON:

- navigation (`a.b`, choice elements such as `value`, primitive `_a` siblings);
- `where`, `select`, `exists`, `all`, `empty`, `not`, `count`, `first`, `last`,
  `extension`, `matches`, `startsWith`; `$this` where it is the focus;
- `=`, `!=` and integer `<`, `<=`, `>`, `>=`, `+`; `and`, `or`, `xor`, `implies`;
- string, integer and boolean literals.

Each item carries the type path fhirpathpy would give it, so choice types and
primitive extensions resolve the same way. The closures reproduce fhirpathpy's
behaviour, quirks included, rather than the specification's: they must agree
with it on every input. Anything outside the subset is refused when compiling
(`None`: the caller keeps fhirpathpy); any value the closures are not sure about
at run time raises `Fallback`, and the caller re-evaluates with fhirpathpy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from fhirpathpy.engine.evaluators import evaluators as _fhirpath_evaluators
from fhirpathpy.models import models as _fhirpath_models
from fhirpathpy.parser import parse

# An item: (value, fhirpathpy type path). Raw results (booleans, counts, literals)
# have no path, as fhirpathpy keeps them unwrapped.
Item = tuple[Any, "str | None"]
Items = list[Item]
Fn = Callable[[Items], Items]
# Whether an expression yields nodes (navigated values, always truthy to
# fhirpathpy's where()) or raw values (truthy by their Python value).
NODE, RAW = "node", "raw"

_MODEL = _fhirpath_models["r4"]
_ELSEWHERE: dict[str, str] = _MODEL["pathsDefinedElsewhere"]
_CHOICES: dict[str, list[str]] = _MODEL["choiceTypePaths"]
_PATH2TYPE: dict[str, str] = _MODEL["path2Type"]


class Fallback(Exception):
    """Raised at run time when only fhirpathpy can say what happens."""


class _Unsupported(Exception):
    """Raised at compile time for an expression outside the subset."""


def compile_fast(
    expression: str, tree: dict[str, Any] | None = None
) -> Callable[[Any, str | None], bool] | None:
    """A predicate `(value, element path) -> passes`, or None if outside the subset.

    The predicate answers what `Validator.evaluate_invariant` makes of fhirpathpy's
    result: every item `true`, or no items. It raises `Fallback` when unsure.
    `tree` is fhirpathpy's parse of the expression, if already made (parsing is slow).
    """
    try:
        if tree is None:
            tree = parse(expression)  # type: ignore[no-untyped-call]
        fn, _ = _compile(tree["children"][0], NODE)
    except _Unsupported:
        return None
    except Exception:  # fhirpathpy cannot parse it either; it reports that
        return None

    def predicate(value: Any, path: str | None) -> bool:
        result = fn([_item(value, path)])
        # fhirpathpy drops bare primitive-extension objects from its output.
        values = [
            v for v, _ in result if not (isinstance(v, dict) and list(v.keys()) == ["extension"])
        ]
        return all(v is True for v in values) if values else True

    return predicate


def _item(value: Any, path: str | None) -> Item:
    # A resource is typed by its resourceType, wherever it is met.
    if isinstance(value, Mapping) and "resourceType" in value:
        rt = value["resourceType"]
        if not isinstance(rt, str):
            raise Fallback  # fhirpathpy would take it as the path all the same
        return (value, rt)
    return (value, path)


# -- compiling ----------------------------------------------------------------
def _compile(node: dict[str, Any], focus_kind: str, this_ok: bool = False) -> tuple[Fn, str]:
    """A closure and the kind of items it yields.

    `this_ok`: fhirpathpy's `$this` is a variable each macro and operand overwrites;
    it is the focus only when read first thing in a macro body or an operand.
    """
    kind = node.get("type")
    children = node.get("children") or []
    if kind in ("TermExpression", "InvocationTerm", "ParenthesizedTerm"):
        if len(children) != 1:
            raise _Unsupported(kind)
        return _compile(children[0], focus_kind, this_ok)
    if kind == "ThisInvocation":
        if not this_ok:
            raise _Unsupported("$this")
        return (lambda focus: focus), focus_kind
    if kind == "LiteralTerm":
        return _literal(children)
    if kind == "MemberInvocation":
        return _member(_identifier(children)), NODE
    if kind == "FunctionInvocation":
        return _function(children, focus_kind)
    if kind == "InvocationExpression":
        if len(children) < 2:
            raise _Unsupported(kind)
        fns = []
        current = focus_kind
        for i, child in enumerate(children):
            fn, current = _compile(child, current, this_ok and i == 0)
            fns.append(fn)
        return _chain(fns), current
    ops = node.get("terminalNodeText") or []
    if len(children) != 2 or len(ops) != 1:
        raise _Unsupported(kind)
    op = ops[0]
    left, _ = _compile(children[0], focus_kind, True)
    right, _ = _compile(children[1], focus_kind, True)
    if kind == "EqualityExpression" and op in ("=", "!="):
        return _equality(left, right, op == "!="), RAW
    if kind == "InequalityExpression" and op in _COMPARE:
        return _compare(left, right, _COMPARE[op]), RAW
    if kind == "AdditiveExpression" and op == "+":
        return _plus(left, right), RAW
    if (
        kind in ("AndExpression", "OrExpression", "ImpliesExpression")
        and op in _LOGIC
        and kind == _LOGIC[op][0]
    ):
        return _logic(left, right, _LOGIC[op][1]), RAW
    if kind == "OrExpression" and op == "xor":
        return _logic(left, right, _xor), RAW
    raise _Unsupported(f"{kind} {op}")


def _identifier(children: list[dict[str, Any]]) -> str:
    if len(children) != 1 or children[0].get("type") != "Identifier":
        raise _Unsupported("member")
    name = _fhirpath_evaluators["Identifier"](None, None, children[0])[0].replace("`", "")
    # fhirpathpy reads a capitalised name as a resource type filter; "length" is special.
    if not isinstance(name, str) or not name or name[0] == name[0].upper() or name == "length":
        raise _Unsupported(name)
    return str(name)


def _literal(children: list[dict[str, Any]]) -> tuple[Fn, str]:
    if len(children) != 1:
        raise _Unsupported("literal")
    kind = children[0].get("type")
    if kind not in ("StringLiteral", "NumberLiteral", "BooleanLiteral"):
        raise _Unsupported(kind)
    # fhirpathpy's own literal readers, so escapes and numbers come out the same.
    values = _fhirpath_evaluators[kind](None, None, children[0])
    if len(values) != 1 or isinstance(values[0], Decimal):
        raise _Unsupported("literal")
    constant: Items = [(values[0], None)]
    return (lambda focus: constant), RAW


def _chain(fns: list[Fn]) -> Fn:
    def run(focus: Items) -> Items:
        for fn in fns:
            focus = fn(focus)
        return focus

    return run


# -- navigation ---------------------------------------------------------------
# (parent path, name) -> (path of the child, choice types or None)
_CHILD_PATHS: dict[tuple[str | None, str], tuple[str, list[str] | None]] = {}


def _child_path(path: str | None, name: str) -> tuple[str, list[str] | None]:
    key = (path, name)
    found = _CHILD_PATHS.get(key)
    if found is None:
        child = f"{path}.{name}" if path else f"_.{name}"
        child = _ELSEWHERE.get(child, child)
        found = _CHILD_PATHS[key] = (child, _CHOICES.get(child))
    return found


def _member(name: str) -> Fn:
    under = "_" + name
    choice_fields: dict[str, tuple[str, str]] = {}  # choice type -> (field, _field)

    def run(focus: Items) -> Items:
        out: Items = []
        for data, path in focus:
            if not isinstance(data, Mapping):
                continue
            child, choices = _child_path(path, name)
            if choices:
                value = extra = None
                for choice in choices:
                    fields = choice_fields.get(choice)
                    if fields is None:
                        fields = choice_fields[choice] = (name + choice, "_" + name + choice)
                    value = data.get(fields[0])
                    extra = data.get(fields[1])
                    if value is not None or extra is not None:
                        child += choice
                        break
            else:
                value = data.get(name)
                extra = data.get(under)
                if name == "extension":
                    child = "Extension"
            child = _PATH2TYPE.get(child, child)
            for got in (value, extra):
                if got is None:
                    continue
                if isinstance(got, list):
                    out.extend(_item(x, child) for x in got)
                else:
                    out.append(_item(got, child))
        return out

    return run


# -- functions ----------------------------------------------------------------
def _function(children: list[dict[str, Any]], focus_kind: str) -> tuple[Fn, str]:
    if len(children) != 1 or children[0].get("type") != "Functn":
        raise _Unsupported("function")
    parts = children[0].get("children") or []
    if not parts or parts[0].get("type") != "Identifier":
        raise _Unsupported("function")
    name = _fhirpath_evaluators["Identifier"](None, None, parts[0])[0]
    params: list[dict[str, Any]] = []
    if len(parts) > 1:
        if len(parts) != 2 or parts[1].get("type") != "ParamList":
            raise _Unsupported(name)
        params = parts[1].get("children") or []
    if name in _NO_PARAMS and not params:
        fn, kind = _NO_PARAMS[name]
        return fn, focus_kind if kind is None else kind
    if name == "select" and len(params) == 1:
        body, kind = _compile(params[0], focus_kind, True)
        return _select(body), kind
    if name in ("where", "exists", "all") and len(params) == 1:
        criteria = _criteria(params[0], focus_kind, name != "all")
        if name == "where":
            return _where(criteria), focus_kind
        if name == "exists":
            return _exists_where(criteria), RAW
        return _all(criteria), RAW
    if name == "extension" and len(params) == 1:
        url = _string_literal(params[0])
        return _extension(url), NODE
    if name == "matches" and len(params) == 1:
        regex = _string_literal(params[0])
        if not regex:
            raise _Unsupported("an empty pattern")
        return _matches(re.compile(regex, re.DOTALL)), RAW
    if name == "startsWith" and len(params) == 1:
        return _starts_with(_string_literal(params[0])), RAW
    raise _Unsupported(str(name))


def _string_literal(node: dict[str, Any]) -> str:
    while node.get("type") == "TermExpression" and len(node.get("children") or []) == 1:
        node = node["children"][0]
    if node.get("type") != "LiteralTerm":
        raise _Unsupported("a literal is required")
    fn, _ = _literal(node.get("children") or [])
    value = fn([])[0][0]
    if not isinstance(value, str):
        raise _Unsupported("a string is required")
    return value


def _criteria(param: dict[str, Any], focus_kind: str, truthy: bool) -> Callable[[Item], bool]:
    """An Expr parameter evaluated per item, as fhirpathpy's macros read it."""
    fn, kind = _compile(param, focus_kind, True)
    if truthy:
        # where(): the first result's truth; a node is always truthy.
        if kind == NODE:
            return lambda item: bool(fn([item]))

        def first_true(item: Item) -> bool:
            result = fn([item])
            return bool(result[0][0]) if result else False

        return first_true

    # all(): a single result equal to true.
    def single_true(item: Item) -> bool:
        result = fn([item])
        return len(result) == 1 and bool(result[0][0] == True)  # noqa: E712

    return single_true


def _where(criteria: Callable[[Item], bool]) -> Fn:
    return lambda focus: [item for item in focus if criteria(item)]


def _select(body: Fn) -> Fn:
    def run(focus: Items) -> Items:
        out: Items = []
        for item in focus:
            out.extend(body([item]))
        return out

    return run


def _exists_where(criteria: Callable[[Item], bool]) -> Fn:
    def run(focus: Items) -> Items:
        # fhirpathpy filters the whole collection before testing it.
        return [(bool([item for item in focus if criteria(item)]), None)]

    return run


def _all(criteria: Callable[[Item], bool]) -> Fn:
    def run(focus: Items) -> Items:
        for item in focus:
            if not criteria(item):
                return [(False, None)]
        return [(True, None)]

    return run


def _extension(url: str) -> Fn:
    def run(focus: Items) -> Items:
        out: Items = []
        for data, _ in focus:
            if not isinstance(data, Mapping):
                continue
            extensions = data.get("extension", [])
            if not isinstance(extensions, list):
                raise Fallback
            for e in extensions:
                if not isinstance(e, dict) or "url" not in e:
                    raise Fallback
            matched = [e for e in extensions if e["url"] == url]
            if matched:
                out.append(_item(matched[0], "Extension"))
        return out

    return run


def _string(focus: Items) -> str:
    """fhirpathpy's string functions need exactly one string and raise otherwise."""
    if len(focus) != 1 or not isinstance(focus[0][0], str):
        raise Fallback
    return str(focus[0][0])


def _matches(pattern: re.Pattern[str]) -> Fn:
    def run(focus: Items) -> Items:
        if not focus:
            return []
        return [(pattern.search(_string(focus)) is not None, None)]

    return run


def _starts_with(prefix: str) -> Fn:
    def run(focus: Items) -> Items:
        if not focus:
            return []
        string = _string(focus)
        return [(bool(string) and string.startswith(prefix), None)]

    return run


def _not(focus: Items) -> Items:
    if len(focus) != 1:
        return []
    value = focus[0][0]
    # fhirpathpy reads a single non-boolean as true.
    return [(not value, None)] if isinstance(value, bool) else [(False, None)]


_NO_PARAMS: dict[str, tuple[Fn, str | None]] = {
    "empty": (lambda focus: [(not focus, None)], RAW),
    "exists": (lambda focus: [(bool(focus), None)], RAW),
    "count": (lambda focus: [(len(focus), None)], RAW),
    "not": (_not, RAW),
    "first": (lambda focus: focus[:1], None),
    "last": (lambda focus: focus[-1:], None),
}


# -- operators ----------------------------------------------------------------
def _equality(left: Fn, right: Fn, negate: bool) -> Fn:
    def run(focus: Items) -> Items:
        a = left(focus)
        b = right(focus)
        if not a or not b:
            return []
        if len(a) != len(b):
            equal = False
        else:
            # fhirpathpy compares Quantities by value and unit; leave those to it.
            if a[0][1] in _QUANTITY or b[0][1] in _QUANTITY:
                raise Fallback
            equal = bool(a[0][0] == b[0][0])
        return [(equal != negate, None)]

    return run


_QUANTITY = frozenset({"Quantity", "System.Quantity"})


def _singleton_int(items: Items) -> int:
    if len(items) != 1 or type(items[0][0]) is not int:
        raise Fallback
    return int(items[0][0])


_COMPARE: dict[str, Callable[[int, int], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _compare(left: Fn, right: Fn, op: Callable[[int, int], bool]) -> Fn:
    def run(focus: Items) -> Items:
        a = left(focus)
        b = right(focus)
        if not a or not b:
            return []
        return [(op(_singleton_int(a), _singleton_int(b)), None)]

    return run


def _plus(left: Fn, right: Fn) -> Fn:
    def run(focus: Items) -> Items:
        a = left(focus)
        b = right(focus)
        if not a or not b:
            return []
        return [(_singleton_int(a) + _singleton_int(b), None)]

    return run


def _boolean(items: Items) -> bool | None:
    """A logic operand: empty (None) or a single boolean; fhirpathpy raises otherwise."""
    if not items:
        return None
    if len(items) != 1 or type(items[0][0]) is not bool:
        raise Fallback
    return bool(items[0][0])


def _and(a: bool | None, b: bool | None) -> bool | None:
    if a is False or b is False:
        return False
    if a is None or b is None:
        return None
    return True


def _or(a: bool | None, b: bool | None) -> bool | None:
    if a is True or b is True:
        return True
    if a is None or b is None:
        return None
    return False


def _implies(a: bool | None, b: bool | None) -> bool | None:
    if a is False or b is True:
        return True
    if a is None or b is None:
        return None
    return False


def _xor(a: bool | None, b: bool | None) -> bool | None:
    if a is None or b is None:
        return None
    return a != b


_LOGIC: dict[str, tuple[str, Callable[[bool | None, bool | None], bool | None]]] = {
    "and": ("AndExpression", _and),
    "or": ("OrExpression", _or),
    "implies": ("ImpliesExpression", _implies),
}


def _logic(left: Fn, right: Fn, op: Callable[[bool | None, bool | None], bool | None]) -> Fn:
    def run(focus: Items) -> Items:
        # fhirpathpy evaluates both sides, so an error on either side is its error.
        result = op(_boolean(left(focus)), _boolean(right(focus)))
        return [] if result is None else [(result, None)]

    return run
