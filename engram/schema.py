"""What every config dataclass shares: validation helpers, ``to_dict``/``from_dict``, and ``--set`` overrides.

Each config lives beside what it configures (``engram.model.config``, ``engram.model.table_config``,
``engram.data.config``, ``engram.train.config``, and the adapter's and finetune's configs in
``engram.hf``); ``engram.config`` re-exports them under their old names.

Every config validates itself in ``__post_init__`` and raises ``ValueError("Class.field: why")``.
``to_dict``/``from_dict`` round-trip through plain JSON types; unknown keys are refused, so a typo in a
saved or user-supplied config never passes silently. A class lists its nested configs in ``NESTED``
(field -> class) so ``from_dict`` builds them with their own migrations. A class whose fields moved
lists the old names in ``MOVED`` (old field -> dotted path under the class): ``from_dict`` reads files
written with the old names, and ``apply_overrides`` accepts them in ``--set``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import field
from typing import Any, ClassVar

DERIVED = "derived"  # dataclass field metadata key: what in the data decides the field


def require(ok: bool, cls: str, name: str, why: str) -> None:
    if not ok:
        raise ValueError(f"{cls}.{name}: {why}")


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def pos_int(cls: str, name: str, value: Any, minimum: int = 1) -> None:
    require(is_int(value), cls, name, f"must be an int, got {value!r}")
    require(value >= minimum, cls, name, f"must be >= {minimum}, got {value}")


def derived(default: Any, source: str):
    """A field the data decides (``source`` says what in the data): ``None`` takes the data's value; a
    value set by the user is kept and checked against the data (``ModelConfig.with_data``)."""
    return field(default=default, metadata={DERIVED: source})


def nested(config, name: str, cls: type, owner: str, optional: bool = False):
    """``config.name`` as a ``cls``: a dict (from JSON) is converted; anything else is refused by name."""
    value = getattr(config, name)
    if isinstance(value, dict):
        value = cls.from_dict(value)
        setattr(config, name, value)
    article = "an" if cls.__name__[0] in "AEIOU" or cls.__name__.startswith("MLA") else "a"
    require(isinstance(value, cls) or (optional and value is None), owner, name,
            f"must be {article} {cls.__name__}{' or None' if optional else ''}, got {type(value).__name__}")
    return value


class Serialisable:
    """to_dict/from_dict for (nested) config dataclasses."""

    NESTED: ClassVar[dict[str, type]] = {}
    MOVED: ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a dict, got {type(data).__name__}")
        if any(k in cls.MOVED for k in data):
            data = _moved_into_place(cls, data)
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(known)}")
        kwargs = {}
        for name, value in data.items():
            sub = cls.NESTED.get(name)
            kwargs[name] = sub.from_dict(value) if (sub is not None and isinstance(value, dict)) else value
        return cls(**kwargs)


def _moved_into_place(cls, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with every old field name of ``cls`` (``cls.MOVED``) put at its new dotted path."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items() if k not in cls.MOVED}
    for old, value in data.items():
        if old not in cls.MOVED:
            continue
        head, _, rest = cls.MOVED[old].partition(".")
        given = data.get(head)
        if isinstance(given, dict) and rest in given:
            raise ValueError(f"{cls.__name__}: {old!r} and {cls.MOVED[old]!r} are the same field (its old and new "
                             "name); give it once")
        section = out.setdefault(head, {})
        if isinstance(section, Serialisable):  # a section given as an object: keep it, with this field replaced
            section = out[head] = section.to_dict()
        if not isinstance(section, dict):
            raise ValueError(f"{cls.__name__}.{head}: must be a dict of its fields, got {section!r} (beside the old "
                             f"name {old!r}, which lives in it)")
        section[rest] = value
    return out


def apply_overrides(config, overrides: list[str]):
    """Apply ``key=value`` overrides with dotted keys (``train.optim.lr=1e-3``, ``model.engram.layer_ids=[1,3]``)
    to a config (a ``RunConfig``, a ``FinetuneConfig``, ...); returns a new one.

    Values are parsed as JSON when they parse (numbers, lists, true/false/null), else taken as strings.
    A field's old name (``train.lr``, see ``Serialisable.MOVED``) reaches its new place. The result is
    validated like any config; an unknown key names the known ones.
    """
    data = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. train.optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        parts = _resolve(config, key.strip().split("."))
        node = data
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"override {key!r}: no field {'.'.join(parts[: i + 1])!r}")
            if node[part] is None:
                raise ValueError(f"override {key!r}: {'.'.join(parts[: i + 1])} is null in this preset")
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            known = sorted(node) if isinstance(node, dict) else []
            raise ValueError(f"override {key!r}: unknown field {parts[-1]!r}; known: {known}")
        node[parts[-1]] = value
    return type(config).from_dict(data)


def _resolve(config, parts: list[str]) -> list[str]:
    """A dotted key with each old field name (``MOVED``) replaced by its new path, walking the configs."""
    out, obj = [], config
    for part in parts:
        moved = getattr(type(obj), "MOVED", {}) if obj is not None else {}
        if part in moved and not (dataclasses.is_dataclass(obj) and part in {f.name for f in dataclasses.fields(obj)}):
            new = moved[part].split(".")
            out += new
            for p in new:
                obj = getattr(obj, p, None)
            continue
        out.append(part)
        obj = getattr(obj, part, None) if dataclasses.is_dataclass(obj) else None
    return out
