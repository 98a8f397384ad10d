"""Training data: corpora, tokenizers, windows, micro-batches and their context-parallel shards.

Data flows: documents (`corpus`, or a memory-mapped `indexed` dataset) -> token stream with EOD
separators (`windows.TokenStream` in memory, `mapped.MappedStream` over the map) ->
train/validation windows (`datasets.build_datasets`, their tables in the `index_cache`; a
weighted `blend` of several) -> micro-batches for one data-parallel rank
(`loader.MicroBatchLoader`: plain or packed, `batch`) -> this rank's context-parallel shard
(`context_parallel`).
"""

from mtp_cli.data.batch import Batch, document_lengths, packed_batch, plain_batch
from mtp_cli.data.context_parallel import (
    pad_packed_documents,
    shard_for_context_parallel,
    zigzag_index,
)
from mtp_cli.data.datasets import build_datasets, load_token_stream, split_stream
from mtp_cli.data.indexed import read_indexed_dataset
from mtp_cli.data.indexed_writer import write_indexed_dataset
from mtp_cli.data.loader import MicroBatchLoader
from mtp_cli.data.tokenizer import BYTE_EOD, ByteTokenizer, HFTokenizer, load_tokenizer
from mtp_cli.data.windows import TokenStream, TokenWindows

__all__ = [
    "BYTE_EOD",
    "Batch",
    "ByteTokenizer",
    "HFTokenizer",
    "MicroBatchLoader",
    "TokenStream",
    "TokenWindows",
    "build_datasets",
    "document_lengths",
    "load_token_stream",
    "load_tokenizer",
    "packed_batch",
    "pad_packed_documents",
    "plain_batch",
    "read_indexed_dataset",
    "shard_for_context_parallel",
    "split_stream",
    "write_indexed_dataset",
    "zigzag_index",
]
