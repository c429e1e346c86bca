"""Data: embedded corpora, BPE tokenizers, packing and checkpointable grain loaders."""

from jaxeff.data.corpora import (
    CORPORA,
    Document,
    list_silos,
    load_documents,
    split_documents,
)
from jaxeff.data.packing import (
    LMData,
    PackedSource,
    build_lm_data,
    iterator_state,
    make_loader,
    pack_sequences,
    restore_iterator,
    unigram_perplexity,
)
from jaxeff.data.tokenize import (
    EOS_TOKEN,
    PAD_TOKEN,
    encode_documents,
    get_tokenizer,
    train_bpe_tokenizer,
)

__all__ = [
    "CORPORA",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "Document",
    "LMData",
    "PackedSource",
    "build_lm_data",
    "encode_documents",
    "get_tokenizer",
    "iterator_state",
    "list_silos",
    "load_documents",
    "make_loader",
    "pack_sequences",
    "restore_iterator",
    "split_documents",
    "train_bpe_tokenizer",
    "unigram_perplexity",
]
