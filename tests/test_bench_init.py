"""scripts/bench_init.py on test-sized models: every initialisation is scored, and the ones that
must equal the sub-word mean do."""

from __future__ import annotations

import importlib.util
import math

import pytest

from .conftest import DEMO, REPO, ZH_LINES


def _bench():
    spec = importlib.util.spec_from_file_location("bench_init", REPO / "scripts" / "bench_init.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_init_scores_every_initialisation_on_the_same_lines(tiny_base, sp_merged, tmp_path):
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n".join(ZH_LINES[-8:]) + "\n", encoding="utf-8")
    args = ["--base", str(tiny_base), "--tokenizer", str(sp_merged[2]), "--heldout", str(heldout)]
    args += ["--hidden-text", str(DEMO / "zh-tw.txt"), "--lines", "8"]
    module = _bench()
    results = module.main(args + module.DEFAULT_INITS)

    assert set(results) == {"base", *module.DEFAULT_INITS}
    assert all(math.isfinite(v) and v > 0 for v in results.values())
    # An untied head holding the same rows scores exactly as the tied model.
    assert results["untied-mean"] == pytest.approx(results["subword_mean"], rel=1e-5)
    assert results["hewitt:0.5"] != results["subword_mean"]
    assert results["first"] != results["subword_mean"] != results["mean"]
