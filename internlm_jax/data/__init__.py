"""Data: document sources and weighted mixtures of them, packing into segment-masked rows, the grain pipeline."""
from internlm_jax.data.corpus import (
    SPLITS, VALIDATION_PLAYS, default_cache_dir, shakespeare_files, shakespeare_source, shakespeare_tokenizer)
from internlm_jax.data.mixture import Component, Mixture, open_spec, parse_spec
from internlm_jax.data.packing import ROW_FIELDS, PackIterDataset, empty_rows, pad_batch
from internlm_jax.data.pipeline import host_shard, make_pretrain_dataset
from internlm_jax.data.sources import (
    ArrayRecordSource, DataError, JsonlSource, TextSource, TfdsSource, expand_files, make_source)

__all__ = [
    "SPLITS", "VALIDATION_PLAYS", "default_cache_dir", "shakespeare_files", "shakespeare_source",
    "shakespeare_tokenizer",
    "Component", "Mixture", "open_spec", "parse_spec",
    "ROW_FIELDS", "PackIterDataset", "empty_rows", "pad_batch",
    "host_shard", "make_pretrain_dataset",
    "ArrayRecordSource", "DataError", "JsonlSource", "TextSource", "TfdsSource", "expand_files", "make_source",
]
