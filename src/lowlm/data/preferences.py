"""Preference pairs for DPO: {prompt, chosen, rejected} records read, each answer encoded
after its prompt with the SFT template (so what `generate` sends is a prefix of what was
tuned), and a stable held-out share chosen by each pair's text."""

from __future__ import annotations

import numpy as np

from lowlm.config import LowlmConfig
from lowlm.data.heldout import hash_split
from lowlm.data.records import read_records
from lowlm.data.sft_examples import truncate
from lowlm.data.templates import Template
from lowlm.errors import LowlmError


def read_pairs(config: LowlmConfig) -> list[tuple[str, str, str, str]]:
    """(where, prompt, chosen, rejected) of every record; a bad record stops with its place."""
    cfg = config.dpo
    if not cfg.data:
        raise LowlmError("dpo.data is not set; list the preference files (JSONL).")
    pairs = []
    for pattern in cfg.data:
        for where, record in read_records(pattern, cfg.hf_split, "dpo.data"):
            values = []
            for field in (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field):
                value = record.get(field)
                if not isinstance(value, str) or not value.strip():
                    raise LowlmError(
                        f"{where}: no text in field '{field}'; set dpo.prompt_field, "
                        "chosen_field and rejected_field to the record's fields."
                    )
                values.append(value)
            if values[1] == values[2]:
                raise LowlmError(f"{where}: chosen and rejected are the same text.")
            pairs.append((where, *values))
    if not pairs:
        raise LowlmError(f"{', '.join(cfg.data)} holds no preference pair.")
    return pairs


def encode_pair(template: Template, prompt: str, answer: str, max_length: int):
    """(ids, labels) of prompt + answer, or None when the prompt alone leaves no answer room."""
    ids, labels = template.encode(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    )
    ids, labels, outcome = truncate(ids, labels, max_length)
    return None if outcome == "dropped" else (ids, labels)


def encode_pairs(pairs: list[tuple], template: Template, max_length: int) -> tuple[list, int]:
    """(encoded pairs, pairs dropped): each pair's chosen and rejected answers after its prompt,
    as arrays, with its text as the key the held-out split hashes; a pair is dropped when its
    prompt leaves either answer no room."""
    encoded, dropped = [], 0
    for _where, prompt, chosen, rejected in pairs:
        c = encode_pair(template, prompt, chosen, max_length)
        r = encode_pair(template, prompt, rejected, max_length)
        if c is None or r is None:
            dropped += 1
            continue
        encoded.append(
            {
                "key": f"{prompt}\0{chosen}\0{rejected}",
                "chosen_ids": np.asarray(c[0]),
                "chosen_labels": np.asarray(c[1]),
                "rejected_ids": np.asarray(r[0]),
                "rejected_labels": np.asarray(r[1]),
            }
        )
    return encoded, dropped


def split_pairs(pairs: list[dict], fraction: float, seed: int) -> tuple[list, list]:
    """Held-out pairs chosen by the run's held-out rule over each pair's text."""
    if fraction <= 0:
        return pairs, []
    return hash_split(pairs, lambda pair: f"{seed}\0{pair['key']}".encode(), fraction)
