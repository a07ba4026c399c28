"""One recursive-descent parser for metric formulas, functional (`mul(abs(W), X)`) or infix
(`abs(W) * X`), mixed freely.

The tokenizer accepts only numbers, names, `( ) ,` and the operator symbols of `OPERATORS`
(`+ - * /`); names must be a leaf or an operator. Nothing is ever handed to eval/exec/sympy's
parser, so a formula can only denote a tree of the grammar. Symbols, their precedence levels and
prefix operators are read from `OPERATORS`, so the grammar is (with today's table):

    expr    := term (('+' | '-') term)*          # precedence 1, left-associative
    term    := unary (('*' | '/') unary)*        # precedence 2, left-associative
    unary   := '-' NUMBER | '-' unary | primary  # prefix symbols ('-' NUMBER is a constant)
    primary := NUMBER | LEAF | OP '(' expr (',' expr)* ')' | '(' expr ')'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from metricgp.errors import MetricGPError
from metricgp.expr.ops import LEAVES, OPERATORS, binary_symbols, prefix_symbols
from metricgp.expr.tree import Node, call, const, leaf

MAX_LENGTH = 2000
MAX_DEPTH = 64

_NUMBER = re.compile(r"(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PUNCT = "(),"


def _symbols() -> list[str]:
    """Every operator symbol, longest first (so a two-character symbol wins over its first char)."""
    return sorted({*binary_symbols(), *prefix_symbols()}, key=len, reverse=True)


class FormulaError(MetricGPError):
    """A formula that is not in the grammar; the message names the problem and its column."""


def _known() -> str:
    return ", ".join([*LEAVES, *sorted(OPERATORS)])


@dataclass(frozen=True)
class _Tok:
    kind: str  # 'num', 'name', one of _PUNCT, an operator symbol, or 'end'
    text: str
    pos: int  # 0-based index into the formula


def _fail(text: str, pos: int, problem: str) -> FormulaError:
    return FormulaError(f"{problem} at column {pos + 1} in {text!r}")


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    symbols = _symbols()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        m = _NUMBER.match(text, i)
        if m:
            end = m.end()
            # `1.5.3`, `2W`, `1e`: a number glued to more word characters is a typo, not two tokens.
            if end < len(text) and (text[end].isalnum() or text[end] in "._"):
                raise _fail(text, i, f"malformed number {text[i:end + 1]!r}")
            toks.append(_Tok("num", m.group(), i))
            i = end
            continue
        m = _NAME.match(text, i)
        if m:
            toks.append(_Tok("name", m.group(), i))
            i = m.end()
            continue
        if text.startswith("**", i) and "**" not in symbols:
            raise _fail(text, i, "'**' is not supported (use sqr(x) or mul(x, x))")
        if ch in _PUNCT:
            toks.append(_Tok(ch, ch, i))
            i += 1
            continue
        sym = next((s for s in symbols if text.startswith(s, i)), None)
        if sym is not None:
            toks.append(_Tok(sym, sym, i))
            i += len(sym)
            continue
        raise _fail(text, i, f"unexpected character {ch!r}")
    toks.append(_Tok("end", "", len(text)))
    return toks


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0
        self.depth = 0
        self.binary_ops = binary_symbols()
        self.prefix_ops = prefix_symbols()
        # infix precedence levels, loosest first: [{'+', '-'}, {'*', '/'}] with today's table
        levels = sorted({OPERATORS[name].precedence for name in self.binary_ops.values()})
        self.levels = [{s for s, name in self.binary_ops.items() if OPERATORS[name].precedence == p}
                       for p in levels]

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def fail(self, problem: str, tok: _Tok | None = None) -> FormulaError:
        return _fail(self.text, (tok or self.tok).pos, problem)

    def expect(self, kind: str) -> _Tok:
        tok = self.tok
        if tok.kind != kind:
            found = "end of formula" if tok.kind == "end" else repr(tok.text)
            raise self.fail(f"expected {kind!r} but found {found}")
        self.i += 1
        return tok

    def nest(self) -> None:
        # Bounded recursion: a hostile or runaway formula gets a clear error, not RecursionError.
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(f"formula nested deeper than {MAX_DEPTH} levels")

    def parse(self) -> Node:
        if self.tok.kind == "end":
            raise FormulaError("empty formula")
        node = self.expr()
        if self.tok.kind != "end":
            raise self.fail(f"unexpected {self.tok.text!r} after a complete formula")
        if node.depth() > MAX_DEPTH:
            raise FormulaError(f"formula deeper than {MAX_DEPTH} levels in {self.text!r}")
        return node

    def binary(self, level: int) -> Node:
        """Left-associative infix operators of precedence level `level` and tighter."""
        if level == len(self.levels):
            return self.unary()
        left = self.binary(level + 1)
        while self.tok.kind in self.levels[level]:
            op = self.binary_ops[self.tok.kind]
            self.i += 1
            left = call(op, left, self.binary(level + 1))
        return left

    def expr(self) -> Node:
        self.nest()
        node = self.binary(0)
        self.depth -= 1
        return node

    def unary(self) -> Node:
        sym = self.tok.kind
        if sym not in self.prefix_ops:
            return self.primary()
        self.i += 1
        if sym == "-" and self.tok.kind == "num":  # `-2.5` is the constant -2.5, not neg(2.5)
            return const(-self.number(self.expect("num")))
        self.nest()
        node = call(self.prefix_ops[sym], self.unary())
        self.depth -= 1
        return node

    def number(self, tok: _Tok) -> float:
        value = float(tok.text)
        if not math.isfinite(value):
            raise self.fail(f"number {tok.text!r} is out of range", tok)
        return value

    def primary(self) -> Node:
        tok = self.tok
        if tok.kind == "num":
            self.i += 1
            return const(self.number(tok))
        if tok.kind == "(":
            self.i += 1
            node = self.expr()
            self.expect(")")
            return node
        if tok.kind == "name":
            self.i += 1
            return self.named(tok)
        found = "end of formula" if tok.kind == "end" else repr(tok.text)
        raise self.fail(f"expected a leaf, number, operator call or '(' but found {found}")

    def named(self, tok: _Tok) -> Node:
        name = tok.text
        if name in LEAVES:
            if self.tok.kind == "(":
                raise self.fail(f"leaf {name!r} cannot be called", tok)
            return leaf(name)
        if name not in OPERATORS:
            raise FormulaError(f"{self.fail(f'unknown name {name!r}', tok)}; known: {_known()}")
        if self.tok.kind != "(":
            raise self.fail(f"operator {name!r} needs arguments: {name}(...)", tok)
        self.i += 1
        args = [self.expr()]
        while self.tok.kind == ",":
            self.i += 1
            args.append(self.expr())
        self.expect(")")
        arity = OPERATORS[name].arity
        if len(args) != arity:
            raise self.fail(f"operator {name!r} takes {arity} argument(s), got {len(args)}", tok)
        return call(name, *args)


def parse(text: str) -> Node:
    """Parse a formula (functional, infix or mixed) into a `Node`; raise `FormulaError` otherwise."""
    if not isinstance(text, str):
        raise FormulaError(f"a formula must be a string, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise FormulaError(f"formula longer than {MAX_LENGTH} characters ({len(text)})")
    return _Parser(text).parse()
