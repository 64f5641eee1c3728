"""Moved: the retrofit adapter lives with the transformers integration, in ``engram.hf.retrofit``.

Names imported from here still work, with a ``DeprecationWarning`` that says where they went. (The only
module of the library that reaches into ``engram.hf``, and only when such a name is asked for.)
"""

import importlib
import warnings

NEW_HOME = "engram.hf.retrofit"


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    module = importlib.import_module(NEW_HOME)
    if not hasattr(module, name):
        raise AttributeError(f"module 'engram.retrofit' has no attribute {name!r} (it moved to {NEW_HOME})")
    warnings.warn(f"engram.retrofit.{name} moved to {NEW_HOME}.{name}", DeprecationWarning, stacklevel=2)
    return getattr(module, name)
