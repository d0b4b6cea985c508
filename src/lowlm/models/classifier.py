"""A model as a sequence classifier: the run's model with a fresh classification head."""

from __future__ import annotations

from pathlib import Path

import torch

from lowlm.errors import LowlmError
from lowlm.hub import unreachable_note
from lowlm.models.load import load_merged, read_card


def load_classifier(source: str, model_config, labels: list[str], work: Path, pad_id: int):
    """The source model with a fresh classification head. A model lowlm stores as an adapter
    or embeddings over a parent is merged into a plain folder first."""
    from transformers import AutoModelForSequenceClassification

    folder = Path(source)
    card = read_card(folder) if folder.is_dir() else None
    if card is not None and card.get("kind") != "model":
        load_merged(folder, model_config, torch.float32).save_pretrained(work / "merged")
        source = str(work / "merged")
    note = "" if Path(source).exists() else unreachable_note()  # a Hub name: at once offline
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            trust_remote_code=model_config.trust_remote_code,
            dtype=torch.float32,
        )
    except (OSError, ValueError) as exc:
        raise LowlmError(f"cannot load {source} as a sequence classifier{note}: {exc}") from None
    model.config.pad_token_id = pad_id  # where the classifier finds each row's last token
    return model
