"""`data prepare --format chat|prompt-response`: the loss mask covers exactly the responses (with
the default template and with a tokenizer folder's own), the dataset serves it beside the
tokens across shard borders, and what SFT cannot use is one line."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from scaletrain.cli import main
from scaletrain.config.checks import check_config
from scaletrain.config.load import load_config
from scaletrain.data import prepare_dataset, read_metadata
from scaletrain.data.dataset import TokenDataset
from scaletrain.data.format import DataError, PreparedInfo
from scaletrain.data.tokenizer import load_tokenizer
from scaletrain.errors import ScaletrainError
from tests.distributed import TINY

EOS = "<|endoftext|>"


def _records(path: Path, info: PreparedInfo) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, mask) of every record of both splits, read from the raw shard files."""
    out = []
    for split in info.splits.values():
        ids = np.concatenate([np.fromfile(path / s.file, dtype=info.dtype) for s in split.shards])
        mask = np.concatenate(
            [np.fromfile(path / s.file, dtype=np.uint8) for s in split.mask_shards]
        )
        offsets = np.load(path / split.index_file)
        out += [(ids[a:b], mask[a:b]) for a, b in itertools.pairwise(offsets)]
    return out


def test_prompt_response_masks_exactly_the_responses(sft_data: Path, stdlib_data: Path) -> None:
    info = read_metadata(sft_data)
    assert info.kind == "sft" and info.settings["format"] == "prompt-response"
    assert len(info.splits["train"].mask_shards) == len(info.splits["train"].shards) > 1
    tok = load_tokenizer(stdlib_data / "tokenizer")
    pairs = [json.loads(line) for line in (sft_data.parent / "pairs.jsonl").open()]
    records = _records(sft_data, info)
    assert len(records) == len(pairs) == 219
    got = sorted((tok.decode(ids), tok.decode(ids[mask == 1])) for ids, mask in records)
    want = sorted(
        (f"<|user|>\n{p['prompt']}\n<|assistant|>\n{p['response']}{EOS}", p["response"] + EOS)
        for p in pairs
    )
    assert got == want
    # The eos closing each response is the eos id and a label the loss counts.
    assert all(ids[-1] == tok.eos_id and mask[-1] == 1 for ids, mask in records)


def test_dataset_serves_the_mask_beside_the_tokens(sft_data: Path) -> None:
    info = read_metadata(sft_data)
    split = info.splits["train"]
    ids = np.concatenate([np.fromfile(sft_data / s.file, dtype=info.dtype) for s in split.shards])
    mask = np.concatenate(
        [np.fromfile(sft_data / s.file, dtype=np.uint8) for s in split.mask_shards]
    )
    ds = TokenDataset(sft_data, "train", 32, loss_mask=True)
    border = split.shards[0].num_tokens  # sample 63 spans the first shard border (2048 tokens)
    k = (border - 1) // 32
    assert k * 32 < border < k * 32 + 33
    for i in (0, k, len(ds) - 1):
        sample = ds[i]
        assert sample.shape == (2, 33) and sample.dtype == np.int64
        np.testing.assert_array_equal(sample[0], ids[i * 32 : i * 32 + 33])
        np.testing.assert_array_equal(sample[1], mask[i * 32 : i * 32 + 33])
    # Pretraining reads the same folder as plain token windows.
    np.testing.assert_array_equal(TokenDataset(sft_data, "train", 32)[k], ds[k][0])


def test_a_folders_chat_template_decides_the_responses(tmp_path: Path, stdlib_data: Path) -> None:
    folder = tmp_path / "tokenizer"
    shutil.copytree(stdlib_data / "tokenizer", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ '<<SYS>>' + m['content'] }}"
        "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    chats = [
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"Name module {i}."},
            {"role": "assistant", "content": f"os{i}"},
            {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": f"sys.{i}"},
        ]
        for i in range(12)
    ]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    out = tmp_path / "data"
    info = prepare_dataset([data], out, tokenizer=folder, val_fraction=0.25, num_proc=1, fmt="chat")
    tok = load_tokenizer(folder)
    got = sorted((tok.decode(ids), tok.decode(ids[m == 1])) for ids, m in _records(out, info))
    want = sorted(
        (
            f"<<SYS>>Answer briefly.[INST] Name module {i}. [/INST] os{i}{EOS}[INST] Another? "
            f"[/INST] sys.{i}{EOS}",
            f" os{i}{EOS} sys.{i}{EOS}",
        )
        for i in range(12)
    )
    assert got == want
    assert "chat_template" in json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())
    # A template that does not extend a conversation's rendering cannot locate responses.
    config["chat_template"] = "{{ messages[-1]['content'] }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError) as err:
        prepare_dataset([data], tmp_path / "bad", tokenizer=folder, num_proc=1, fmt="chat")
    assert str(err.value) == (
        f"the chat template of {folder} does not render a conversation as a prefix of its "
        "continuation, so responses cannot be located; give another --tokenizer or remove "
        "its chat_template"
    )


def test_what_sft_cannot_use_is_one_line(
    tmp_path: Path, stdlib_data: Path, sft_data: Path, capsys: pytest.CaptureFixture
) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"question": "q", "response": "r"}) + "\n")
    out = str(tmp_path / "out")
    assert (
        main(
            [
                "data",
                "prepare",
                "--format",
                "chat",
                "--input",
                str(pairs),
                "--output",
                out,
                "--vocab-size",
                "300",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err == (
        "--format chat needs --tokenizer DIR: the tokenizer of the model it fine-tunes\n"
    )
    tokenizer = str(stdlib_data / "tokenizer")
    args = ["data", "prepare", "--input", str(pairs), "--output", out, "--tokenizer", tokenizer]
    assert main([*args, "--format", "prompt-response"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (  # after datasets' progress bar
        "--format prompt-response inputs need the field(s) prompt, response; they have no "
        "prompt (columns: ['question', 'response'])"
    )
    text = tmp_path / "notes.txt"
    text.write_text("plain text\n")
    assert main([*args[:3], str(text), *args[4:], "--format", "chat"]) == 2
    assert capsys.readouterr().err == f"--format chat reads .jsonl/.json files; {text} is not one\n"
    # train.task: sft refuses pretraining data before anything starts, and so does the dataset.
    config = load_config(TINY, [f"data.paths=[{stdlib_data}]", "train.task=sft"])
    with pytest.raises(ScaletrainError) as err:
        check_config(config, world_size=1)
    assert str(err.value) == (
        f"config error: data.paths[0]: '{stdlib_data}' holds pretrain data without a loss "
        "mask; train.task: sft needs data prepared with `scaletrain data prepare --format "
        "chat|prompt-response`"
    )
    with pytest.raises(DataError, match=r"has no loss mask \(kind 'pretrain'\)"):
        TokenDataset(stdlib_data, "train", 32, loss_mask=True)
    check_config(load_config(TINY, [f"data.paths=[{sft_data}]", "train.task=sft"]), 1)
