"""What each stage reads, hashed: the config it reads and the files it reads outside the run.

Each function returns {label: hash}; the stage graph (lowlm.graph) keys a stage on them and
on its parents' keys, and `lowlm status` names the labels whose hash changed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from lowlm.config import LowlmConfig
from lowlm.data.heldout import HELDOUT_FILE
from lowlm.errors import LowlmError
from lowlm.rundir import content_id, sha256_text

# Training-section fields that change how a run is logged or saved, not what it computes.
_BOOKKEEPING = {
    "log_every",
    "save_every",
    "eval_every",
    "keep_checkpoints",
    "num_proc",
    "peak_tflops",
    "energy",
    "max_skipped_steps",  # only when to give up; a raised limit resumes the same run
    "eval_tasks",  # benchmark figures logged while training; the weights are the same
    # Speed and memory switches: the same computation up to rounding, so a run resumes
    # across them (e.g. gradient checkpointing turned on after an out-of-memory stop).
    "gradient_checkpointing",
    "compile",
    "liger_kernel",
    "attn_implementation",
}


def _section_hash(section, exclude: set[str] | None = None, include: set[str] | None = None) -> str:
    dumped = section.model_dump(exclude=exclude, include=include)
    return sha256_text(json.dumps(dumped, sort_keys=True, ensure_ascii=False))


# ----- the config each stage reads ------------------------------------------------------------


def prepare_config(c: LowlmConfig) -> dict:
    read = {
        "config.prepare": _section_hash(c.prepare, exclude={"executor"}),  # where it runs, not what
        "config.data": _section_hash(c.data, include={"heldout_fraction", "nfkc"}),
        "config.run.seed": str(c.run.seed),
    }
    if c.prepare.decontaminate.enabled:  # the eval questions it removes copies of
        tasks = [*c.eval.tasks, *c.pretrain.eval_tasks, *c.sft.eval_tasks]
        read["config.eval_tasks"] = sha256_text(
            json.dumps([t.model_dump() for t in tasks], sort_keys=True, ensure_ascii=False)
        )
    return read


def tokenize_config(c: LowlmConfig) -> dict:
    read = {
        "config.tokenize": _section_hash(c.tokenize),
        "config.data": _section_hash(c.data),
        "config.run.seed": str(c.run.seed),
    }
    if c.tokenize.merge:  # the base's tokenizer is read only to merge into it
        read["config.model"] = _section_hash(c.model, exclude={"dtype"} | _BOOKKEEPING)
    return read


def resize_config(c: LowlmConfig) -> dict:
    return {
        "config.resize": _section_hash(c.resize),
        "config.model": _section_hash(c.model, exclude=_BOOKKEEPING),
        "config.run.seed": str(c.run.seed),
    }


def init_config(c: LowlmConfig) -> dict:
    return {"config.init": _section_hash(c.init), "config.run.seed": str(c.run.seed)}


def pretrain_config(own: str, sub_sections: set[str]) -> Callable[[LowlmConfig], dict]:
    """A pre-training stage's reads: the shared pretrain fields, its own sub-section `own`
    (not its siblings'), the model, the data section and the seed."""

    def read(c: LowlmConfig) -> dict:
        return {
            "config.pretrain": _section_hash(c.pretrain, exclude=sub_sections | _BOOKKEEPING),
            f"config.pretrain.{own}": _section_hash(getattr(c.pretrain, own)),
            "config.model": _section_hash(c.model, exclude=_BOOKKEEPING),
            "config.data": _section_hash(c.data),
            "config.run.seed": str(c.run.seed),
        }

    return read


def export_config(c: LowlmConfig) -> dict:
    return {
        "config.export": _section_hash(c.export),
        "config.model": _section_hash(c.model, exclude={"base", "tokenizer"} | _BOOKKEEPING),
    }


def tuning_config(section: str, reads_data: bool = False) -> Callable[[LowlmConfig], dict]:
    """sft's, dpo's or finetune's reads: its section, the model and the seed; with `reads_data`
    (sft, which leaves the corpus's held-out documents out) the data section too."""

    def read(c: LowlmConfig) -> dict:
        read = {
            f"config.{section}": _section_hash(getattr(c, section), exclude=_BOOKKEEPING),
            "config.model": _section_hash(c.model, exclude=_BOOKKEEPING),
        }
        if reads_data:
            read["config.data"] = _section_hash(c.data)
        read["config.run.seed"] = str(c.run.seed)
        return read

    return read


def eval_config(c: LowlmConfig) -> dict:
    return {
        "config.eval": _section_hash(c.eval),
        "config.model": _section_hash(c.model, exclude=_BOOKKEEPING),
    }


# ----- what each stage reads from outside the run ---------------------------------------------


def _sources(label: str, patterns: list[str], field: str) -> dict[str, str]:
    from lowlm.data.corpus import resolve_sources, source_hashes

    sources = resolve_sources(patterns, field)
    return {f"{label}:{k}": v for k, v in source_hashes(sources).items()}


def _base_tokenizer_id(c: LowlmConfig) -> str:
    """The base tokenizer's content: its files only, not a whole model folder's weights."""
    spec = c.model.tokenizer or c.model.base
    path = Path(spec).expanduser()
    if path.is_dir():
        from lowlm.tokenization.base import HUB_PATTERNS

        files = {n: content_id(path / n) for n in HUB_PATTERNS if (path / n).is_file()}
        return sha256_text(json.dumps(files, sort_keys=True))
    return content_id(spec)


def prepare_files(c: LowlmConfig) -> dict:
    from lowlm.data.prepare.inputs import resolve_inputs

    files, datasets = resolve_inputs(c.prepare.inputs)
    read = {f"input:{path}": content_id(path) for path, _ in files}
    read.update({f"input:hf:{name}": sha256_text(name) for name in datasets})
    calibration, _ = (
        resolve_inputs(c.prepare.calibrate_from) if c.prepare.calibrate_from else ([], [])
    )
    read.update({f"calibrate_from:{path}": content_id(path) for path, _ in calibration})
    extra = [c.prepare.language_config, c.prepare.lid.model]
    if c.prepare.decontaminate.enabled:
        tasks = [*c.eval.tasks, *c.pretrain.eval_tasks, *c.sft.eval_tasks]
        extra += [t.path for t in tasks if t.name != "ppl"] + c.prepare.decontaminate.sft_test
    for path in extra:
        if path and Path(path).exists():
            read[f"file:{path}"] = content_id(path)
    return read


def tokenize_files(c: LowlmConfig) -> dict:
    files = _sources("corpus", c.tokenize.corpus, "tokenize.corpus") if c.tokenize.corpus else {}
    for label, path in c.tokenize.eval_texts.items():
        if not Path(path).is_file():
            raise LowlmError(f"tokenize.eval_texts.{label}: file '{path}' does not exist.")
        files[f"eval_texts.{label}:{path}"] = content_id(path)
    if c.model.tokenizer or c.model.base:  # merged into, or (merge: false) compared with
        role = "base_tokenizer" if c.tokenize.merge else "reference_tokenizer"
        files[f"{role}:{c.model.tokenizer or c.model.base}"] = _base_tokenizer_id(c)
    return files


def resize_files(c: LowlmConfig) -> dict:
    return {f"base:{c.model.base}": content_id(c.model.base)} if c.model.base else {}


def pretrain_files(c: LowlmConfig) -> dict:
    own = c.pretrain.corpus or c.tokenize.corpus
    if not own:
        return {}  # prepare's corpus, keyed through its parent
    return _sources("corpus", own, "pretrain.corpus" if c.pretrain.corpus else "tokenize.corpus")


def sft_files(c: LowlmConfig) -> dict:
    return _sources("data", c.sft.data, "sft.data") if c.sft.data else {}


def finetune_files(c: LowlmConfig) -> dict:
    files = _sources("train", [c.finetune.train], "finetune.train") if c.finetune.train else {}
    if c.finetune.test:
        files.update(_sources("test", [c.finetune.test], "finetune.test"))
    return files


def dpo_files(c: LowlmConfig) -> dict:
    return _sources("data", c.dpo.data, "dpo.data") if c.dpo.data else {}


def eval_files(c: LowlmConfig, tokenizer_folder: Path) -> dict:
    """The tasks' files (a heldout task's: the run's tokenizer_folder/heldout.txt) and, for
    harness tasks, their YAML, code and version."""
    files = {}
    for index, task in enumerate(c.eval.tasks):
        # the run's own held-out text: labelled by role, so a moved run stays current
        path = tokenizer_folder / HELDOUT_FILE if task.heldout else task.path
        if path and Path(path).exists():
            label = "heldout" if task.heldout else task.path
            files[f"eval.tasks[{index}]:{label}"] = content_id(path)
    if any(task.harness for task in c.eval.tasks):
        from lowlm.evaluation.harness import stage_inputs

        files.update(stage_inputs(c.eval))
    return files


def no_files(c: LowlmConfig) -> dict:
    return {}
