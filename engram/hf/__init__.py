"""Hugging Face transformers integration (optional extra ``engram-lm[hf]``, tested with transformers 5.24.0).

    import engram.hf                                   # registers model_type "engram" with the Auto classes
    model = AutoModelForCausalLM.from_pretrained(dir)  # no trust_remote_code
    tok = AutoTokenizer.from_pretrained(dir)           # left padding
    model.generate(**tok(["import os"], return_tensors="pt"), max_new_tokens=20)

``EngramHFConfig`` and ``EngramForCausalLM`` (``modeling``) wrap the project's ``EngramLM``;
``to_hf``/``from_hf`` and ``export_hf`` (``convert``) move models between the two worlds; ``io`` holds
the tokenizer files and their checks.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("engram.hf needs transformers: pip install 'engram-lm[hf]'") from err

from engram.hf.configuration import EngramHFConfig
from engram.hf.convert import export_hf, from_hf, to_hf
from engram.hf.io import hf_tokenizer
from engram.hf.modeling import EngramCache, EngramForCausalLM

__all__ = ["EngramCache", "EngramForCausalLM", "EngramHFConfig", "export_hf", "from_hf", "hf_tokenizer",
           "register_auto_classes", "to_hf"]


def register_auto_classes() -> None:
    """Register ``model_type="engram"`` with ``AutoConfig``, ``AutoModelForCausalLM`` and ``AutoModel``
    (idempotent). ``AutoModel`` gives the causal LM too: the model has no separate headless class (its
    ``output_hidden_states`` give the backbone's states)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        AutoConfig.register(EngramHFConfig.model_type, EngramHFConfig)
    except ValueError:  # already registered
        pass
    for auto in (AutoModelForCausalLM, AutoModel):
        try:
            auto.register(EngramHFConfig, EngramForCausalLM)
        except ValueError:
            pass


register_auto_classes()
