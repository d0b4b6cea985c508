"""Held out means held out: no training stage sees the documents the run's held-out figures
are measured on."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from lowlm.config import load_config
from lowlm.data.heldout import is_held_out
from lowlm.models.load import load_model, load_tokenizer
from lowlm.models.metrics import loss_per_char
from lowlm.stages import export, init, pretrain, sft, tokenize

from .conftest import pipeline_config

HAN = "的一是在不了有和人這中大為上個國我以要他時來用們生到作地於出就分對成會可主發年動同"


def random_corpus(path, documents: int, copies: int, length: int, seed: int = 0) -> list[str]:
    """Lines of random characters: nothing but memorisation predicts them."""
    rng = random.Random(seed)
    unique = ["".join(rng.choice(HAN[:40]) for _ in range(length)) for _ in range(documents)]
    lines = [line for line in unique for _ in range(copies)]
    rng.shuffle(lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return unique


def build(write_config, corpus, **sections):
    sections.setdefault("init", {"size": "tiny"})
    sections = pipeline_config(
        None,
        data={"heldout_fraction": 0.25},
        tokenize={"corpus": [str(corpus)], "vocab_size": 320, "holdout_lines": 1000},
        **sections,
    )
    config = load_config(write_config(**sections))
    tokenize.run(config)
    init.run(config)
    return config


@pytest.mark.slow
def test_no_training_stage_sees_a_held_out_document(write_config, tmp_path):
    corpus = tmp_path / "random.txt"
    unique = random_corpus(corpus, documents=80, copies=3, length=12)
    data = tmp_path / "sft.jsonl"
    config = build(write_config, corpus, pretrain={"full": {"steps": 1}})
    heldout = (config.run_dir / "tokenizer" / "heldout.txt").read_text(encoding="utf-8").split()
    expected = {d for d in unique if is_held_out(d, config.run.seed, 0.25)}
    assert set(heldout) == expected and 10 < len(expected) < 35  # every copy, one rule

    # the tokenizer's training text: every line except the held-out documents
    from lowlm.data.corpus import resolve_sources
    from lowlm.stages.tokenize import _split_corpus

    train_file = tmp_path / "train.txt"
    _split_corpus(config, resolve_sources([str(corpus)]), train_file)
    trained = train_file.read_text(encoding="utf-8").split()
    assert not set(trained) & expected and set(trained) == set(unique) - expected

    # pre-training's blocks: held-out documents only in the validation split
    pretrain.run(config)
    cache = next((config.run_dir / "cache").glob("blocks-*"))
    tokenizer = load_tokenizer(config.run_dir / "tokenizer")
    meta = json.loads((cache / "meta.json").read_text())

    def text(split):
        ids = np.concatenate(
            [np.fromfile(p, dtype=meta["dtype"]) for p in sorted(cache.glob(f"{split}-*.bin"))]
        )
        return tokenizer.decode(ids.tolist())

    train_text, eval_text = text("train"), text("eval")
    assert not any(doc in train_text for doc in expected)
    assert sum(doc in eval_text for doc in expected) > len(expected) // 2

    # sft: an instruction that carries a held-out line is left out, and counted
    records = [
        {"instruction": "重複這一行。", "output": sorted(expected)[0]},
        {"instruction": "重複這一行。", "output": sorted(set(unique) - expected)[0]},
    ]
    data.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    tuned = load_config(
        write_config(
            **pipeline_config(
                None,
                data={"heldout_fraction": 0.25},
                tokenize={"corpus": [str(corpus)], "vocab_size": 320, "holdout_lines": 1000},
                init={"size": "tiny"},
                pretrain={"full": {"steps": 1}},
                sft={
                    "data": [str(data)],
                    "steps": 1,
                    "batch_size": 1,
                    "eval_fraction": 0,
                    "lora": {"r": 2, "alpha": 4},
                    "energy": {"enabled": False},
                },
            )
        )
    )
    assert tuned.run_dir == config.run_dir
    export.run(tuned)
    metrics = sft.run(tuned)
    assert metrics["heldout_text_excluded"] == 1 and metrics["examples"] == 1


@pytest.mark.slow
def test_held_out_loss_is_what_memorisation_cannot_reach(write_config, tmp_path):
    """Trained to memorise random lines, the model predicts its training lines far better than
    the held-out ones; a held-out figure that included training text would not show the gap."""
    corpus = tmp_path / "random.txt"
    unique = random_corpus(corpus, documents=40, copies=8, length=16)
    config = build(
        write_config,
        corpus,
        init={"size": "tiny", "hidden_size": 128, "intermediate_size": 256},
        pretrain={
            "block_size": 64,
            "batch_size": 8,
            "full": {"steps": 120, "lr": 3e-3},
            "eval_every": 1000,
            "log_every": 1000,
        },
    )
    metrics = pretrain.run(config)["full"]
    model = load_model(config.run_dir / "pretrain-full")
    tokenizer = load_tokenizer(config.run_dir / "pretrain-full")
    held = {d for d in unique if is_held_out(d, config.run.seed, 0.25)}
    trained = loss_per_char(model, tokenizer, sorted(set(unique) - held))
    assert metrics["heldout_loss_per_char"] > trained + 0.5, (metrics, trained)
