"""What `scaletrain export hf` writes differently for a `train.task: classify` checkpoint.

transformers' `<Family>ForSequenceClassification` (e.g. `LlamaForSequenceClassification`) is
the decoder plus `score` (no lm_head) and classifies each row at its last token that is not
`pad_token_id`: the config carries num_labels, id2label / label2id (the data set's label
names) and the pad id the data was padded with (`scaletrain.data.classify`), so the exported
model's logits equal ours on the same padded tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scaletrain.errors import ScaletrainError
from scaletrain.models.classify_plan import SCORE_WEIGHT


@dataclass(frozen=True)
class ClassifierExport:
    labels: tuple[str, ...]
    pad_id: int

    def architecture(self, causal_lm: str) -> str:
        return causal_lm.replace("ForCausalLM", "ForSequenceClassification")

    def hf_config(self) -> dict[str, Any]:
        """The config.json fields of the classification head."""
        return {
            "num_labels": len(self.labels),
            "id2label": dict(enumerate(self.labels)),
            "label2id": {name: i for i, name in enumerate(self.labels)},
            "pad_token_id": self.pad_id,
        }

    def peft_readme(self, base: Path, adapter: Path) -> str:
        """README.md of a LoRA classifier's peft folder: its base is the language model
        folder, loaded as a classifier with this head's config (the score's values come with
        the adapter), so no copy of the base is written."""
        head = repr(self.hf_config())
        return (
            "# A scaletrain LoRA adapter for sequence classification\n\n"
            f"LoRA adapters and the trained `score` head over the language model `{base}`, "
            "loaded as a sequence classifier with this head's labels and pad id:\n\n"
            "```python\n"
            "from peft import PeftModel\n"
            "from transformers import AutoModelForSequenceClassification\n\n"
            "base = AutoModelForSequenceClassification.from_pretrained(\n"
            f"    {str(base)!r}, **{head}\n"
            ")\n"
            f"model = PeftModel.from_pretrained(base, {str(adapter)!r})\n"
            "```\n"
        )


def classifier_export(
    config: dict[str, Any], weights: dict[str, torch.Tensor], where: str
) -> ClassifierExport:
    """The label names and pad id of the run's data set (its metadata.json); without that
    folder, LABEL_<i> names and the tokenizer's eos as the pad are not a safe guess: refused."""
    from scaletrain.data.format import read_metadata

    paths = (config.get("data") or {}).get("paths") or []
    if not paths or not (Path(paths[0]) / "metadata.json").is_file():
        raise ScaletrainError(
            f"{where}: a classifier's export reads its labels and pad id from the data set it "
            f"trained on ({paths[0] if paths else 'none recorded'}), which is not here"
        )
    info = read_metadata(paths[0])
    rows = weights[SCORE_WEIGHT].shape[0]
    if rows != len(info.labels):
        raise ScaletrainError(
            f"{where}: the score weight has {rows} labels, {paths[0]} names {len(info.labels)}"
        )
    return ClassifierExport(tuple(info.labels), info.eos_id)
