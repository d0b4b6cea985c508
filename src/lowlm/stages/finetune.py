"""`lowlm finetune`: downstream classification, the way TeenyTinyLlama measured its models
(ASSIN 2, FaQuAD-NLI, HateBR, IMDB-pt, ToLD-BR): the run's model as a sequence classifier.

Reads `finetune` (labelled train / test sets, fields, method full or LoRA, epochs) and the
run's model (or `finetune.model`); writes `finetune/`: the classifier (an HF
`AutoModelForSequenceClassification` folder, or a peft adapter over it), `labels.json` (the
label map, read from the training set) and `results.json` (accuracy, macro F1, per-label
precision and recall, confusion matrix on the test set). Training, checkpoints, resume and
energy are the shared ones.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from lowlm.config import LowlmConfig
from lowlm.data.heldout import hash_split
from lowlm.data.records import read_records
from lowlm.errors import LowlmError
from lowlm.execute import StageRun
from lowlm.hub import unreachable_note
from lowlm.models.load import (
    check_vocab,
    load_merged,
    model_identity,
    model_record,
    pad_id,
    read_card,
    tokenizer_for,
)
from lowlm.training.loop import seed_everything, to_device
from lowlm.training.session import apply_lora, plan_from, run_training_stage, train_and_save

STAGE = "finetune"


def _value(record: dict, field: str, where: str) -> object:
    if field not in record:
        raise LowlmError(
            f"{where}: no field '{field}'; set finetune.text_field, text_pair_field or "
            "label_field to the record's fields."
        )
    value = record[field]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise LowlmError(f"{where}: field '{field}' is empty; fix or remove the record.")
    return value


def _examples(
    config: LowlmConfig, pattern: str, split: str, field: str
) -> list[tuple[str, str, str | None, str]]:
    """(where, text, pair, label as text) of every record of a set (config `field`)."""
    cfg = config.finetune
    examples = []
    for where, record in read_records(pattern, split, field):
        text = _value(record, cfg.text_field, where)
        pair = _value(record, cfg.text_pair_field, where) if cfg.text_pair_field else None
        label = _value(record, cfg.label_field, where)
        if not isinstance(text, str) or (pair is not None and not isinstance(pair, str)):
            raise LowlmError(f"{where}: the text fields must hold text.")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise LowlmError(
                f"{where}: label {label!r} is neither a string nor an integer; fix the record."
            )
        examples.append((where, text, pair, str(label)))
    if not examples:
        raise LowlmError(f"{pattern} holds no labelled record.")
    return examples


def _split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A stable test share chosen by a hash of each record's content."""
    return hash_split(
        examples,
        lambda example: json.dumps([seed, *example[1:]], ensure_ascii=False).encode(),
        fraction,
    )


