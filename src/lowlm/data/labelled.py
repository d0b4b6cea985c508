"""Labelled examples for a classifier (finetune): (where, text, pair, label) read from the
train and test sets, a stable test share when there is no test set, the label order, and the
examples encoded as input ids with label ids."""

from __future__ import annotations

import json

import numpy as np

from lowlm.config import LowlmConfig
from lowlm.data.heldout import hash_split
from lowlm.data.records import read_records
from lowlm.errors import LowlmError


def labelled_sets(config: LowlmConfig) -> tuple[list, list, list[str]]:
    """(training examples, test examples, labels in their fixed order): the test set is
    finetune.test, else a stable share of the training set; refused when the training set has
    fewer than two labels, the test set a label training never saw, or no example."""
    cfg = config.finetune
    train_examples = read_labelled(config, cfg.train, cfg.hf_split, "finetune.train")
    if cfg.test:
        test_examples = read_labelled(config, cfg.test, cfg.hf_test_split, "finetune.test")
    else:
        train_examples, test_examples = _split_test(
            train_examples, cfg.test_fraction, config.run.seed
        )
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
    return train_examples, test_examples, labels


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


def read_labelled(
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


def _split_test(examples: list, fraction: float, seed: int) -> tuple[list, list]:
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


def encode_labelled(tokenizer, examples: list, label_ids: dict, max_length: int) -> list[dict]:
    """Each example's text (and pair) as input ids cut to max_length, with its label's id."""
    texts = [e[1] for e in examples]
    pairs = [e[2] for e in examples] if examples and examples[0][2] is not None else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)["input_ids"]
    return [
        {"input_ids": np.asarray(ids, dtype=np.int64), "label": label_ids[e[3]]}
        for ids, e in zip(encoded, examples, strict=True)
    ]
