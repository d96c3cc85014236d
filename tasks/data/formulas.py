"""Formulas as data: Wilkinson notation (`Fl + A + C(loc)`, `a*b`, `log(x)`, `- 1`) turned into design
matrices by formulaic, after every part of the formula has been checked against a whitelist.

formulaic evaluates the Python inside a formula (`np.log(x)`, `C(g)`, `I(x**2)`) with `eval` and full
builtins, so a formula from a spec or a deployment parameter could run code on a worker. Nothing of a
formula is evaluated here before its tokens and each factor's expression (parsed with `ast`) pass the
checks below: column names, numbers, arithmetic, comparisons, `C(...)`, `I(...)` and the transforms in
`TRANSFORM_NAMES`; no attribute access but `np.<transform>`, no other calls, no subscripts, lambdas or
comprehensions. The evaluation then sees only those functions.
"""

from __future__ import annotations

import ast
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd

from nllflow.errors import InputError

MAX_CHARACTERS, MAX_FACTORS, MAX_INTERACTION_OPERATORS, MAX_FORMULA_POWER, MAX_EXPONENT = 500, 64, 4, 3, 4
ELEMENTWISE = {
    "log": np.log, "log1p": np.log1p, "log2": np.log2, "log10": np.log10, "exp": np.exp, "expm1": np.expm1,
    "sqrt": np.sqrt, "square": np.square, "abs": np.abs,
}  # fmt: skip
# formulaic's own transforms that a formula may name (categoricals, protected arithmetic, splines)
FORMULAIC_TRANSFORMS = ("C", "I", "poly", "bs", "center", "scale")
TRANSFORM_NAMES = tuple(sorted(ELEMENTWISE)) + FORMULAIC_TRANSFORMS
KEYWORDS = {"C": {"levels"}, "poly": {"degree", "raw"}, "bs": {"df", "degree", "include_intercept"},
            "scale": set(), "center": set(), "I": set()}  # fmt: skip
_BINARY = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)
_COMPARE = (ast.Gt, ast.GtE, ast.Lt, ast.LtE, ast.Eq, ast.NotEq)


class _Numpy:
    """The only `np` an evaluated formula sees: the whitelisted elementwise functions."""

    def __init__(self) -> None:
        self.__dict__.update(ELEMENTWISE)


def _context() -> dict[str, Any]:
    from formulaic.transforms import TRANSFORMS

    return {**ELEMENTWISE, **{name: TRANSFORMS[name] for name in FORMULAIC_TRANSFORMS}, "np": _Numpy()}


def _refuse(formula: str, why: str) -> None:
    raise InputError(f"formula {formula!r} is refused: {why}")


def _check_tokens(text: str) -> None:
    from formulaic.parser import DefaultFormulaParser
    from formulaic.parser.types import Token

    if len(text) > MAX_CHARACTERS:
        _refuse(text[:40] + "…", f"longer than {MAX_CHARACTERS} characters")
    try:
        tokens = list(DefaultFormulaParser().get_tokens(text))
    except Exception as error:  # formulaic's tokenizer raises several types for malformed text
        _refuse(text, f"it does not parse ({str(error).splitlines()[0]})")
    products = 0
    for i, token in enumerate(tokens):
        if token.kind is Token.Kind.OPERATOR and token.token in ("|", "[", "]", ".", "~~"):
            _refuse(text, f"the operator {token.token!r} is not supported")
        if token.kind is Token.Kind.OPERATOR and token.token in ("*", "/", "**", "^", "%in%"):
            products += 1
            if token.token in ("**", "^"):
                power = tokens[i + 1] if i + 1 < len(tokens) else None
                if power is None or not power.token.isdigit() or int(power.token) > MAX_FORMULA_POWER:
                    _refuse(text, f"{token.token!r} needs a whole power of at most {MAX_FORMULA_POWER}")
    if products > MAX_INTERACTION_OPERATORS:
        _refuse(text, f"more than {MAX_INTERACTION_OPERATORS} interaction operators")


