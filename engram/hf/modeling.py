"""``EngramForCausalLM``: the project's ``EngramLM`` as a transformers model (``PreTrainedModel`` +
``GenerationMixin``), and ``EngramCache``, the decode state ``generate()`` carries between steps.

Legend: B sequences, T new tokens this call, L tokens cached so far.

No second implementation: ``self.model`` is an ``EngramLM`` and every forward is its forward. What this
module adds is the transformers contract:

  - ``forward(input_ids, attention_mask, cache, use_cache, labels, ...)`` returns
    ``CausalLMOutputWithPast(loss, logits, cache)``. transformers 5.24 names the cache argument and
    output ``cache`` (earlier 5.x: ``past_key_values``, still accepted here).
  - ``attention_mask`` must be *left* padding (zeros, then ones): row b's first real token,
    ``starts[b]``, is a document start for the n-grams and the conv, attention masks the pad keys and
    RoPE counts from it, so a left-padded row gives the logits of the same prompt alone. A padded
    forward without a cache runs through a throw-away cache, the same arithmetic as a prefill.
  - ``EngramCache`` holds one ``engram.model.cache.InferenceCache``: per block the KV buffers and the
    Engram conv's last (K-1)*dilation normalised inputs per branch, and per hasher the last N-1
    compressed ids. ``reorder_cache`` (beam search), ``batch_select_indices`` and
    ``batch_repeat_interleave`` apply one row index to all of it. Its KV buffers grow on demand.
  - The compressed tokenizer is not in the config: ``from_pretrained`` rebuilds it from the folder's
    ``tokenizer.json`` and refuses the folder when it, or the stored hash layout, would address other
    rows (``engram.hf.io``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from engram.hf.configuration import EngramHFConfig
from engram.model.cache import InferenceCache, starts_from_left_padding
from engram.model.init import reset_derived_buffers
from engram.model.tables import TableHost
from engram.model.transformer import IGNORE_INDEX, EngramLM
from engram.tokenizer import CompressedTokenizer


class EngramCache(Cache):
    """transformers' view of an ``InferenceCache`` (see the module docstring). Built by the model's
    forward on the first call of ``generate``; not meant to be built by hand."""

    is_compileable = False

    def __init__(self, inner: InferenceCache, n_layers: int):
        super().__init__(layers=[])
        self.inner = inner
        self.n_layers = n_layers

    def __len__(self) -> int:
        return self.n_layers

    def __repr__(self) -> str:
        return f"EngramCache(batch={self.inner.batch_size}, length={self.inner.length})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.inner.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # grows on demand

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.n_layers

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.n_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.n_layers

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.inner.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.inner.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        index = torch.arange(self.inner.batch_size, device=self.inner.starts.device).repeat_interleave(repeats)
        self.inner.select_rows(index)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("EngramCache cannot be cropped: the Engram conv and n-gram state are not "
                                  "kept per position (assisted and speculative decoding are not supported)")

    def reset(self) -> None:
        raise NotImplementedError("build a new cache instead (generate does)")


class EngramForCausalLM(PreTrainedModel, GenerationMixin, TableHost):
    """An ``EngramLM`` (``.model``) with transformers' loading, saving and ``generate()``. A ``TableHost``
    through its ``EngramLM``: storage tiers and table export take it as they take the ``EngramLM``."""

    config_class = EngramHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_cache_class = True
    _is_stateful = False
    supports_gradient_checkpointing = True  # per block (EngramLM.gradient_checkpointing)
    # Trainer passes num_items_in_batch and leaves the loss unscaled for gradient accumulation: the loss is then
    # sum / num_items_in_batch here, as transformers' own causal LMs compute it
    accepts_loss_kwargs = True

    def __init__(self, config: EngramHFConfig, compressed_tokenizer: CompressedTokenizer | None = None):
        super().__init__(config)
        model_config = config.model_config
        if compressed_tokenizer is None and (model_config.engram_layer_ids or model_config.overencoding is not None):
            compressed_tokenizer = _identity_if_layout_says_so(config)
        self.model = EngramLM(model_config, compressed_tokenizer, sparse_tables=False)
        self.engram_tokenizer = None  # the raw tokenizers.Tokenizer, when known (saved with the model)
        for name, hasher in (("hash_layout", self.model.hasher),
                             ("overencoding_layout", getattr(self.model.overencoding, "hasher", None))):
            stored = getattr(config, name)
            if hasher is not None and stored is not None:
                hasher.check_layout(stored)  # ValueError naming every differing field
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the forward builds an EngramCache itself (it holds more than keys and values)

    def _init_weights(self, module) -> None:
        """Nothing: ``EngramLM`` initialises itself when it is built off the meta device, and a loaded
        model gets every weight from its file (``EngramLM.init_weights`` owns the scheme)."""

    def init_weights(self) -> None:
        """Nothing, for the same reason (transformers' ``post_init`` calls it)."""

    # -- save and load --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, compressed_tokenizer=None,
                        verify_checksums: bool = True, **kwargs):
        """Load a saved folder. The compressed table is rebuilt from the folder's ``tokenizer.json`` and
        must equal the one the tables were addressed with (``compressed_tokenizer.safetensors`` and the
        config's hash layout); otherwise the folder is refused. So is a folder whose files differ from its
        ``checksums.json`` (``verify_checksums=False`` skips reading them: sha256 costs ~1 s per GB), a save
        that was interrupted, and weights that are missing, unexpected or of another shape."""
        from engram.hf.folder import FolderError, verify_folder
        from engram.hf.io import folder_tokenizers

        if verify_checksums:
            verify_folder(pretrained_model_name_or_path)
        tokenizer = None
        if compressed_tokenizer is None:
            compressed_tokenizer, tokenizer = folder_tokenizers(pretrained_model_name_or_path, kwargs)
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args,
                                              compressed_tokenizer=compressed_tokenizer, output_loading_info=True,
                                              **kwargs)
        problems = [f"{kind.replace('_', ' ')} {sorted(map(str, info.get(kind) or []))}"
                    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(kind)]
        if problems:  # never a model with uninitialised weights (EngramLM initialises nothing on load)
            raise FolderError(f"{pretrained_model_name_or_path} does not hold this model's weights: "
                              f"{'; '.join(problems)}")
        model.reset_derived_buffers()
        model._align_tensors()
        model.engram_tokenizer = tokenizer
        return (model, info) if wants_info else model

    @torch.no_grad()
    def _align_tensors(self) -> None:
        """Copy tensors that loading left at unaligned addresses (views into the safetensors file):
        SIMD kernels sum in another order there, which moves logits by ~1e-7 against the same weights
        built natively. Aligned, a loaded model computes bit for bit what the native one does."""
        for module in self.modules():
            for store in (module._parameters, module._buffers):
                for name, t in store.items():
                    if t is not None and t.device.type == "cpu" and t.data_ptr() % 64:
                        if isinstance(t, torch.nn.Parameter):
                            t.data = t.data.clone()
                        else:
                            store[name] = t.clone()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' files (config.json, model.safetensors, generation_config.json), plus the
        compressed table and, when the model knows it, the tokenizer (tokenizer.json and
        tokenizer_config.json, left padding, so ``AutoTokenizer`` loads it), and ``checksums.json``. The
        folder is written atomically (``engram.hf.folder``): killed or out of disk, it is left as it was
        or refused on load, never half written and loadable."""
        from engram.hf.folder import write_folder
        from engram.hf.io import save_tokenizers

        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained(push_to_hub=True): save to a folder first (written atomically, with "
                             "checksums), then upload the folder (huggingface_hub.upload_folder)")
        if not kwargs.get("is_main_process", True):
            return  # one process writes the folder

        def write(directory):
            PreTrainedModel.save_pretrained(self, directory, *args, **kwargs)
            save_tokenizers(self, directory)

        write_folder(save_directory, write)

    @property
    def compressed_tokenizer(self) -> CompressedTokenizer | None:
        return self.model.compressed_tokenizer

    @property
    def engram_layers(self) -> dict:
        return self.model.engram_layers

    @property
    def hasher(self):
        return self.model.hasher

    def named_tables(self) -> dict:
        return {f"model.{name}": table for name, table in self.model.named_tables().items()}

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value) -> None:
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.model.output

    def set_output_embeddings(self, value) -> None:
        self.model.output = value

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True, tokenizer=None):
        """transformers' resize, kept consistent with what Engram hashes. The token embedding and the head grow
        (or shrink) and the config follows, so the model runs and reloads at its new size; ``tokenizer=`` (the
        tokenizer that now has the new ids, e.g. after ``add_tokens``) is saved with the model from then on.

        A model with hashed tables (Engram, OverEncoding) addresses rows through its compressed tokenizer,
        whose size V' fixes every hash multiplier. It is resized only with ``tokenizer=``: every old id must
        keep its compressed id and V' must not change, i.e. each new token must normalise to a form the
        vocabulary already had. Ids past the tokenizer's (``pad_to_multiple_of`` padding, never produced by
        it) read as the pad token. Otherwise the call is refused, saying why (every table row would move),
        and nothing changes (``engram.hf.vocab``)."""
        from engram.hf import vocab

        old = self.config.model_config.backbone.vocab_size
        target = new_num_tokens if new_num_tokens is not None else old
        if pad_to_multiple_of is not None:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        if tokenizer is not None and vocab.token_count(tokenizer) > target:
            raise ValueError(f"the tokenizer given has {vocab.token_count(tokenizer)} ids, more than the {target} "
                             "asked for")
        if target == old and tokenizer is None:
            return self.get_input_embeddings()
        compressed = vocab.resized_compressed(self.model, target, tokenizer)
        hashers = vocab.rebuilt_hashers(self.model, compressed)  # before anything changes: a refusal leaves it whole
        embeddings = super().resize_token_embeddings(target, None, mean_resizing)
        if not mean_resizing and target > old:  # transformers initialises new rows through _init_weights, a no-op
            vocab.init_new_rows(self.model, old)
        vocab.follow_vocab(self, target, compressed, hashers, tokenizer)
        return embeddings

    @torch.no_grad()
    def reset_derived_buffers(self) -> None:
        """Recompute the buffers that are not saved (hasher tables, RoPE, table offsets) on the model's
        device: after loading, transformers may leave them as they were built (on meta). Saved buffers
        (the MoE expert bias) keep their loaded values."""
        saved = {name: b.clone() for name, b in self.model.named_buffers() if not b.is_meta
                 and name.rsplit(".", 1)[-1] not in _non_persistent(self.model, name)}
        reset_derived_buffers(self.model)
        buffers = dict(self.model.named_buffers())
        for name, value in saved.items():
            buffers[name].copy_(value)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: EngramCache | None = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, boundary: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                return_dict: bool | None = None, past_key_values: EngramCache | None = None,
                logits_to_keep: int | torch.Tensor = 0, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, num_items_in_batch: int | torch.Tensor | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """input_ids (B, T) raw ids; attention_mask (B, L+T) left padding; labels (B, T) predicts
        labels[:, t+1] at t (ignore -100); boundary (B, T) packed-document starts (no cache, no padding).
        ``position_ids`` are ignored: positions count from each row's first real token.
        ``num_items_in_batch`` (Trainer's, under gradient accumulation): the loss is the sum over this
        call's labelled tokens divided by it, not their mean. ``output_hidden_states`` /
        ``output_attentions``: as ``EngramLM.forward`` (default: the config's)."""
        if inputs_embeds is not None:
            raise ValueError("EngramForCausalLM takes input_ids, not inputs_embeds: Engram hashes token ids")
        if input_ids is None:
            raise ValueError("input_ids is required")
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _IGNORED_KWARGS)
        if unknown:
            raise TypeError(f"EngramForCausalLM.forward got unexpected arguments {unknown}")
        hidden = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        attend = self.config.output_attentions if output_attentions is None else output_attentions
        extra = {"output_hidden_states": bool(hidden), "output_attentions": bool(attend)}
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and labels is None
        if cache is not None and not isinstance(cache, EngramCache):
            raise TypeError(f"EngramForCausalLM needs its own EngramCache, got {type(cache).__name__} "
                            "(let generate() build it: do not pass cache_implementation)")
        T = input_ids.shape[1]
        # one host sync per call: is any of this call's positions padding?
        padded = attention_mask is not None and not bool(attention_mask[:, -T:].to(torch.bool).all())
        if padded and cache is not None and cache.get_seq_length() > 0:
            raise ValueError("new tokens after the prompt must all be real (attention_mask 1)")
        if cache is None and (use_cache or padded):
            if boundary is not None:
                raise ValueError("boundary is for packed training batches, without padding or a cache")
            starts = (starts_from_left_padding(attention_mask[:, -T:]) if padded
                      else torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device))
            inner = self.model.new_cache(starts, T + 64, growable=True)
            cache = EngramCache(inner, len(self.model.layers))
        if cache is not None:
            out = self.model(input_ids, cache=cache.inner, **extra)
        else:  # the loss below, not EngramLM's mean, when Trainer gives num_items_in_batch
            out = self.model(input_ids, labels=labels if num_items_in_batch is None else None, boundary=boundary,
                             **extra)
        logits, loss = out.logits, out.loss  # (B, T, V)
        if labels is not None and loss is None:
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="mean" if num_items_in_batch is None else "sum")
            if num_items_in_batch is not None:
                loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                               else num_items_in_batch)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None,
                                      hidden_states=out.hidden_states, attentions=out.attentions)


# arguments transformers' generate() and Trainer may pass that mean nothing to this model
_IGNORED_KWARGS = {"cache_position", "token_type_ids", "return_legacy_cache"}


def _non_persistent(root, buffer_name: str) -> set[str]:
    """The non-persistent buffer names of the module that owns ``buffer_name``."""
    owner = root.get_submodule(buffer_name.rsplit(".", 1)[0]) if "." in buffer_name else root
    return owner._non_persistent_buffers_set


def _identity_if_layout_says_so(config: EngramHFConfig) -> CompressedTokenizer:
    """Without a tokenizer the compressed table is known only when it is the identity."""
    layout = config.hash_layout or config.overencoding_layout or {}
    tok = layout.get("tokenizer", {})
    vocab = config.model_config.backbone.vocab_size
    identity = CompressedTokenizer.identity(vocab)
    if tok and tok.get("sha256") == identity.sha256:
        return identity
    raise ValueError("this Engram model's tables are addressed through its tokenizer's compressed ids: load it "
                     "with EngramForCausalLM.from_pretrained(folder) (the folder's tokenizer.json rebuilds them) "
                     "or pass compressed_tokenizer=")
