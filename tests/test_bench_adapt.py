"""scripts/bench_adapt.py --tiny: the arms, their budgets and the output, on test-sized models."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import yaml

from lowlm.models.load import read_card, tokenizer_hash

from .conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_adapt", REPO / "scripts" / "bench_adapt.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_adapt_tiny_gives_every_arm_the_same_budget_and_a_complete_output(tmp_path):
    out = tmp_path / "bench"
    results = _bench().main(["--tiny", "--out", str(out), "--match", "both", "--threads", "1"])

    arms = results["arms"]
    assert set(arms) == {
        "plain",
        "merge-s2",
        "merge-s12",
        "merge-s2-chars",
        "merge-s12-chars",
    }
    plain = arms["plain"]
    for name in ("merge-s2", "merge-s12"):  # equal training FLOPs, the loop's own count
        assert arms[name]["training_flops"] == pytest.approx(plain["training_flops"], rel=0.02)
        assert arms[name]["chars_seen"] > 1.5 * plain["chars_seen"]  # shorter tokens: more text
    for name in ("merge-s2-chars", "merge-s12-chars"):
        assert arms[name]["chars_seen"] == pytest.approx(plain["chars_seen"], rel=0.02)
    assert arms["merge-s12"]["stages"]["pretrain-stage1"] > 0

    # The plain arm trains on the base with the base tokenizer, untouched.
    runs = out / "runs"
    assert not (runs / "plain" / "tokenizer").exists()
    base = out / "tiny-base"
    card = read_card(runs / "plain" / "pretrain-stage2")
    assert card["tokenizer_hash"] == tokenizer_hash(base)
    assert (
        card["tokenizer_hash"] != read_card(runs / "merge-s2" / "pretrain-stage2")["tokenizer_hash"]
    )
    # The learning rates measured best: LoRA at --lr everywhere, the new rows at their own.
    configs = {
        name: yaml.safe_load((out / "configs" / f"{name}.yaml").read_text()) for name in arms
    }
    assert {c["pretrain"]["stage2"]["lr"] for c in configs.values()} == {1e-3}
    assert "embedding_lr" not in configs["plain"]["pretrain"]["stage2"]
    assert configs["merge-s2"]["pretrain"]["stage2"]["embedding_lr"] == 3e-4
    # LoRA alone on the plain arm; the new rows beside it on the merge arms (lowlm's default).
    assert configs["plain"]["pretrain"]["stage2"]["train_embeddings"] == "none"
    assert configs["merge-s2"]["pretrain"]["stage2"]["train_embeddings"] == "new"
    assert plain["tokens_per_char"] == results["base_tokens_per_char"]
    assert arms["merge-s2"]["tokens_per_char"] < plain["tokens_per_char"]

    # The same held-out lines for every arm: the merge run's heldout.txt starts with them.
    heldout = (out / "heldout.txt").read_text(encoding="utf-8").splitlines()
    merged = (runs / "merge-s2" / "tokenizer" / "heldout.txt").read_text(encoding="utf-8")
    assert merged.splitlines()[: len(heldout)] == heldout == heldout[: results["heldout_lines"]]

    saved = json.loads((out / "bench-adapt.json").read_text(encoding="utf-8"))
    assert saved["arms"].keys() == arms.keys()
    for arm in saved["arms"].values():
        for key in ("heldout_bits_per_char", "tokens_per_char", "training_flops", "chars_seen"):
            assert math.isfinite(arm[key]) and arm[key] > 0
        assert arm["wall_seconds"] > 0
        assert {"heldout", "en"} <= arm["after"].keys()
        curve = arm["curve"]
        assert len(curve) >= 3 and curve[0]["flops"] == 0
        assert [p["flops"] for p in curve] == sorted(p["flops"] for p in curve)
        assert curve[-1]["flops"] == pytest.approx(arm["training_flops"])
        assert curve[-1]["heldout"] == pytest.approx(arm["after"]["heldout"], rel=1e-4)
    png = (out / "bench-adapt.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    # An interrupted bench is summarised from its run directories without training again.
    again = _bench().main(["--tiny", "--out", str(out), "--match", "both", "--reuse"])
    assert again["arms"] == json.loads(json.dumps(arms))
