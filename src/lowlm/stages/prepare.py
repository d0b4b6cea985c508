"""`lowlm prepare`: raw, mixed-language text in, a clean target-language corpus out (datatrove).

Reads `prepare` (inputs, language, LID model, thresholds or calibration, dedup,
decontamination, PII, executor), the run's eval tasks (their questions are what it removes
copies of) and `data.heldout_fraction` (each kept document is marked held out or not by the
run's rule). Writes `corpus/`: the kept documents as parquet shards, `stats.json` (the funnel,
removals per reason, contamination per benchmark, the language-score histogram) and
`removed/` samples per reason. tokenize and pretrain read it when their corpus is not set.
The pipeline itself lives in lowlm.data.prepare; this is the recipe.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

from lowlm.config import LowlmConfig
from lowlm.errors import LowlmError
from lowlm.execute import StageRun, execute
from lowlm.graph import folder
from lowlm.rundir import atomic_dir, atomic_write_json, fingerprint

STAGE = "prepare"


def run(config: LowlmConfig, force: bool = False) -> dict:
    """Prepare the corpus; returns stats.json."""
    if importlib.util.find_spec("datatrove") is None:
        raise LowlmError(
            "lowlm prepare needs datatrove, which is not installed: pip install 'lowlm[prepare]'."
        )
    execute(config, STAGE, _work, force=force)
    return json.loads((folder(config, STAGE) / "stats.json").read_text(encoding="utf-8"))


def _work(run: StageRun) -> dict:
    from lowlm.data.prepare.build import resolve, run_pipeline
    from lowlm.data.prepare.pipeline import TaskFailed
    from lowlm.evaluation.tasks import question_texts

    config = run.config
    # datatrove's completion markers live here: named by the key and the executor's layout, a
    # rerun after a kill skips finished tasks, and changed inputs never meet old results.
    executor = config.prepare.executor.model_dump_json()
    work = run.run_dir.path / f".prepare-work-{fingerprint(run.key, executor)[:16]}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        resolved = resolve(config, work, question_texts)
        with atomic_dir(run.folder) as out:
            stats = run_pipeline(config, resolved, work, out, print)
            atomic_write_json(out / "stats.json", stats)
    except TaskFailed:
        raise  # its logs and finished tasks stay in `work`
    except LowlmError:
        shutil.rmtree(work, ignore_errors=True)  # bad input: nothing is left to resume
        raise
    shutil.rmtree(work, ignore_errors=True)
    kept, read = stats["kept"], stats["funnel"][0]
    print(
        f"prepare: kept {kept['documents']:,} of {read['documents']:,} documents "
        f"({kept['characters']:,} characters, {kept['heldout_documents']:,} held out) in "
        f"{kept['shards']} shards; wrote {run.folder}"
    )
    metrics = {
        "documents_read": read["documents"],
        "documents_kept": kept["documents"],
        "characters_kept": kept["characters"],
        "heldout_documents": kept["heldout_documents"],
        "contaminated": sum(stats["decontamination"].get("removed", {}).values()),
    }
    return {"metrics": metrics}
