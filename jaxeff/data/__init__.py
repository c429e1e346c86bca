"""Data: embedded corpora, BPE tokenizers, packing and checkpointable grain loaders.

The names below load their module on first use (``from jaxeff.data import make_loader``);
``import jaxeff.data`` imports nothing else.
"""

from jaxeff._lazy import attach as _attach

_EXPORTS = {
    "corpora": ("CORPORA", "Document", "list_silos", "load_documents", "split_documents"),
    "packing": (
        "LMData",
        "PackedSource",
        "build_lm_data",
        "iterator_state",
        "make_loader",
        "pack_sequences",
        "restore_iterator",
        "unigram_perplexity",
    ),
    "tokenize": (
        "EOS_TOKEN",
        "PAD_TOKEN",
        "encode_documents",
        "get_tokenizer",
        "train_bpe_tokenizer",
    ),
}

__getattr__, __dir__, __all__ = _attach(
    __name__, attrs={name: module for module, names in _EXPORTS.items() for name in names}
)
