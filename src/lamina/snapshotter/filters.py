"""containerd's filter expressions, as List requests carry them.

Clients that talk to a snapshotter directly (BuildKit, containerd's own garbage
collector through the proxy) send filters such as
``kind==committed,labels."containerd.io/snapshot.ref"==sha256:...``; one request may carry
several, and a snapshot is listed if *any* of them matches. The syntax is containerd's
(``filters/parser.go``, read for its grammar, not its code)::

    filter    := selector ("," selector)*      every selector must match
    selector  := fieldpath [operator value]    no operator: the field is present
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="            "~=" is a regular expression search
    value     := quoted | run of non-space, non-comma characters
    quoted    := a Go string literal in "..."; after "~=" also /.../ or |...|

A malformed filter is an :class:`InvalidFilter` (gRPC InvalidArgument), naming the spot.
The quirks are kept on purpose so that a filter means here what it means in containerd:
an unquoted value may hold dots but must not start with one, a ``/`` or a ``|``
(``name==/tmp/x`` is an error there too: quote it), and ``!=`` is true of an absent field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lamina.errors import LaminaError

#: the fields a snapshot has: kind, name, parent, labels.KEY
Adaptor = Callable[[Sequence[str]], "tuple[str, bool]"]

_EOF, _QUOTED, _VALUE, _FIELD, _SEP, _OP, _ILLEGAL, _OTHER = range(8)
_QUOTES = "/|\""
_FIELD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


class InvalidFilter(LaminaError, ValueError):
    """A filter that does not parse; the message shows where."""


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str  # "?" (present), "==", "!=", "~="
    value: str = ""

    def matches(self, field: Adaptor) -> bool:
        value, present = field(self.fieldpath)
        if self.operator == "?":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        try:
            return re.search(self.value, value) is not None
        except re.error:
            return False  # containerd logs the bad expression and matches nothing


@dataclass(frozen=True)
class Filter:
    """Any of ``alternatives`` matches, each being a list of selectors that must all."""

    alternatives: tuple[tuple[Selector, ...], ...]

    def matches(self, field: Adaptor) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.matches(field) for s in alt) for alt in self.alternatives)


def parse_all(filters: Sequence[str]) -> Filter:
    """The filter for a List request: none given (or only empty ones) matches all."""
    alts = []
    for text in filters:
        if text == "":
            return Filter(())  # containerd: an empty filter is "always"
        alts.append(_Parser(text).selectors())
    return Filter(tuple(alts))


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0  # start of the last character read
        self.next_pos = 0  # where the next character starts
        self.value = False  # an operator was just read: what follows is a value
        self.err = ""

    def next(self) -> str:
        if self.next_pos >= len(self.text):
            self.pos = len(self.text)
            return ""
        self.pos = self.next_pos
        ch = self.text[self.next_pos]
        self.next_pos += 1
        if ch == "\0":
            self.err = self.err or "unexpected null"
            return "\0"
        return ch

    def peek(self) -> str:
        return self.text[self.next_pos] if self.next_pos < len(self.text) else ""

    def scan(self) -> tuple[int, int, str]:
        ch = self.next()
        while ch and ch.isspace():
            ch = self.next()
        start = self.pos
        if ch == "":
            return start, _EOF, ""
        if ch == "\0":
            return start, _ILLEGAL, ""
        if ch in _QUOTES:
            ok = self._quoted(ch)
            return start, _QUOTED if ok else _ILLEGAL, self.text[start:self.next_pos]
        if ch in ",.":
            self.value = False
            return start, _SEP, ch
        if ch in "=!~":
            while self.peek() and self.peek() in "=!~":
                self.next()
            self.value = True
            return start, _OP, self.text[start:self.next_pos]
        if self.value:
            while self.peek() and self.peek() != "," and not self.peek().isspace() and self.peek().isprintable():
                self.next()
            self.value = False
            return start, _VALUE, self.text[start:self.next_pos]
        if ch in _FIELD_CHARS:
            while self.peek() and self.peek() in _FIELD_CHARS:
                self.next()
            return start, _FIELD, self.text[start:self.next_pos]
        return start, _OTHER, ch

    def _quoted(self, quote: str) -> bool:
        ch = self.next()
        while ch != quote:
            if ch in ("", "\n"):
                self.err = self.err or "quoted literal not terminated"
                return False
            if ch == "\\":
                ch = self.next()  # the escaped character is consumed whatever it is
                if ch == "":
                    self.err = self.err or "quoted literal not terminated"
                    return False
            ch = self.next()
        return True


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.scanner = _Scanner(text)

    def error(self, pos: int, msg: str) -> InvalidFilter:
        if pos < len(self.text):
            where = f"[{self.text[:pos]} >|{self.text[pos]}|< {self.text[pos + 1:]}]"
        else:
            where = f"[{self.text}]"
        return InvalidFilter(f"filters: parse error: {where}: {msg}")

    def selectors(self) -> tuple[Selector, ...]:
        out = [self.selector()]
        while True:
            ch = self.scanner.peek()
            if ch == ",":
                self.scanner.scan()
                out.append(self.selector())
            elif ch == "":
                return tuple(out)
            else:
                raise self.error(self.scanner.next_pos, f"unexpected input: {ch}")

    def selector(self) -> Selector:
        path = self.fieldpath()
        if self.scanner.peek() in (",", ""):
            return Selector(path, "?")
        pos, tok, text = self.scanner.scan()
        if tok != _OP:
            raise self.error(pos, self.scanner.err if tok == _ILLEGAL else 'expected an operator ("=="|"!="|"~=")')
        if text not in ("==", "!=", "~="):
            raise self.error(pos, f"unsupported operator {text!r}")
        pos, tok, value = self.scanner.scan()
        if tok in (_VALUE, _FIELD):
            return Selector(path, text, value)
        if tok == _QUOTED:
            return Selector(path, text, self.unquote(pos, value, alternates=text == "~="))
        if tok == _ILLEGAL:
            raise self.error(pos, self.scanner.err)
        raise self.error(pos, "expected value or quoted")

    def fieldpath(self) -> tuple[str, ...]:
        path = [self.field()]
        while self.scanner.peek() == ".":
            self.scanner.scan()
            path.append(self.field())
        return tuple(path)

    def field(self) -> str:
        pos, tok, text = self.scanner.scan()
        if tok == _FIELD:
            return text
        if tok == _QUOTED:
            return self.unquote(pos, text, alternates=False)
        if tok == _ILLEGAL:
            raise self.error(pos, self.scanner.err)
        raise self.error(pos, "expected field or quoted")

    def unquote(self, pos: int, text: str, *, alternates: bool) -> str:
        if not alternates and text[0] != '"':
            raise self.error(pos, "invalid quote encountered")
        try:
            return _unquote(text)
        except ValueError as e:
            raise self.error(pos, f"unquoting failed: {e}") from None


def _unquote(text: str) -> str:
    """A Go string literal's value, with ``text[0]`` as its quote character."""
    quote = text[0]
    if len(text) < 2 or text[-1] != quote:
        raise ValueError("quote syntax error")
    body, out, i = text[1:-1], [], 0
    while i < len(body):
        ch = body[i]
        if ch == quote:
            raise ValueError("quote syntax error")
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        i += 1
        if i >= len(body):
            raise ValueError("quote syntax error")
        esc = body[i]
        if esc in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[esc])
            i += 1
        elif esc == quote:
            out.append(quote)
            i += 1
        elif esc in "01234567":
            digits = body[i:i + 3]
            if len(digits) != 3 or any(d not in "01234567" for d in digits) or int(digits, 8) > 255:
                raise ValueError("quote syntax error")
            out.append(chr(int(digits, 8)))
            i += 3
        elif esc in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[esc]
            digits = body[i + 1:i + 1 + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise ValueError("quote syntax error")
            code = int(digits, 16)
            if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF and esc != "x":
                raise ValueError("quote syntax error")
            out.append(chr(code))
            i += 1 + n
        else:
            raise ValueError("quote syntax error")
    return "".join(out)
