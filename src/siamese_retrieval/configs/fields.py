"""Typed knobs: a config dataclass's fields carry their type (the annotation) and their range (`knob(...)`),
and one walker checks a composed config against them.

    @dataclass
    class PlaceBatches:
        P: int = knob("places per P x K batch", ge=2)
        lookalike: Optional[str] = knob("null: random places", choices=("embedding",))

A bad value is ONE line, `<dotted key>=<value>: <what it must be>`:

    model.places.P=1: must be an integer >= 2
    data.pairs.preset='x': must be one of study, default, light

The value is shown as typed: bare for numbers, booleans and lists (`abc`, `[0]`), Python-quoted for strings,
choices and paths (`'x'`), `null` for None.

Semantics:
  * A key that is absent, whose interpolation cannot be resolved, or whose parent node is null, is skipped:
    only values that exist are checked (a custom model's own keys are its own business).
  * bool is not an integer; an integer is accepted where a number is expected; NaN and +-inf are not numbers.
  * null is accepted only where the annotation says `Optional[...]`. A nested node may always be null.
  * Unknown keys are Hydra's: struct mode refuses them (with the nearest name, cli.py).

Why a walker after composition, not Hydra's merge-time typing: merge-time typing turns `kind=5` into the
string '5' without a word, forbids the `open_dict` additions the pipelines make, and refuses a node replaced
by a name (`aggregation=netvlad`). The walker reads the same dataclasses (registered in Hydra's ConfigStore,
configs/__init__.py) and says what is wrong in the words above.

Standard library and omegaconf only: the check runs before torch is imported.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from siamese_retrieval.errors import ConfigError

ABSENT: Any = object()  # what `Getter` returns for a key that is missing, unresolvable or under a null node
Getter = Callable[[str], Any]  # a node's resolved value by its dotted path relative to the node

# Kinds of value (from the annotation, or `kind=` where the annotation is Any).
INT, FLOAT, BOOL, STR, CHOICE, PATH = "int", "float", "bool", "str", "choice", "path"
INTS, FLOATS, STRS = "list-of-int", "list-of-float", "list-of-str"
DEVICES = "devices"  # Lightning's Trainer(devices=): 'auto', -1, an int >= 1, "0,1", or a list of indices
BATCHES = "batches"  # Lightning's limit_*_batches: an int >= 0 (batches) or a float in [0, 1] (a fraction)
REGISTERED = "registered"  # a name in a registry (siamese_retrieval.registry), or a node with `name:`
OPEN = "open"  # Any / Dict[str, Any]: another library's settings (a Lightning callback's arguments): not checked


@dataclass(frozen=True)
class Knob:
    """What a field's annotation cannot say: its range, its allowed values, and a note for the reader."""

    note: str = ""
    ge: float | None = None  # value >= ge
    gt: float | None = None  # value > gt
    le: float | None = None  # value <= le
    lt: float | None = None  # value < lt
    choices: tuple[Any, ...] = ()  # the allowed values (type-exact: 32 and "32" differ)
    choices_from: str = ""  # 'module:NAME': the allowed values are read there, after every cheap check
    registry: str = ""  # REGISTERED: the registry's attribute name in siamese_retrieval.registry
    kind: str = ""  # overrides the annotation's kind (PATH, DEVICES, BATCHES, CHOICE of mixed types)
    non_empty: bool = False  # lists: at least one entry
    length: int | None = None  # lists: exactly this many entries


def knob(note: str = "", *, default: Any = MISSING, **spec: Any) -> Any:
    """A typed config field; `default` MISSING: the shipped yaml gives the value (the dataclass is a schema)."""
    return dataclasses.field(default=default, metadata={"knob": Knob(note, **spec)})


def node(note: str = "", **spec: Any) -> Any:
    """A nested config node (a dataclass field): null allowed, anything else that is no mapping refused, unless
    `registry=` names the registry its `name:` (or the name that replaced it) must be in."""
    return dataclasses.field(default=None, metadata={"knob": Knob(note, **spec)})