def _check_expression(text: str, expression: str, columns: set[str] | None) -> set[str]:
    """A factor's Python expression, node by node, before anything evaluates it; the column names
    it reads (checked against `columns` when those are known)."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        _refuse(text, f"{expression!r} is not an expression")

    def fail(node: ast.AST, why: str) -> None:
        _refuse(text, f"in {expression!r}: {why} ({type(node).__name__})")

    def visit(node: ast.AST, argument_of: str | None = None) -> None:
        if isinstance(node, ast.Expression):
            visit(node.body)
        elif isinstance(node, ast.Name):
            if columns is not None and node.id not in columns:
                fail(node, f"{node.id!r} is not a column; columns: {', '.join(sorted(columns))}")
            names.add(node.id)
        elif isinstance(node, ast.Constant):
            number = isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
            if not (number or (isinstance(node.value, str) and argument_of == "C" and len(node.value) <= 100)):
                fail(node, "only numbers (and category levels inside C())")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            visit(node.operand, argument_of)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, _BINARY):
            if isinstance(node.op, ast.Pow) and not (
                isinstance(node.right, ast.Constant) and isinstance(node.right.value, (int, float))
                and abs(node.right.value) <= MAX_EXPONENT
            ):  # fmt: skip
                fail(node, f"'**' needs a number of at most {MAX_EXPONENT} as its exponent")
            visit(node.left)
            visit(node.right)
        elif isinstance(node, ast.Compare) and all(isinstance(op, _COMPARE) for op in node.ops):
            visit(node.left)
            for comparator in node.comparators:
                visit(comparator)
        elif isinstance(node, (ast.List, ast.Tuple)) and argument_of == "C":
            for element in node.elts:
                visit(element, "C")
        elif isinstance(node, ast.Call):
            visit_call(node)
        else:
            fail(node, "only column names, numbers, arithmetic and " + ", ".join(TRANSFORM_NAMES))

    def visit_call(node: ast.Call) -> None:
        function = node.func
        if isinstance(function, ast.Name) and function.id in TRANSFORM_NAMES:
            name = function.id
        elif (isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name)
              and function.value.id == "np" and function.attr in ELEMENTWISE):  # fmt: skip
            name = function.attr
        else:
            fail(node, f"calls only of {', '.join(TRANSFORM_NAMES)} (or np.<elementwise>)")
        if name in ELEMENTWISE and (len(node.args) != 1 or node.keywords):
            fail(node, f"{name}() takes one argument")
        if not node.args:
            fail(node, f"{name}() needs an argument")
        visit(node.args[0])
        for argument in node.args[1:]:
            if not isinstance(argument, (ast.Constant, ast.List, ast.Tuple)):
                fail(argument, f"further arguments of {name}() must be constants")
            visit(argument, name)
        for keyword in node.keywords:
            if keyword.arg not in KEYWORDS.get(name, set()):
                fail(node, f"{name}() takes no keyword {keyword.arg!r}")
            visit(keyword.value, name)

    names: set[str] = set()
    visit(tree)
    return names


def _parsed(text: str, columns: set[str] | None):
    """The formulaic `Formula` of a right-hand side and the columns it reads, every factor checked
    before anything of it is evaluated (formulaic's own `required_variables` evaluates attribute
    chains, so it is never asked)."""
    from formulaic import Formula
    from formulaic.parser.types import Factor

    if not isinstance(text, str) or not text.strip():
        raise InputError(f"a formula is a non-empty string, got {text!r}")
    _check_tokens(text)
    try:
        formula = Formula(text)
    except Exception as error:  # formulaic raises several types for malformed formulas
        _refuse(text, f"it does not parse ({str(error).strip().splitlines()[0]})")
    factors = [factor for term in formula for factor in term.factors]
    if len(factors) > MAX_FACTORS:
        _refuse(text, f"more than {MAX_FACTORS} factors")
    read: set[str] = set()
    for factor in factors:
        if factor.eval_method is Factor.EvalMethod.LOOKUP:
            if columns is not None and factor.expr not in columns:
                raise InputError(
                    f"formula {text!r} names {factor.expr!r}, which is not a column; "
                    f"columns: {', '.join(sorted(columns))}"
                )
            read.add(factor.expr)
        elif factor.eval_method is Factor.EvalMethod.LITERAL:
            try:
                value = ast.literal_eval(factor.expr)
            except (ValueError, SyntaxError):
                value = None
            if not isinstance(value, (int, float)):
                _refuse(text, f"the literal {factor.expr!r} is not a number")
        else:
            read |= _check_expression(text, factor.expr, columns)
    return formula, read


def parse_formula(text: str, columns: Iterable[str]):
    """The formulaic `Formula` of a right-hand side, validated against the data's columns."""
    return _parsed(text, set(columns))[0]


