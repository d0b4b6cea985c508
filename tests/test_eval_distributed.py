"""`lowlm eval` under `accelerate launch --multi_gpu --num_processes 2` (two gloo ranks on this
CPU): native tasks split their questions over the ranks and gather the scores, harness tasks
use the harness's own data-parallel path; either way the predictions are one process's."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lowlm.cli import app

from .conftest import DEMO, MC_QUESTIONS, write_harness_task

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mc_file(path: Path) -> Path:
    rows = [q for _ in range(4) for q in MC_QUESTIONS]  # 12 questions, an odd share per rank
    path.write_text(
        "".join(
            json.dumps(
                {"question": q[0], "A": q[1], "B": q[2], "C": q[3], "D": q[4], "answer": q[5]}
            )
            + "\n"
            for q in rows[:11]
        ),
        encoding="utf-8",
    )
    return path


def write(tmp_path: Path, name: str, tiny_base: Path, tasks: list[dict], include) -> Path:
    import yaml

    config = {
        "run": {"name": name, "root": str(tmp_path / "runs")},
        "eval": {
            "model": str(tiny_base),
            "batch_size": 2,
            "tasks": tasks,
            "harness_include": include,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("accelerate", path=str(BIN)) is None, reason="accelerate's launcher is absent"
)
@pytest.mark.skipif(
    0 < torch.cuda.device_count() < 2, reason="two ranks need two GPUs here (or none: gloo)"
)
def test_two_ranks_score_every_question_as_one_process_does(tmp_path, tiny_base):
    tasks: list[dict] = [
        {"name": "mc", "path": str(mc_file(tmp_path / "mc.jsonl"))},
        {"name": "ppl", "path": str(DEMO / "en.txt")},
    ]
    include = []
    if importlib.util.find_spec("lm_eval") is not None:  # the harness's own split too
        # first_n: the harness's random sampler is one stream consumed in question order, so
        # on two ranks it draws other examples than one process does (its own behaviour).
        write_harness_task(tmp_path / "tasks", fewshot_config={"sampler": "first_n"})
        tasks.append({"harness": "demo_mc", "shots": 1})
        include = [str(tmp_path / "tasks")]
    one = write(tmp_path, "one", tiny_base, tasks, include)
    two = write(tmp_path, "two", tiny_base, tasks, include)
    assert CliRunner().invoke(app, ["eval", str(one)]).exit_code == 0
    command = [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "lowlm.cli",
        "eval",
        str(two),
    ]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = {
        n: json.loads((tmp_path / "runs" / n / "eval" / "results.json").read_text())
        for n in ("one", "two")
    }
    assert results["two"]["execution"]["processes"] == 2
    assert results["one"]["execution"]["processes"] == 1
    for name in results["one"]["tasks"]:
        a, b = results["one"]["tasks"][name], results["two"]["tasks"][name]
        if name.startswith("ppl"):
            assert (b["chars"], b["tokens"]) == (a["chars"], a["tokens"])
            assert b["bits_per_char"] == pytest.approx(a["bits_per_char"], rel=1e-6)
            continue
        assert b["n"] == a["n"]
        samples = [
            [
                json.loads(x)
                for x in (tmp_path / "runs" / n / "eval" / f"samples-{name}.jsonl").open()
            ]
            for n in ("one", "two")
        ]
        key = lambda s: (s["subject"], s["index"])  # noqa: E731
        first, second = sorted(samples[0], key=key), sorted(samples[1], key=key)
        assert [key(s) for s in first] == [key(s) for s in second]
        assert [s["prediction"] for s in first] == [s["prediction"] for s in second]
        for x, y in zip(first, second, strict=True):
            assert y["scores"] == pytest.approx(x["scores"], abs=1e-4)
        if name.startswith("mc"):
            assert b["acc"] == a["acc"]
        else:
            assert b["metrics"]["acc"]["value"] == a["metrics"]["acc"]["value"]
            assert (a["processes"], b["processes"]) == (1, 2)
