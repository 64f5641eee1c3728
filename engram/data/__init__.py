"""Data pipeline: corpora -> byte-level BPE -> memory-mapped token shards with document boundaries.

    from engram.data import prepare_data
    data = prepare_data(DataConfig(source="stdlib", vocab_size=8192))
    input_ids, boundary = data.train.batch(step, batch_size=8, seq_len=256, seed=0)  # (B, T) each
"""

from engram.data.bpe import (BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, SpecialIds, load_tokenizer, prompt_ids,
                             special_ids, tokenizer_sha256, train_bpe, with_bos)
from engram.data.corpus import (Document, hf_documents, load_documents, split_of, stdlib_documents,
                                text_documents)
from engram.data.prepare import PreparedData, cache_key, prepare_data, prepare_text, prepare_with_tokenizer
from engram.data.shards import TokenShards, write_split

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "SPECIAL_TOKENS", "Document", "PreparedData", "SpecialIds", "TokenShards",
    "cache_key", "hf_documents", "load_documents", "load_tokenizer", "prepare_data", "prepare_text",
    "prepare_with_tokenizer", "prompt_ids", "special_ids", "with_bos",
    "split_of", "stdlib_documents", "text_documents", "tokenizer_sha256", "train_bpe", "write_split",
]
