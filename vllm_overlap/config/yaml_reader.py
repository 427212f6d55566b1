"""The config file's YAML reader: YAML 1.2's core schema, with bounds, and nothing else.

PyYAML's ``safe_load`` reads YAML 1.1: ``010`` is 8, ``1:30`` is 90, ``yes``/``on``/``off``
are booleans, a repeated key silently replaces the first, and an alias bomb or a deeply nested
list runs out of time, memory or stack. This reader (PyYAML's own scanner and parser, with its
own composer checks, resolver and constructors) instead:

* resolves plain scalars as YAML 1.2's core schema does: ``true``/``false`` (any of its three
  spellings) are the only booleans; integers are decimal, ``0o`` octal or ``0x`` hex; ``null``,
  ``~`` and the empty value are null; floats as 1.2 writes them; everything else is a string
  (``yes``, ``on``, ``1:30``, ``1_000``, ``2024-01-01``: the typed fields then refuse them);
* refuses a decimal integer with a leading zero (``010``: octal in YAML 1.1, ten in 1.2),
  integers beyond 64 bits, explicit tags outside the core schema (``!!binary``,
  ``!!python/...``, ``!!bool yes``), merge keys (``<<``, YAML 1.1 only), keys that are lists or
  mappings, and duplicate keys;
* bounds the document: at most :data:`MAX_DEPTH` levels of nesting, :data:`MAX_ALIASES`
  aliases, :data:`MAX_NODES` values counting what aliases expand to, no recursive alias;
* bounds the time: the parse, compose and construct loop looks at ``time.monotonic()`` every
  :data:`CHECK_EVERY` events and objects, and stops past :data:`MAX_SECONDS` after it began.

Each refusal raises :class:`Refused` with the key path of the offending value (``<top level>``
for the document itself) and a one-line problem that names the line; running out of time
raises :class:`TooSlow`.
"""

from __future__ import annotations

import re
import time

from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, MappingEndEvent, SequenceEndEvent
from yaml.nodes import MappingNode, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

MAX_DEPTH = 32  # levels of nesting (the config needs 4: sites.0.aux.0)
MAX_ALIASES = 100
MAX_NODES = 10_000  # values in the document, each alias counting what it expands to
MAX_INT = 2**63 - 1
MAX_SECONDS = 10.0  # the whole read; the size and node bounds keep a real config far below it
CHECK_EVERY = 256  # events parsed and objects constructed between two looks at the clock
_clock = time.monotonic

_TAG = "tag:yaml.org,2002:"
NULL, BOOL, INT, FLOAT, STR, SEQ, MAP = (_TAG + t for t in ("null", "bool", "int", "float", "str", "seq", "map"))
SCALAR_TAGS = (NULL, BOOL, INT, FLOAT, STR)

_NULL = re.compile(r"(?:~|null|Null|NULL|)\Z")
_BOOL = re.compile(r"(?:true|True|TRUE|false|False|FALSE)\Z")
_INT = re.compile(r"(?P<sign>[-+]?)(?P<digits>[0-9]+)\Z|0o(?P<oct>[0-7]+)\Z|0x(?P<hex>[0-9a-fA-F]+)\Z")
_FLOAT = re.compile(
    r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?\Z|[-+]?\.(?:inf|Inf|INF)\Z|\.(?:nan|NaN|NAN)\Z"
)


class Refused(Exception):
    """A document this reader does not accept: ``where`` is the key path, ``problem`` one line."""

    def __init__(self, path: list, problem: str):
        self.where = ".".join(str(p) for p in path) or "<top level>"
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")