@dataclass
class Built:
    """A node Hydra instantiates: the class (or function, with `_partial_`) it builds."""

    _target_: str = knob("the class built (hydra.utils.instantiate)")


@dataclass(frozen=True)
class Rule:
    """One leaf of a schema, flattened: its dotted key, kind, range and whether null is documented."""

    key: str
    kind: str
    spec: Knob
    nullable: bool = False


# ---------------------------------------------------------------------------- the schema, flattened
def leaves(schema: type, prefix: str = "") -> Iterator[Rule | tuple[str, type, Knob]]:
    """Every field of `schema` in declaration order: a Rule for a value, (key, dataclass, knob) for a node."""
    for name, inner, spec, kind, nullable in _fields(schema):
        key = f"{prefix}.{name}" if prefix else name
        yield (key, inner, spec) if kind is None else Rule(key, kind, spec, nullable)


@functools.lru_cache(maxsize=None)
def _fields(schema: type) -> tuple[tuple[str, Any, Knob, str | None, bool], ...]:
    """(name, type, knob, kind or None for a node, nullable) per field; resolving the hints is the slow part."""
    hints = typing.get_type_hints(schema)
    out = []
    for f in dataclasses.fields(schema):
        spec = f.metadata.get("knob", Knob())
        inner, nullable = _unwrap_optional(hints[f.name])
        kind = None if dataclasses.is_dataclass(inner) else spec.kind or _kind_of(inner, spec)
        out.append((f.name, inner, spec, kind, nullable))
    return tuple(out)


def rules(schema: type, prefix: str = "") -> Iterator[Rule]:
    """Every value rule under `schema`, nodes flattened (for tests and docs)."""
    for item in leaves(schema, prefix):
        if isinstance(item, Rule):
            yield item
        else:
            yield from rules(item[1], item[0])


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True
    return tp, False


def _kind_of(tp: Any, spec: Knob) -> str:
    if spec.registry:
        return REGISTERED
    if spec.choices or spec.choices_from:
        return CHOICE
    if tp is Any or typing.get_origin(tp) in (dict, typing.Dict):
        return OPEN
    if typing.get_origin(tp) in (list, typing.List):
        return {int: INTS, float: FLOATS, str: STRS}[typing.get_args(tp)[0]]
    kinds = {int: INT, float: FLOAT, bool: BOOL, str: STR}
    if tp not in kinds:
        raise TypeError(f"a config field of type {tp!r} needs knob(kind=...)")
    return kinds[tp]


