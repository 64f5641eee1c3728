"""``--set key=value`` overrides of a config (a ``RunConfig``, a ``FinetuneConfig``), parsed beside the CLI
that takes them."""

from __future__ import annotations

import json



def apply_overrides(config, overrides: list[str]):
    """Apply ``key=value`` overrides with dotted keys (``train.lr=1e-3``, ``model.engram.layer_ids=[1,3]``).

    Values are parsed as JSON when they parse (numbers, lists, true/false/null), else taken as strings.
    The result is validated like any config; an unknown key names the known ones.
    """
    data = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. train.lr=1e-3)")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node, parts = data, key.strip().split(".")
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
