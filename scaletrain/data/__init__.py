"""Data pipeline: tokenizer, `prepare_dataset` (files -> token shards), datasets and sampler.

Typical use:

    info = prepare_dataset(stdlib_sources(), "data/stdlib", vocab_size=4096)
    train = build_dataset(["data/stdlib"], None, "train", seq_len=256, seed=1234)
    sampler = GlobalBatchSampler(len(train), global_batch=64, dp_rank=0, dp_size=1, seed=1234)
    batch = np.stack([train[i] for i in sampler.next_batch()])  # inputs [:, :-1], labels [:, 1:]
"""

from scaletrain.data.dataset import BlendedDataset, TokenDataset, build_dataset
from scaletrain.data.format import DataError, PreparedInfo, ShardInfo, SplitInfo, read_metadata
from scaletrain.data.prepare import prepare_dataset, stdlib_sources
from scaletrain.data.sampler import GlobalBatchSampler
from scaletrain.data.tokenizer import TextTokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "BlendedDataset",
    "DataError",
    "GlobalBatchSampler",
    "PreparedInfo",
    "ShardInfo",
    "SplitInfo",
    "TextTokenizer",
    "TokenDataset",
    "build_dataset",
    "load_tokenizer",
    "prepare_dataset",
    "read_metadata",
    "stdlib_sources",
    "train_tokenizer",
]