class TooSlow(Exception):
    """Reading the document took longer than :data:`MAX_SECONDS`."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        super().__init__(f"reading took longer than {seconds:g} s")


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_TAG):] if tag.startswith(_TAG) else tag


def _shown(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _int_value(text: str) -> int:
    """A YAML 1.2 core-schema integer (the composer has checked its form and size)."""
    m = _INT.match(text)
    if m["oct"]:
        return int(m["oct"], 8)
    if m["hex"]:
        return int(m["hex"], 16)
    return int(text, 10)


def _float_value(text: str) -> float:
    lowered = text.lower()
    if lowered.endswith(".inf"):
        return float("-inf") if lowered.startswith("-") else float("inf")
    if lowered == ".nan":
        return float("nan")
    return float(text)


class _Resolver(BaseResolver):
    """YAML 1.2 core schema; PyYAML's ``Resolver`` is YAML 1.1's."""


for _tag, _regexp, _first in (
    (NULL, _NULL, ["~", "n", "N", ""]),
    (BOOL, _BOOL, list("tTfF")),
    (INT, _INT, list("-+0123456789")),  # before float: "10" is an integer
    (FLOAT, _FLOAT, list("-+.0123456789")),
):
    _Resolver.add_implicit_resolver(_tag, _regexp, _first)


class _Constructor(SafeConstructor):
    yaml_constructors: dict = {}
    yaml_multi_constructors: dict = {}


_Constructor.add_constructor(NULL, lambda self, node: None)
_Constructor.add_constructor(BOOL, lambda self, node: node.value.lower() == "true")
_Constructor.add_constructor(INT, lambda self, node: _int_value(node.value))
_Constructor.add_constructor(FLOAT, lambda self, node: _float_value(node.value))
_Constructor.add_constructor(STR, SafeConstructor.construct_yaml_str)
_Constructor.add_constructor(SEQ, SafeConstructor.construct_yaml_seq)
_Constructor.add_constructor(MAP, SafeConstructor.construct_yaml_map)
_Constructor.add_constructor(None, SafeConstructor.construct_undefined)


class _Loader(Reader, Scanner, Parser, Composer, _Constructor, _Resolver):
    def __init__(self, text: str):
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        _Constructor.__init__(self)
        _Resolver.__init__(self)
        self._path: list = []  # keys and indexes down to the node being composed
        self._open: set[str] = set()  # anchors whose node is still being composed
        self._aliases = 0
        self._nodes = 0
        self._measured: dict[int, tuple[int, int]] = {}  # id(node) -> (values, levels)
        self._limit = MAX_SECONDS
        self._deadline = _clock() + self._limit
        self._steps = 0  # events parsed and objects constructed so far

    # ------------------------------------------------------------------ time
    def _tick(self) -> None:
        """Every CHECK_EVERY steps (the first included), stop if the deadline has passed."""
        if self._steps % CHECK_EVERY == 0 and _clock() >= self._deadline:
            raise TooSlow(self._limit)
        self._steps += 1

    def get_event(self):
        self._tick()
        return super().get_event()

    def construct_object(self, node, deep=False):
        self._tick()
        return super().construct_object(node, deep)

    # ------------------------------------------------------------------ bounds
    def _refuse(self, problem: str, mark=None, path=None):
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise Refused(self._path if path is None else path, problem + where)

    def _measure(self, node) -> tuple[int, int]:
        """(values, levels) of ``node`` with every alias in it expanded. Recursion is bounded
        by MAX_DEPTH: every node was checked when composed."""
        key = id(node)
        if key not in self._measured:
            if isinstance(node, ScalarNode):
                children = []
            elif isinstance(node, SequenceNode):
                children = node.value
            else:
                children = [n for pair in node.value for n in pair]
            measured = [self._measure(child) for child in children]
            self._measured[key] = (
                1 + sum(m[0] for m in measured),
                1 + max((m[1] for m in measured), default=0),
            )
        return self._measured[key]

    def _count(self, values: int, mark, by_alias: bool) -> None:
        self._nodes += values
        if self._nodes > MAX_NODES:
            what = "with its aliases expanded, the file" if by_alias else "the file"
            self._refuse(f"{what} holds more than {MAX_NODES} values", mark)

    def compose_node(self, parent, index):
        depth = len(self._path)
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            node = self.anchors.get(event.anchor)
            if node is not None:  # (an undefined alias: the composer says so)
                if event.anchor in self._open:
                    self._refuse(f"recursive alias *{event.anchor}", event.start_mark)
                self._aliases += 1
                if self._aliases > MAX_ALIASES:
                    self._refuse(f"more than {MAX_ALIASES} aliases", event.start_mark)
                values, levels = self._measure(node)
                if depth + levels > MAX_DEPTH:
                    self._refuse(
                        f"nested deeper than {MAX_DEPTH} levels once alias *{event.anchor} is expanded",
                        event.start_mark,
                    )
                self._count(values, event.start_mark, by_alias=True)
            return super().compose_node(parent, index)
        if depth >= MAX_DEPTH:
            self._refuse(f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self._count(1, event.start_mark, by_alias=False)
        if event.anchor is not None:
            self._open.add(event.anchor)
        node = super().compose_node(parent, index)
        self._open.discard(event.anchor)
        return node

    # ------------------------------------------------------------------ values
    def compose_scalar_node(self, anchor):
        node = super().compose_scalar_node(anchor)
        tag, text, mark = node.tag, node.value, node.start_mark
        if tag not in SCALAR_TAGS:
            self._refuse(
                f"tag {_short_tag(tag)} is not read here (YAML 1.2 core schema: "
                "str, int, float, bool, null)",
                mark,
            )
        if tag == BOOL and not _BOOL.match(text):
            self._refuse(f"!!bool {_shown(text)}: a boolean is true or false (YAML 1.2)", mark)
        if tag == NULL and not _NULL.match(text):
            self._refuse(f"!!null {_shown(text)}: null is null, ~ or nothing", mark)
        if tag == FLOAT and not (_FLOAT.match(text) or _INT.match(text)):
            self._refuse(f"!!float {_shown(text)} is not a YAML 1.2 number", mark)
        if tag == INT:
            m = _INT.match(text)
            if not m:
                self._refuse(f"!!int {_shown(text)} is not a YAML 1.2 integer", mark)
            digits = m["digits"] or m["oct"] or m["hex"]
            if len(digits) > 24 or abs(_int_value(text)) > MAX_INT:
                self._refuse(f"integer too large: {_shown(text, 24)} ({len(digits)} digits)", mark)
            if m["digits"] and len(digits) > 1 and digits.startswith("0"):
                plain = digits.lstrip("0") or "0"
                octal = f", or 0o{plain} for octal" if set(plain) <= set("01234567") else ""
                self._refuse(
                    f"{text}: a leading zero is ambiguous (octal in YAML 1.1, decimal in "
                    f"YAML 1.2): write {m['sign']}{plain}{octal}",
                    mark,
                )
        return node

    def _start_collection(self, anchor, kind, tag_wanted: str, what: str):
        """The node a list or mapping starts (its start event read, its tag checked, its
        anchor recorded), values still to come."""
        start_event = self.get_event()
        tag = start_event.tag
        if tag is None or tag == "!":
            tag = self.resolve(kind, None, start_event.implicit)
        if tag != tag_wanted:
            self._refuse(f"tag {_short_tag(tag)} is not read here ({what})", start_event.start_mark)
        node = kind(tag, [], start_event.start_mark, None, flow_style=start_event.flow_style)
        if anchor is not None:
            self.anchors[anchor] = node
        return node

    def compose_sequence_node(self, anchor):
        node = self._start_collection(anchor, SequenceNode, SEQ, "a list is !!seq")
        index = 0
        while not self.check_event(SequenceEndEvent):
            self._path.append(index)
            node.value.append(self.compose_node(node, index))
            self._path.pop()
            index += 1
        node.end_mark = self.get_event().end_mark
        return node

    def compose_mapping_node(self, anchor):
        node = self._start_collection(anchor, MappingNode, MAP, "a mapping is !!map")
        seen: dict = {}  # key -> its line
        while not self.check_event(MappingEndEvent):
            key_event = self.peek_event()
            key_node = self.compose_node(node, None)
            if not isinstance(key_node, ScalarNode):
                self._refuse("a key must be a plain value, not a list or a mapping", key_event.start_mark)
            if key_node.tag == STR and key_node.value == "<<" and key_node.style is None:
                self._refuse("merge keys (<<) are YAML 1.1, not read here: write the keys out", key_event.start_mark)
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                self._refuse(f"duplicate key {key!r} (lines {seen[key]} and {line})")
            seen[key] = line
            self._path.append(key)
            value_node = self.compose_node(node, key_node)
            self._path.pop()
            node.value.append((key_node, value_node))
        node.end_mark = self.get_event().end_mark
        return node


def load(text: str):
    """The data of the one YAML document in ``text`` (None if empty). Raises :class:`Refused`,
    :class:`TooSlow` past the deadline, or PyYAML's ``YAMLError`` for a syntax error."""
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
