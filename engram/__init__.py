"""engram: conditional memory (DeepSeek's Engram, arXiv 2601.07372) for PyTorch language models.

The public surface::

    from engram import CompressedTokenizer, NgramHasher, EngramConfig, ModelConfig, EngramLM
    model = EngramLM(ModelConfig.from_name("tiny-engram"))
    logits = model(input_ids).logits
"""

from engram.model.config import BackboneConfig, MoEConfig, ModelConfig
from engram.model.table_config import EngramConfig, OverEncodingConfig
from engram.hashing import NgramHasher
from engram.model.accounting import ParameterCount, count_parameters
from engram.model.engram import Engram
from engram.model.overencoding import OverEncoding
from engram.model.transformer import EngramLM, LMOutput
from engram.presets import get_preset
from engram.tokenizer import CompressedTokenizer

__version__ = "0.2.0"

__all__ = [
    "BackboneConfig", "CompressedTokenizer", "Engram", "EngramConfig", "EngramLM", "LMOutput", "ModelConfig",
    "MoEConfig", "NgramHasher", "OverEncoding", "OverEncodingConfig", "ParameterCount", "count_parameters",
    "get_preset",
]