# ---------------------------------------------------------------------------- walking a composed config
@dataclass
class Walk:
    """One check of a composed config: the values found bad are raised at once; lazy choices and cross-node
    checks are collected and run after every cheap value check passed (they may import heavy modules)."""

    cfg: DictConfig | dict
    late: list[tuple[Rule, Any]] = dataclasses.field(default_factory=list)
    checks: list[tuple[type, str]] = dataclasses.field(default_factory=list)

    def get(self, key: str) -> Any:
        """The resolved value (plain python), or ABSENT when missing / unresolvable / under a null parent."""
        value = self._raw(key)
        if isinstance(value, (DictConfig, ListConfig)):
            try:
                value = OmegaConf.to_container(value, resolve=True)
            except Exception:  # noqa: BLE001 - an unresolvable interpolation (bad env var, missing node): not ours
                return ABSENT
        return value

    def getter(self, prefix: str) -> Getter:
        return lambda rel: self.get(f"{prefix}.{rel}" if prefix else rel)

    def node(self, schema: type, prefix: str = "") -> None:
        """Check every value under `schema` at `prefix`; remember its cross-field check for later."""
        if hasattr(schema, "check"):
            self.checks.append((schema, prefix))
        for item in leaves(schema, prefix):
            if isinstance(item, Rule):
                self.value(item)
                continue
            key, inner, spec = item
            if spec.registry:
                self.value(Rule(key, REGISTERED, spec, nullable=True))
            raw = self._raw(key)
            if raw is ABSENT or raw is None:
                continue
            if not isinstance(raw, (DictConfig, dict)):
                if spec.registry:
                    continue  # a name in place of the node
                value = self.get(key)
                if value is ABSENT or value is None or isinstance(value, dict):
                    continue
                names = ", ".join(f.name for f in dataclasses.fields(inner))
                what = spec.note or f"settings ({names})"
                raise ConfigError(f"{key}={show(value, STR)}: must be a mapping of {what} or null")
            self.node(inner, key)

    def value(self, rule: Rule) -> None:
        value = self.get(rule.key)
        if value is ABSENT:
            return
        if rule.kind == REGISTERED or rule.spec.choices_from:
            self.late.append((rule, value))
            return
        problem = problem_of(rule, value)
        if problem is not None:
            raise ConfigError(f"{rule.key}={show(value, rule.kind)}: {problem}")

    def finish(self) -> None:
        """The cross-node checks, then the choices read from registries and modules (these import torch)."""
        for schema, prefix in self.checks:
            schema.check(self.getter(prefix), prefix + "." if prefix else "")
        for rule, value in self.late:
            if rule.kind == REGISTERED:
                registered_choice(rule, value)
            else:
                module, _, name = rule.spec.choices_from.partition(":")
                choices = tuple(getattr(importlib.import_module(module), name))
                problem = problem_of(rule, value, choices=choices)
                if problem is not None:
                    raise ConfigError(f"{rule.key}={show(value, rule.kind)}: {problem}")

    def _raw(self, key: str) -> Any:
        if not isinstance(self.cfg, DictConfig):  # plain python (check_fields)
            value: Any = self.cfg
            for part in key.split("."):
                if not isinstance(value, dict) or part not in value:
                    return ABSENT
                value = value[part]
            return value
        try:
            return OmegaConf.select(self.cfg, key, default=ABSENT, throw_on_resolution_failure=False)
        except Exception:  # noqa: BLE001 - as in get()
            return ABSENT


def check_fields(obj: Any, schema: type, prefix: str) -> None:
    """The schema's check for a config object built in Python (a runtime dataclass such as IndexConfig): the same
    one-line ConfigError as on the command line, so no component keeps a second copy of its ranges."""
    tree: Any = _plain(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj))
    for part in reversed(prefix.split(".") if prefix else []):
        tree = {part: tree}
    walk = Walk(tree)
    walk.node(schema, prefix)
    walk.finish()