def required_columns(text: str) -> list[str]:
    """The data columns a right-hand side reads, before the data is loaded (the formula checked as
    data: an unsafe one is refused here already)."""
    return sorted(_parsed(text, None)[1])


@dataclass
class Design:
    """The design matrix of one parameter's linear predictor: the formula's right-hand side, the
    column (term) names as formulaic gives them (`Intercept`, `x`, `C(loc)[T.2]`), the matrix, and
    formulaic's model spec, which encodes new data the same way (levels, transform state)."""

    parameter: str
    formula: str
    columns: list[str]
    matrix: np.ndarray
    spec: Any

    @property
    def has_intercept(self) -> bool:
        return "Intercept" in self.columns

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """This design for new rows (prediction, held-out data): their levels must be known."""
        from formulaic.errors import DataMismatchWarning

        with warnings.catch_warnings():
            warnings.simplefilter("error", DataMismatchWarning)
            try:
                matrix = self.spec.get_model_matrix(frame, context=_context(), na_action="raise")
            except DataMismatchWarning as error:
                raise InputError(
                    f"the data for {self.parameter} ~ {self.formula} has a category the fit never saw: "
                    f"{str(error).splitlines()[0]}"
                ) from None
            except Exception as error:  # formulaic raises several types for bad data
                raise InputError(
                    f"cannot encode the data for {self.parameter} ~ {self.formula}: "
                    f"{str(error).strip().splitlines()[0]}"
                ) from None
        return np.asarray(matrix, dtype=np.float64)


def intercept_design(parameter: str, rows: int) -> Design:
    """The design of a parameter without a formula: one constant."""
    return Design(parameter, "1", ["Intercept"], np.ones((rows, 1)), None)


def build_design(parameter: str, formula: str, frame: pd.DataFrame) -> Design:
    """The validated design of `parameter ~ formula` on `frame` (no missing values: the caller has
    dealt with them). A categorical with one level, a term without columns and a rank-deficient
    design (aliased terms, which are named) are refused."""
    parsed = parse_formula(formula, frame.columns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # formulaic's notes on categoricals: we check the result below
        try:
            matrix = parsed.get_model_matrix(frame, context=_context(), na_action="raise")
        except Exception as error:  # formulaic raises several types for bad data
            raise InputError(f"cannot build {parameter} ~ {formula}: {str(error).strip().splitlines()[0]}") from None
    spec = matrix.model_spec
    for term, indices in spec.term_indices.items():
        if len(indices) == 0:
            raise InputError(
                f"in {parameter} ~ {formula}, the term {str(term)!r} has no columns: "
                "a categorical with a single level cannot be estimated"
            )
    values = np.asarray(matrix, dtype=np.float64)
    columns = [str(column) for column in matrix.columns]
    if not values.shape[1]:
        raise InputError(f"{parameter} ~ {formula} has no terms (not even an intercept)")
    _refuse_aliased(parameter, formula, values, columns)
    return Design(parameter, formula, columns, values, spec)


def _refuse_aliased(parameter: str, formula: str, matrix: np.ndarray, columns: list[str]) -> None:
    """Name each column that is a linear combination of the ones before it (a vanishing diagonal of
    the QR factor of the columns scaled to unit maximum, in formula order)."""
    scale = np.abs(matrix).max(axis=0)
    diagonal = np.abs(np.diag(np.linalg.qr(matrix / np.where(scale > 0, scale, 1.0), mode="r")))
    tolerance = 1e-9 * max(matrix.shape) * max(diagonal.max(initial=0.0), 1.0)
    aliased = [column for column, size in zip(columns, diagonal, strict=True) if size <= tolerance]
    if aliased:
        raise InputError(
            f"the design of {parameter} ~ {formula} is rank-deficient: {', '.join(aliased)} "
            f"{'is' if len(aliased) == 1 else 'are'} aliased with earlier terms; drop or recode them"
        )