def _label_order(labels: list[str]) -> list[str]:
    """Integers in numeric order, strings in sorted order: the same map every run."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(set(labels), key=int)
    return sorted(set(labels))


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


def _encode(tokenizer, examples: list, label_ids: dict, max_length: int) -> list[dict]:
    texts = [e[1] for e in examples]
    pairs = [e[2] for e in examples] if examples and examples[0][2] is not None else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)["input_ids"]
    return [
        {"input_ids": np.asarray(ids, dtype=np.int64), "label": label_ids[e[3]]}
        for ids, e in zip(encoded, examples, strict=True)
    ]


def collate_labels(pad_id: int):
    """Right-padded input ids with an attention mask and one label per example."""

    def collate(examples, device) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, : len(e["input_ids"])] = torch.as_tensor(e["input_ids"])
            mask[i, : len(e["input_ids"])] = 1
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


def _classifier(source: str, config: LowlmConfig, labels: list[str], work: Path, pad_id: int):
    """The source model with a fresh classification head. A model lowlm stores as an adapter
    or embeddings over a parent is merged into a plain folder first."""
    from transformers import AutoModelForSequenceClassification

    folder = Path(source)
    card = read_card(folder) if folder.is_dir() else None
    if card is not None and card.get("kind") != "model":
        load_merged(folder, config.model, torch.float32).save_pretrained(work / "merged")
        source = str(work / "merged")
    note = "" if Path(source).exists() else unreachable_note()  # a Hub name: at once offline
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            trust_remote_code=config.model.trust_remote_code,
            dtype=torch.float32,
        )
    except (OSError, ValueError) as exc:
        raise LowlmError(f"cannot load {source} as a sequence classifier{note}: {exc}") from None
    model.config.pad_token_id = pad_id  # where the classifier finds each row's last token
    return model


def run(config: LowlmConfig, force: bool = False, resume: bool = True) -> dict:
    cfg = config.finetune
    if not cfg.train:
        raise LowlmError("finetune.train is not set; name the labelled training set.")
    return run_training_stage(config, STAGE, _work, force, resume)


def _work(run: StageRun, accelerator) -> dict:
    config, cfg = run.config, run.config.finetune
    source = run.plan.model
    if not source:
        raise LowlmError("there is no model to fine-tune; set finetune.model or model.base.")
    train_examples = _examples(config, cfg.train, cfg.hf_split, "finetune.train")
    if cfg.test:
        test_examples = _examples(config, cfg.test, cfg.hf_test_split, "finetune.test")
    else:
        train_examples, test_examples = _split(train_examples, cfg.test_fraction, config.run.seed)
    labels = _label_order([e[3] for e in train_examples])
    if len(labels) < 2:
        raise LowlmError(
            f"the training set has one label ({labels[0]!r}); a classifier needs two or more."
        )
    unseen = sorted({e[3] for e in test_examples} - set(labels))
    if unseen:
        where = next(e[0] for e in test_examples if e[3] in unseen)
        raise LowlmError(
            f"{where}: test label {unseen[0]!r} never occurs in the training set "
            f"(labels: {', '.join(labels)}); fix the data or move examples to train."
        )
    if not test_examples:
        raise LowlmError("the test set is empty; set finetune.test or raise test_fraction.")
    label_ids = {label: i for i, label in enumerate(labels)}

    tokenizer = tokenizer_for(source, config.model)
    pad = pad_id(tokenizer)
    if pad is None:
        raise LowlmError("the tokenizer has neither a pad nor an EOS token to pad batches with.")
    train_rows = _encode(tokenizer, train_examples, label_ids, cfg.max_length)
    test_rows = _encode(tokenizer, test_examples, label_ids, cfg.max_length)
    world = accelerator.num_processes
    steps = max(
        1, math.ceil(cfg.epochs * len(train_rows) / (cfg.batch_size * cfg.grad_accum * world))
    )
    accelerator.print(
        f"finetune: {len(train_rows)} training and {len(test_rows)} test examples, "
        f"{len(labels)} labels ({', '.join(labels)}), {steps} steps ({cfg.epochs} epochs), "
        f"method {cfg.method}"
    )
    seed_everything(config.run.seed)
    work = Path(tempfile.mkdtemp(dir=run.run_dir.path, prefix=".finetune-work-"))
    try:
        model = _classifier(source, config, labels, work, pad)
        check_vocab(model, tokenizer, source)
        if cfg.method == "lora":
            model = apply_lora(model, cfg.lora, task_type="SEQ_CLS")
        plan = plan_from(cfg, steps, cfg.lr, config.run.seed, frozen_base=cfg.method == "lora")
        test: dict = {}

        def evaluate_test(trained) -> dict:
            predicted = predict(trained, test_rows, pad)
            test.update(scores([r["label"] for r in test_rows], predicted, labels))
            return {
                "accuracy": test["accuracy"],
                "macro_f1": test["macro_f1"],
                "majority_class_accuracy": test["majority_class_accuracy"],
                "test_examples": test["n"],
            }

        metrics, energy, card = train_and_save(
            accelerator,
            model,
            tokenizer,
            train_rows,
            None,
            plan,
            cfg,
            run.folder,
            kind="classifier" if cfg.method == "full" else "classifier-adapter",
            parent=None,
            resume=run.resume,
            collate=collate_labels(pad),
            final_metrics=evaluate_test,
            files=lambda: {
                "labels.json": json.dumps(
                    {"labels": labels, "label2id": label_ids}, indent=2, ensure_ascii=False
                ),
                "results.json": json.dumps(test, indent=2, ensure_ascii=False) + "\n",
            },
            stage_key=run.key,
            report_to=config.run.report_to,
            attn_implementation=config.model.attn_implementation,
            parent_key=model_identity(source),
            trained_from=source,
            labels=labels,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if accelerator.is_main_process:
        accelerator.print(
            f"finetune: accuracy {test['accuracy']:.4f}, macro F1 {test['macro_f1']:.4f} on "
            f"{test['n']} test examples (majority class {test['majority_class_accuracy']:.4f}); "
            f"wrote {run.folder}"
        )
    record = model_record(card) if card else {}
    return {"metrics": metrics, "record": {**record, "energy": energy}}
