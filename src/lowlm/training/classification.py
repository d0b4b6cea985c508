"""Training and scoring a sequence classifier: batches of right-padded input ids with one
label each, predictions, and the test set's scores (accuracy, macro F1, per-label precision,
recall and F1, the confusion matrix)."""

from __future__ import annotations

import numpy as np
import torch

from lowlm.training.batches import padding_mask, right_pad
from lowlm.training.loop import to_device


def collate_labels(pad_id: int):
    """Right-padded input ids with an attention mask and one label per example."""

    def collate(examples, device) -> dict[str, torch.Tensor]:
        rows = [e["input_ids"] for e in examples]
        ids, mask = right_pad(rows, pad_id), padding_mask(rows)
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return {
            "input_ids": to_device(ids, device),
            "attention_mask": to_device(mask, device),
            "labels": to_device(labels, device),
        }

    return collate


@torch.no_grad()
def predict(model, rows: list[dict], pad_id: int, batch_size: int = 16) -> list[int]:
    model.eval()
    device = next(model.parameters()).device
    collate = collate_labels(pad_id)
    predictions = []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], device)
        batch.pop("labels")
        predictions.extend(model(**batch).logits.argmax(-1).tolist())
    return predictions


def scores(gold: list[int], predicted: list[int], names: list[str]) -> dict:
    """Accuracy, macro F1, per-label precision / recall / F1 and the confusion matrix
    (rows: gold, columns: predicted)."""
    k = len(names)
    confusion = np.zeros((k, k), dtype=int)
    for g, p in zip(gold, predicted, strict=True):
        confusion[g, p] += 1
    per_label, f1s = {}, []
    for i, name in enumerate(names):
        tp = int(confusion[i, i])
        predicted_i, gold_i = int(confusion[:, i].sum()), int(confusion[i].sum())
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / gold_i if gold_i else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[name] = {"precision": precision, "recall": recall, "f1": f1, "support": gold_i}
        f1s.append(f1)
    majority = int(confusion.sum(axis=1).max()) / max(len(gold), 1)
    return {
        "accuracy": float(np.trace(confusion)) / max(len(gold), 1),
        "macro_f1": sum(f1s) / k,
        "majority_class_accuracy": majority,
        "n": len(gold),
        "labels": per_label,
        "confusion_matrix": {"labels": names, "rows_gold_columns_predicted": confusion.tolist()},
    }


def test_scores(test_rows: list[dict], labels: list[str], pad_id: int, results: dict):
    """A classifier stage's final figures: the trained model's predictions on the test rows,
    scored; the whole scores go into `results` (results.json), the headline into the metrics."""

    def evaluate(trained) -> dict:
        predicted = predict(trained, test_rows, pad_id)
        results.update(scores([r["label"] for r in test_rows], predicted, labels))
        return {
            "accuracy": results["accuracy"],
            "macro_f1": results["macro_f1"],
            "majority_class_accuracy": results["majority_class_accuracy"],
            "test_examples": results["n"],
        }

    return evaluate
