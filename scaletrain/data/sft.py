"""Supervised fine-tuning data: chat or prompt/response records as token ids plus a loss mask.

A record is one conversation: a `messages` list of {role, content} (`--format chat`), or a
`prompt` and a `response` field, read as a user turn and an assistant turn
(`--format prompt-response`). It is rendered with the chat template of the tokenizer folder
(`chat_template` in tokenizer_config.json, or chat_template.jinja), or with
`DEFAULT_CHAT_TEMPLATE` when the folder has none, through transformers' own
`apply_chat_template`. The mask is 1 on the tokens of each assistant turn (what the template
adds after the prompt of that turn, its end-of-turn token included) and 0 elsewhere, so
`train.task: sft` learns the responses only.

Conversations are packed back to back into one stream per split, like pretraining text, and
the mask is stored beside the token shards (kind "sft" in metadata.json, see `format.py`).
"""

from __future__ import annotations

import glob
import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scaletrain.data import shards
from scaletrain.data.format import (
    INDEX_FILE,
    SPLITS,
    TOKENIZER_DIR,
    DataError,
    PreparedInfo,
    SplitInfo,
    token_dtype,
)
from scaletrain.data.sources import input_kind
from scaletrain.data.tokenizer import TOKENIZER_FILE, TextTokenizer

if TYPE_CHECKING:  # `datasets` costs a second to import; only prepare needs it
    import datasets

logger = logging.getLogger(__name__)

FORMATS = ("chat", "prompt-response")
MASK_PREFIX = "mask"

# The plain template for tokenizers without one: a header line per turn, the assistant's text
# ends with the eos token (so the model learns to stop) instead of a newline.
#   <|user|>\n{prompt}\n<|assistant|>\n{response}<eos>
# (Newlines are Jinja string literals: transformers renders with trim_blocks, which drops a
# newline that follows a tag.)
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def load_conversations(
    files: list[Path], fmt: str, encoding: str, cache_dir: Path
) -> datasets.Dataset:
    """The records of jsonl/json `files` as one `messages` column (role/content dicts)."""
    import datasets

    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    others = [f for f in files if input_kind(f) != "json"]
    if others:
        raise DataError(f"--format {fmt} reads .jsonl/.json files; {others[0]} is not one")
    if not files:
        raise DataError(f"--format {fmt} found no .jsonl/.json inputs")
    ds = datasets.load_dataset(
        "json",
        data_files=[glob.escape(str(f)) for f in files],
        split="train",
        cache_dir=str(cache_dir),
        encoding=encoding,
    )
    need = ["messages"] if fmt == "chat" else ["prompt", "response"]
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise DataError(
            f"--format {fmt} inputs need the field(s) {', '.join(need)}; they have no "
            f"{', '.join(missing)} (columns: {ds.column_names})"
        )
    if fmt == "prompt-response":
        ds = ds.map(
            _as_messages, batched=True, remove_columns=ds.column_names, desc="reading pairs"
        )
    return ds.select_columns(["messages"])


def _as_messages(batch: dict[str, list]) -> dict[str, list]:
    return {
        "messages": [
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            for p, r in zip(batch["prompt"], batch["response"], strict=True)
        ]
    }


class ChatEncoder:
    """Renders one conversation with the folder's chat template and tokenizes it with its mask.

    Each assistant turn i is cut out as render(turns[:i+1]) minus render(turns[:i]) with the
    generation prompt: the template decides what belongs to the response. Special tokens the
    template writes (eos, end-of-turn markers) are encoded as the special ids.
    """

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        self.folder = folder
        self.hf = AutoTokenizer.from_pretrained(str(folder))
        self.template = self.hf.chat_template or DEFAULT_CHAT_TEMPLATE

    @property
    def has_own_template(self) -> bool:
        return self.hf.chat_template is not None

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.hf.apply_chat_template(
            messages,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )

    def segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """(text, is_response) parts whose concatenation is the rendered conversation."""
        parts: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], generation_prompt=True)
            full = self.render(messages[: i + 1])
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise DataError(
                    f"the chat template of {self.folder} does not render a conversation as a "
                    "prefix of its continuation, so responses cannot be located; give another "
                    "--tokenizer or remove its chat_template"
                )
            parts += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        rest = self.render(messages)[len(done) :]
        return [p for p in [*parts, (rest, False)] if p[0]]

    def encode(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        for text, response in self.segments(messages):
            part = self.hf(text, add_special_tokens=False)["input_ids"]
            ids += part
            mask += [int(response)] * len(part)
        return ids, mask

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        encoded = [self.encode(m) for m in batch["messages"]]
        return {"ids": [e[0] for e in encoded], "mask": [e[1] for e in encoded]}

    # The HF tokenizer pickles by value into `datasets`' map workers; reload it there instead.
    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder}

    def __setstate__(self, state: dict[str, Any]) -> None:
        ChatEncoder.__init__(self, state["folder"])


