"""``--set key=value`` parsing lives in ``engram.schema.apply_overrides`` (research code uses it too); this
name stays for code written before it moved."""

from engram.schema import apply_overrides

__all__ = ["apply_overrides"]