def _plain(value: Any) -> Any:
    """Lists for tuples, python numbers for numpy scalars: the values a composed config would hold."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return value


def registered_choice(rule: Rule, value: Any) -> None:
    """A registry name, or a node whose `name:` is one (`aggregation=netvlad` replaces the node by a name)."""
    name = value.get("name", ABSENT) if isinstance(value, dict) else value
    if name in (ABSENT, None):
        return
    from siamese_retrieval import registry

    names = getattr(registry, rule.spec.registry).names()
    if name not in names:
        shown = f"{rule.key}.name" if isinstance(value, dict) else rule.key
        raise registry.unknown_component(shown, name, names)


# ---------------------------------------------------------------------------- one value
def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _in_range(spec: Knob, v: float) -> bool:
    return ((spec.ge is None or v >= spec.ge) and (spec.gt is None or v > spec.gt)
            and (spec.le is None or v <= spec.le) and (spec.lt is None or v < spec.lt))


def range_text(spec: Knob) -> str:
    """' >= 1', ' > 0', ' in [0, 1]', ' in (0, 1]', '' (no bound)."""
    low = ("[", spec.ge) if spec.ge is not None else ("(", spec.gt) if spec.gt is not None else None
    high = ("]", spec.le) if spec.le is not None else (")", spec.lt) if spec.lt is not None else None
    if low and high:
        return f" in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f" {'<=' if high[0] == ']' else '<'} {high[1]}"
    return ""


def _scalar_ok(kind: str, spec: Knob, v: Any) -> bool:
    if kind in (INT, INTS):
        return is_int(v) and _in_range(spec, v)
    if kind in (FLOAT, FLOATS):
        return is_number(v) and _in_range(spec, v)
    return isinstance(v, str)


_NOUN = {INTS: "integer", FLOATS: "number", STRS: "string"}
_DEVICE_STRING = re.compile(r"^\s*(auto|-1|\d+|\d+(\s*,\s*\d+)*\s*,?)\s*$")


def problem_of(rule: Rule, v: Any, choices: tuple[Any, ...] | None = None) -> str | None:
    """None when `v` is a good value for `rule`, else what it must be."""
    choices = rule.spec.choices if choices is None else choices
    kind = rule.kind
    if v is None or kind == OPEN:
        return None if rule.nullable or kind == OPEN else must(rule, choices)
    if kind in (INT, FLOAT, STR):
        ok = _scalar_ok(kind, rule.spec, v)
    elif kind == BOOL:
        ok = isinstance(v, bool)
    elif kind == CHOICE:
        ok = any(type(v) is type(c) and v == c for c in choices)
    elif kind == PATH:  # Hydra reads `query=2024` as an int: a file may be called that
        ok = isinstance(v, str) or is_number(v)
    elif kind in (INTS, FLOATS, STRS):
        spec = rule.spec
        if not isinstance(v, list) or (spec.non_empty and not v) or (spec.length is not None and len(v) != spec.length):
            return must(rule)
        if not all(_scalar_ok(kind, spec, x) for x in v):
            return f"every entry must be a{'n' if kind == INTS else ''} {_NOUN[kind]}{range_text(spec)}"
        return None
    elif kind == DEVICES:
        ok = ((is_int(v) and (v == -1 or v >= 1))
              or (isinstance(v, str) and bool(_DEVICE_STRING.match(v)) and v.strip() != "0")
              or (isinstance(v, list) and bool(v) and all(is_int(x) and x >= 0 for x in v)))
    elif kind == BATCHES:
        ok = (is_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0)
    else:
        ok = kind == OPEN
    return None if ok else must(rule, choices)


def must(rule: Rule, choices: tuple[Any, ...] | None = None) -> str:
    """'must be an integer >= 1', 'must be one of study, default', ... (+ ' or null' where allowed)."""
    spec, kind = rule.spec, rule.kind
    null = " or null" if rule.nullable else ""
    bounds = range_text(spec)
    if kind == CHOICE:
        shown = dict.fromkeys(show(c, INT) for c in (spec.choices if choices is None else choices))
        return f"must be one of {', '.join(shown)}{null}"
    if kind in (INTS, FLOATS, STRS):
        size = "a non-empty list" if spec.non_empty else f"a list of {spec.length}" if spec.length else "a list"
        noun = _NOUN[kind] + ("s" if spec.length != 1 else "")
        return f"must be {size}{'' if spec.length else ' of'} {noun}{bounds}{null}"
    return {
        INT: f"must be an integer{bounds}{null}",
        FLOAT: f"must be a number{bounds}{null}",
        BOOL: "must be true or false",
        STR: f"must be a string{null}",
        PATH: f"must be a path{null}",
        DEVICES: "must be auto, -1 (all), an integer >= 1 or a list of device indices such as [0, 1]",
        BATCHES: "must be an integer >= 0 (batches) or a number in [0, 1] (a fraction)",
    }[kind]


def show(v: Any, kind: str, quote: bool | None = None) -> str:
    """The value as the user would type it: bare where a number / list was expected, quoted otherwise."""
    if quote is None:
        quote = kind in (STR, CHOICE, PATH, DEVICES)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return repr(v) if quote or not v.isprintable() or not v else v
    if isinstance(v, list):
        text = "[" + ", ".join(show(x, kind, quote=quote) for x in v) + "]"
    elif isinstance(v, dict):
        text = "{" + ", ".join(f"{k}: {show(x, kind, quote=quote)}" for k, x in v.items()) + "}"
    else:
        text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."