def template_hash(tokenizer: str | Path) -> str:
    """A hash of the chat template files of the tokenizer folder (or of the default), so that
    a changed template prepares the data again."""
    folder = tokenizer_folder(tokenizer)
    blob = DEFAULT_CHAT_TEMPLATE
    for name in ("tokenizer_config.json", "chat_template.jinja", "chat_template.json"):
        if (folder / name).is_file():
            blob += name + (folder / name).read_text()
    return hashlib.sha256(blob.encode()).hexdigest()


def tokenizer_folder(tokenizer: str | Path) -> Path:
    """The folder of a --tokenizer argument (a folder or its tokenizer.json)."""
    path = Path(tokenizer)
    return path.parent if path.name == TOKENIZER_FILE else path


def build(
    files: list[Path],
    work: Path,
    tok: TextTokenizer,
    tokenizer: str | Path,
    settings: dict[str, Any],
    fingerprint: str,
    num_proc: int,
) -> PreparedInfo:
    """Read, render, tokenize with masks, split and write the shards into `work`."""
    import datasets

    folder = tokenizer_folder(tokenizer)
    records = load_conversations(files, settings["format"], settings["encoding"], work / "hf_cache")
    encoder = ChatEncoder(folder)
    logger.info(
        "rendering %d conversations with %s",
        len(records),
        f"the chat template of {folder}" if encoder.has_own_template else "the default template",
    )
    features = datasets.Features(
        {
            "ids": datasets.Sequence(datasets.Value("int64")),
            "mask": datasets.Sequence(datasets.Value("uint8")),
        }
    )
    encoded = records.map(
        encoder,
        batched=True,
        batch_size=256,
        remove_columns=["messages"],
        features=features,
        num_proc=num_proc if len(records) >= 256 * num_proc else None,
        desc="tokenizing conversations",
    )
    tok.save(work / TOKENIZER_DIR)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (folder / name).is_file():  # keep the template with the data it rendered
            (work / TOKENIZER_DIR / name).write_bytes((folder / name).read_bytes())
    dtype = token_dtype(tok.vocab_size)
    n = len(encoded)
    n_val = min(max(round(n * settings["val_fraction"]), 1), n - 1) if n > 1 else 0
    if settings["val_fraction"] == 0:
        n_val = 0
    order = np.random.default_rng(settings["seed"]).permutation(n)
    picks = {"train": order[n_val:], "val": order[:n_val]}
    splits = {
        name: _write_split(encoded.select(picks[name]), work, name, dtype, settings)
        for name in SPLITS
    }
    if splits["train"].num_tokens == 0:
        raise DataError(f"--format {settings['format']} found no conversations in the inputs")
    return PreparedInfo.written(work, dtype, tok, fingerprint, splits, files, settings, kind="sft")


def _write_split(
    encoded: datasets.Dataset, work: Path, split: str, dtype: np.dtype, settings: dict[str, Any]
) -> SplitInfo:
    """Token shards, mask shards of the same token counts, and one index entry per record."""
    folder = work / split
    folder.mkdir()
    limit = settings["max_shard_bytes"]
    tokens = shards.ShardWriter(folder, split, dtype, limit)
    # Same tokens per shard as the token files: mask shard j lies beside token shard j.
    masks = shards.ShardWriter(
        folder, split, np.dtype(np.uint8), limit // dtype.itemsize, MASK_PREFIX
    )
    lengths = [np.zeros(1, dtype=np.int64)]
    masked = 0
    for table in encoded.with_format("arrow").iter(batch_size=4096):
        for chunk in table.column("ids").chunks:
            tokens.write(chunk.flatten().to_numpy(zero_copy_only=False))
            lengths.append(np.diff(chunk.offsets.to_numpy()).astype(np.int64))
        for chunk in table.column("mask").chunks:
            values = chunk.flatten().to_numpy(zero_copy_only=False)
            masks.write(values)
            masked += int(values.sum())
    token_shards, mask_shards = tokens.finish(), masks.finish()
    offsets = np.cumsum(np.concatenate(lengths))
    np.save(folder / INDEX_FILE, offsets)
    num_tokens = int(offsets[-1])
    assert [s.num_tokens for s in token_shards] == [s.num_tokens for s in mask_shards]
    logger.info("%s: %d tokens, %d of them response tokens", split, num_tokens, masked)
    return SplitInfo(
        num_tokens=num_tokens,
        num_documents=len(offsets) - 1,
        shards=token_shards,
        index_file=f"{split}/{INDEX_FILE}",
        mask_shards=mask_shards,
    )
