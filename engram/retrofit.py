"""Moved: the retrofit adapter lives with the transformers integration, in ``engram.hf.retrofit``.

Names imported from here still work, with a ``DeprecationWarning`` that says where they are now. (The only
library module that reaches into ``engram.hf``, and only when such a name is asked for.)
"""

import importlib
import warnings

NEW_HOME = "engram.hf.retrofit"
# names this module only imported from elsewhere, and their homes
ELSEWHERE = {"Engram": "engram.model.engram", "EngramConfig": "engram.model.table_config",
             "NgramHasher": "engram.hashing", "document_ids": "engram.hashing",
             "CompressedTokenizer": "engram.tokenizer", "starts_from_left_padding": "engram.model.cache"}


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    home = ELSEWHERE.get(name, NEW_HOME)
    module = importlib.import_module(ELSEWHERE[name]) if name in ELSEWHERE else importlib.import_module(NEW_HOME)
    if not hasattr(module, name):
        raise AttributeError(f"module 'engram.retrofit' has no attribute {name!r} (the adapter moved to {NEW_HOME})")
    warnings.warn(f"engram.retrofit.{name} moved: use {home}.{name}", DeprecationWarning, stacklevel=2)
    return getattr(module, name)
