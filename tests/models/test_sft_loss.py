"""`train.task: sft` at the model: the loss weighted by the response mask is transformers' loss
with labels -100 at the masked positions, and masked positions get exactly no gradient."""

from __future__ import annotations

from pathlib import Path

import torch

from scaletrain.config.checks import check_config
from scaletrain.hf.imports import full_weights, read_hf_weights
from scaletrain.models.gpt import GPT
from scaletrain.models.parallel import TensorParallel
from tests.hf.test_import import save_llama, tiny_config


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Token windows [3, 25] and a mask over them with response runs of several lengths."""
    g = torch.Generator().manual_seed(3)
    windows = torch.randint(0, 512, (3, 25), generator=g)
    mask = torch.zeros(3, 25, dtype=torch.long)
    mask[0, 5:12] = 1
    mask[1, 20:] = 1
    mask[2, 1:4] = mask[2, 9:17] = 1
    return windows, mask


def test_masked_loss_equals_transformers_and_masked_positions_get_no_gradient(
    tmp_path: Path, stdlib_data: Path, tensor_parallel: TensorParallel
) -> None:
    from transformers import AutoModelForCausalLM

    folder = save_llama(tmp_path / "hf")
    config = tiny_config(stdlib_data, folder)
    padded = check_config(config, world_size=1).padded_vocab_size
    model = GPT(config.model, padded, tensor_parallel)
    weights = full_weights(read_hf_weights(folder), config.model, padded, str(folder))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(m.endswith("_extra_state") for m in missing)

    windows, mask = _batch()
    label_mask = mask[:, 1:].float()
    captured = {}

    def keep_logits(module, args, output: torch.Tensor) -> None:
        output.retain_grad()
        captured["logits"] = output

    hook = model.head.register_forward_hook(keep_logits)
    loss = model(windows, label_mask / label_mask.sum())
    loss.backward()
    hook.remove()

    grad = captured["logits"].grad  # [3, 24, padded vocab]
    masked = label_mask == 0
    assert int(masked.sum()) == 72 - (7 + 5 + 3 + 8)
    assert torch.count_nonzero(grad[masked]).item() == 0  # exactly zero, every vocab entry
    assert (grad[~masked].abs().sum(-1) > 0).all()  # and every response position learns

    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    labels = windows.masked_fill(mask == 0, -100)  # transformers shifts labels itself
    with torch.no_grad():
        want = hf(input_ids=windows, labels=labels).loss.item()
    assert abs(loss.item() - want) / want < 1e-5
    # Without weights the same model gives the plain mean over all labels, which differs.
    with torch.no_grad():
        plain = model(windows).item()
        want_plain = hf(input_ids=windows, labels=windows).loss.item()
    assert abs(plain - want_plain) / want_plain < 1e-5
    assert abs(plain - want) / want > 1e-3
