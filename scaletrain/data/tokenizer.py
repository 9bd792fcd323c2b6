"""Byte-level BPE tokenizers: train one on a corpus, or load any local tokenizer.json.

The rest of scaletrain sees only `TextTokenizer`, a thin wrapper over HF `tokenizers` that knows
its end-of-document id, so data preparation and sampling do not care whether the tokenizer was
trained here or saved by `transformers`. Nothing here touches the network.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from scaletrain.data.format import TOKENIZER_FILE, DataError

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Tried in order when a foreign tokenizer folder does not name its eos token.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>")
_NUM_BYTES = 256


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE whose id 0 is `<|endoftext|>`.

    Byte-level with all 256 bytes in the initial alphabet and no normalizer means every string
    (any unicode, any whitespace) encodes without unknown tokens and decodes back unchanged.
    """
    if vocab_size < _NUM_BYTES + 1:
        raise DataError(
            f"vocab_size ({vocab_size}) must be at least {_NUM_BYTES + 1}: "
            "256 byte tokens plus <|endoftext|>"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    logger.info("trained byte-level BPE tokenizer: %d tokens", tok.get_vocab_size())
    return tok


class TextTokenizer:
    """A tokenizer plus its end-of-document id; what the data pipeline and sampling use.

    Special tokens that occur literally inside a text (a document quoting "<|endoftext|>") are
    encoded as plain text, so the only eos ids in the data are the ones we put between documents.
    """

    def __init__(self, tokenizer: Tokenizer, eos_token: str = EOS_TOKEN) -> None:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(f"tokenizer has no eos token {eos_token!r}; add it or name another one")
        # Copy so that switching special-token matching off does not change the caller's object.
        self._tok = Tokenizer.from_str(tokenizer.to_str())
        self._tok.encode_special_tokens = True
        self.eos_token = eos_token
        self.eos_id: int = eos_id
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def tokenizer(self) -> Tokenizer:
        """The underlying HF `tokenizers.Tokenizer`."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode texts in parallel (Rust threads); no bos/eos is added, callers place eos."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Decode ids; eos is shown as `<|endoftext|>` unless skip_special_tokens."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json plus a tokenizer_config.json that `transformers` can also load."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        file = directory / TOKENIZER_FILE
        self._tok.save(str(file))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "bos_token": self.eos_token,
            "clean_up_tokenization_spaces": False,
        }
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return file

    # Pickling goes through JSON because `encode_special_tokens` is not part of the Rust
    # tokenizer's own pickle state, and dataset.map workers need the same behaviour.
    def __getstate__(self) -> dict[str, Any]:
        return {"json": self._tok.to_str(), "eos_token": self.eos_token}

    def __setstate__(self, state: dict[str, Any]) -> None:
        TextTokenizer.__init__(self, Tokenizer.from_str(state["json"]), state["eos_token"])


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """Load a tokenizer from a folder with tokenizer.json (ours or `save_pretrained`'s) or the file.

    The eos token is read from tokenizer_config.json / special_tokens_map.json when present.
    """
    path = Path(path)
    file = path if path.is_file() else path / TOKENIZER_FILE
    if not file.is_file():
        raise DataError(
            f"no {TOKENIZER_FILE} in {str(path)!r}; pass a folder written by "
            "`scaletrain data prepare` (<output>/tokenizer) or by save_pretrained"
        )
    tok = Tokenizer.from_file(str(file))
    return TextTokenizer(tok, _find_eos(tok, file.parent))


def _find_eos(tok: Tokenizer, folder: Path) -> str:
    for name in (TOKENIZER_CONFIG_FILE, "special_tokens_map.json"):
        f = folder / name
        if not f.is_file():
            continue
        eos = json.loads(f.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and tok.token_to_id(eos) is not None:
            return eos
    for cand in _EOS_CANDIDATES:
        if tok.token_to_id(cand) is not None:
            return cand
    raise DataError(
        f"cannot tell the eos token of the tokenizer in {str(folder)!r}: set eos_token in its "
        f"{TOKENIZER_CONFIG_FILE} or add one of {', '.join(_EOS_CANDIDATES)}"
    )
