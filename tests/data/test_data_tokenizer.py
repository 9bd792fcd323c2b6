"""Tokenizer: lossless round trips, eos handling, and loading folders written by transformers."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from scaletrain.data import TextTokenizer, load_tokenizer, train_tokenizer

ROUND_TRIP = [
    "",
    " ",
    "\n\n\n",
    "\t\t  mixed \t whitespace  \n",
    "   leading and trailing   ",
    "def f(x):\n    return {'k': [x, x ** 2]}  # comment\n",
    "Grüße, naïve café — ÆØÅ",
    "日本語のテキストと中文",
    "emoji 🐍👩‍💻🇩🇪 and zero\u200bwidth",
    "control \x00\x01\x7f chars and \r\n crlf \r cr",
    "a <|endoftext|> literal",
    "never seen in training: ЖЖЖ ѮѮ ℵ₀ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def trained(docs: list[str]) -> Tokenizer:
    return train_tokenizer(docs * 3, vocab_size=300)


def test_train_tokenizer_vocab_and_eos(trained: Tokenizer) -> None:
    assert trained.get_vocab_size() == 300
    assert trained.token_to_id("<|endoftext|>") == 0
    tok = TextTokenizer(trained)
    assert (tok.eos_id, tok.vocab_size, tok.eos_token) == (0, 300, "<|endoftext|>")


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(trained: Tokenizer, text: str) -> None:
    tok = TextTokenizer(trained)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, text]) == [ids, ids]


def test_training_is_deterministic(trained: Tokenizer, docs: list[str]) -> None:
    # prepare_dataset's output only depends on its inputs if this holds.
    assert train_tokenizer(docs * 3, vocab_size=300).to_str() == trained.to_str()


def test_literal_eos_text_is_not_the_eos_id(trained: Tokenizer) -> None:
    tok = TextTokenizer(trained)
    ids = tok.encode("x <|endoftext|> y")
    assert 0 not in ids
    assert tok.decode(ids) == "x <|endoftext|> y"
    # The behaviour survives pickling into dataset.map workers.
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("x <|endoftext|> y") == ids
    assert clone.eos_id == 0
    # An explicit eos id decodes to its text unless asked to skip it.
    assert tok.decode([*ids, 0]) == "x <|endoftext|> y<|endoftext|>"
    assert tok.decode([*ids, 0], skip_special_tokens=True) == "x <|endoftext|> y"


def test_save_and_load(trained: Tokenizer, tmp_path: Path) -> None:
    tok = TextTokenizer(trained)
    file = tok.save(tmp_path / "tok")
    assert file == tmp_path / "tok" / "tokenizer.json"
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>"
    for loaded in (load_tokenizer(tmp_path / "tok"), load_tokenizer(str(file))):
        assert (loaded.eos_id, loaded.vocab_size) == (0, 300)
        assert loaded.encode_batch(ROUND_TRIP) == tok.encode_batch(ROUND_TRIP)


def test_load_transformers_save_pretrained(trained: Tokenizer, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=trained, eos_token="<|endoftext|>")
    hf.save_pretrained(tmp_path / "hf")
    tok = load_tokenizer(tmp_path / "hf")
    assert (tok.eos_id, tok.vocab_size) == (0, 300)
    text = "def f(x):\n    return x  # Grüße\n"
    assert tok.encode(text) == hf(text)["input_ids"]
    assert tok.decode(tok.encode(text)) == text


def test_load_reads_eos_from_tokenizer_config(trained: Tokenizer, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=trained, eos_token="<|end|>")
    hf.save_pretrained(tmp_path / "hf")
    tok = load_tokenizer(tmp_path / "hf")
    assert tok.eos_token == "<|end|>"
    assert tok.eos_id == 300
    assert tok.vocab_size == 301


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no tokenizer\.json in .*missing"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="at least 257"):
        train_tokenizer(["abc"], vocab_size=256)
