"""The stage graph: every stage declared once, and everything derived from that declaration.

Each stage names its folder in the run directory, the command that builds it, the config it
reads, the files outside the run it reads, and its parents (the run stages it reads). From
this one table come: the order `lowlm run` follows, the model a stage starts from, the
model `generate` / `chat` / `eval` use by default, `lowlm status`, and every stage's key.

A stage's key is a hash of its inputs: the config sections it reads, the content of every
file it reads, and its parents' keys (a Merkle chain, as Nix, Bazel or DVC build them), so a
change anywhere upstream changes the key of every stage below. "Done" means: the manifest
records the stage done with exactly this key and its output is untouched since. Large inputs
are hashed once and remembered by (path, size, mtime, inode), as git's index does.

Held out: the documents `lowlm.data.heldout` sets aside are excluded from every training
stage (tokenizer training, pretrain 1/2/full, sft), so every figure called held-out is
measured on text no stage trained on.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lowlm.config import LowlmConfig
from lowlm.data.heldout import HELDOUT_FILE
from lowlm.errors import LowlmError
from lowlm.rundir import RunDir, content_id, fingerprint, sha256_text, signature

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


@dataclass(frozen=True)
class PretrainStage:
    """One pre-training stage, declared once: the value of `lowlm pretrain --stage`, its name
    in the graph (and folder), its section under `pretrain:` and what it writes."""

    flag: str
    name: str
    section: str
    writes: str


PRETRAIN_STAGES = (
    PretrainStage("1", "pretrain-stage1", "stage1", "embeddings"),
    PretrainStage("2", "pretrain-stage2", "stage2", "adapter"),
    PretrainStage("full", "pretrain-full", "full", "model"),
)
PRETRAIN_BY_FLAG = {s.flag: s for s in PRETRAIN_STAGES}
PRETRAIN_BY_NAME = {s.name: s for s in PRETRAIN_STAGES}


def _section_hash(section, exclude: set[str] | None = None, include: set[str] | None = None) -> str:
    dumped = section.model_dump(exclude=exclude, include=include)
    return sha256_text(json.dumps(dumped, sort_keys=True, ensure_ascii=False))


# ----- what each stage reads from the config --------------------------------------------------


def _prepare_config(c: LowlmConfig) -> dict:
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


def _tokenize_config(c: LowlmConfig) -> dict:
    read = {
        "config.tokenize": _section_hash(c.tokenize),
        "config.data": _section_hash(c.data),
        "config.run.seed": str(c.run.seed),
    }
    if c.tokenize.merge:  # the base's tokenizer is read only to merge into it
        read["config.model"] = _section_hash(c.model, exclude={"dtype"} | _BOOKKEEPING)
    return read


def _resize_config(c: LowlmConfig) -> dict:
    return {
        "config.resize": _section_hash(c.resize),
        "config.model": _section_hash(c.model, exclude=_BOOKKEEPING),
        "config.run.seed": str(c.run.seed),
    }


def _init_config(c: LowlmConfig) -> dict:
    return {"config.init": _section_hash(c.init), "config.run.seed": str(c.run.seed)}


def _pretrain_config(name: str) -> Callable[[LowlmConfig], dict]:
    own = PRETRAIN_BY_NAME[name].section

    def read(c: LowlmConfig) -> dict:
        return {
            "config.pretrain": _section_hash(
                c.pretrain, exclude={s.section for s in PRETRAIN_STAGES} | _BOOKKEEPING
            ),
            f"config.pretrain.{own}": _section_hash(getattr(c.pretrain, own)),
            "config.model": _section_hash(c.model, exclude=_BOOKKEEPING),
            "config.data": _section_hash(c.data),
            "config.run.seed": str(c.run.seed),
        }

    return read


def _export_config(c: LowlmConfig) -> dict:
    return {
        "config.export": _section_hash(c.export),
        "config.model": _section_hash(c.model, exclude={"base", "tokenizer"} | _BOOKKEEPING),
    }


def _sft_config(c: LowlmConfig) -> dict:
    return {
        "config.sft": _section_hash(c.sft, exclude=_BOOKKEEPING),
        "config.model": _section_hash(c.model, exclude=_BOOKKEEPING),
        "config.data": _section_hash(c.data),
        "config.run.seed": str(c.run.seed),
    }


def _finetune_config(c: LowlmConfig) -> dict:
    return {
        "config.finetune": _section_hash(c.finetune, exclude=_BOOKKEEPING),
        "config.model": _section_hash(c.model, exclude=_BOOKKEEPING),
        "config.run.seed": str(c.run.seed),
    }


def _dpo_config(c: LowlmConfig) -> dict:
    return {
        "config.dpo": _section_hash(c.dpo, exclude=_BOOKKEEPING),
        "config.model": _section_hash(c.model, exclude=_BOOKKEEPING),
        "config.run.seed": str(c.run.seed),
    }


def _eval_config(c: LowlmConfig) -> dict:
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


def prepared_corpus(c: LowlmConfig) -> list[str]:
    """The kept documents `prepare` writes: the corpus tokenize and pretrain read by default."""
    return [str(c.run_dir / STAGES["prepare"].folder / "*.parquet")]


def corpus_patterns(c: LowlmConfig, reader: str) -> list[str]:
    """The corpus `reader` (tokenize or pretrain) reads: its own setting, pretrain's else
    tokenize's, else the prepared corpus when the config prepares one."""
    own = c.pretrain.corpus if reader == "pretrain" else []
    return own or c.tokenize.corpus or (prepared_corpus(c) if c.prepare.inputs else [])


def _prepare_files(c: LowlmConfig) -> dict:
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


def _tokenize_files(c: LowlmConfig) -> dict:
    files = _sources("corpus", c.tokenize.corpus, "tokenize.corpus") if c.tokenize.corpus else {}
    for label, path in c.tokenize.eval_texts.items():
        if not Path(path).is_file():
            raise LowlmError(f"tokenize.eval_texts.{label}: file '{path}' does not exist.")
        files[f"eval_texts.{label}:{path}"] = content_id(path)
    if c.model.tokenizer or c.model.base:  # merged into, or (merge: false) compared with
        role = "base_tokenizer" if c.tokenize.merge else "reference_tokenizer"
        files[f"{role}:{c.model.tokenizer or c.model.base}"] = _base_tokenizer_id(c)
    return files


def _pretrain_files(c: LowlmConfig) -> dict:
    own = c.pretrain.corpus or c.tokenize.corpus
    if not own:
        return {}  # prepare's corpus, keyed through its parent
    return _sources("corpus", own, "pretrain.corpus" if c.pretrain.corpus else "tokenize.corpus")


def _sft_files(c: LowlmConfig) -> dict:
    return _sources("data", c.sft.data, "sft.data") if c.sft.data else {}


def _finetune_files(c: LowlmConfig) -> dict:
    files = _sources("train", [c.finetune.train], "finetune.train") if c.finetune.train else {}
    if c.finetune.test:
        files.update(_sources("test", [c.finetune.test], "finetune.test"))
    return files


def _dpo_files(c: LowlmConfig) -> dict:
    return _sources("data", c.dpo.data, "dpo.data") if c.dpo.data else {}


def _eval_files(c: LowlmConfig) -> dict:
    files = {}
    for index, task in enumerate(c.eval.tasks):
        # the run's own held-out text: labelled by role, so a moved run stays current
        path = folder(c, "tokenize") / HELDOUT_FILE if task.heldout else task.path
        if path and Path(path).exists():
            label = "heldout" if task.heldout else task.path
            files[f"eval.tasks[{index}]:{label}"] = content_id(path)
    if any(task.harness for task in c.eval.tasks):  # their YAML and code, and the version
        from lowlm.evaluation.harness import stage_inputs

        files.update(stage_inputs(c.eval))
    return files


def _no_files(c: LowlmConfig) -> dict:
    return {}


# ----- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    name: str
    folder: str  # its artifact inside the run directory
    command: str  # the command that builds it
    enabled: Callable[[LowlmConfig], bool]  # part of `lowlm run` with this config
    config: Callable[[LowlmConfig], dict]  # the config it reads, hashed
    files: Callable[[LowlmConfig], dict] = _no_files  # what it reads outside the run, hashed
    needs: tuple[str, ...] = ()  # run stages it reads whenever they are enabled
    corpus_reader: str | None = None  # tokenize / pretrain: reads prepare's corpus by default
    models_from: tuple[str, ...] = ()  # its model: the first enabled of these...
    base_fallback: bool = False  # ...else model.base
    override: Callable[[LowlmConfig], str | None] = lambda c: None  # a model named in config
    section: str | None = None  # a training stage's config section (its loop settings)


def _pretrain_enabled(name: str) -> Callable[[LowlmConfig], bool]:
    return lambda c: getattr(c.pretrain, PRETRAIN_BY_NAME[name].section).steps > 0


_MODELS = ("pretrain-full", "pretrain-stage2", "pretrain-stage1", "resize", "init")

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "prepare",
            "corpus",
            "lowlm prepare",
            lambda c: bool(c.prepare.inputs),
            _prepare_config,
            _prepare_files,
        ),
        Stage(
            "tokenize",
            "tokenizer",
            "lowlm tokenize",
            lambda c: bool(c.tokenize.corpus or c.prepare.inputs),
            _tokenize_config,
            _tokenize_files,
            corpus_reader="tokenize",
        ),
        Stage(
            "init",
            "model-init",
            "lowlm init",
            lambda c: bool(c.init.size),
            _init_config,
            needs=("tokenize",),
        ),
        Stage(
            "resize",
            "model-resized",
            "lowlm resize",
            lambda c: (
                not c.init.size
                and bool(
                    c.model.base and c.tokenize.merge and (c.tokenize.corpus or c.prepare.inputs)
                )
            ),
            _resize_config,
            lambda c: {f"base:{c.model.base}": content_id(c.model.base)} if c.model.base else {},
            needs=("tokenize",),
        ),
        Stage(
            "pretrain-stage1",
            "pretrain-stage1",
            "lowlm pretrain --stage 1",
            _pretrain_enabled("pretrain-stage1"),
            _pretrain_config("pretrain-stage1"),
            _pretrain_files,
            needs=("tokenize",),
            corpus_reader="pretrain",
            models_from=("resize", "init"),
            section="pretrain",
        ),
        Stage(
            "pretrain-stage2",
            "pretrain-stage2",
            "lowlm pretrain --stage 2",
            _pretrain_enabled("pretrain-stage2"),
            _pretrain_config("pretrain-stage2"),
            _pretrain_files,
            needs=("tokenize",),
            corpus_reader="pretrain",
            models_from=("pretrain-stage1", "resize", "init"),
            base_fallback=True,
            section="pretrain",
        ),
        Stage(
            "pretrain-full",
            "pretrain-full",
            "lowlm pretrain --stage full",
            _pretrain_enabled("pretrain-full"),
            _pretrain_config("pretrain-full"),
            _pretrain_files,
            needs=("tokenize",),
            corpus_reader="pretrain",
            models_from=("pretrain-stage2", "pretrain-stage1", "resize", "init"),
            base_fallback=True,
            section="pretrain",
        ),
        Stage(
            "export",
            "export",
            "lowlm export",
            lambda c: any(getattr(c.pretrain, s.section).steps > 0 for s in PRETRAIN_STAGES),
            _export_config,
            needs=("tokenize",),
            models_from=_MODELS,
        ),
        Stage(
            "sft",
            "sft",
            "lowlm sft",
            lambda c: bool(c.sft.data),
            _sft_config,
            _sft_files,
            needs=("tokenize",),
            models_from=("export", *_MODELS),
            base_fallback=True,
            override=lambda c: c.sft.model,
            section="sft",
        ),
        Stage(
            "dpo",
            "dpo",
            "lowlm dpo",
            lambda c: bool(c.dpo.data),
            _dpo_config,
            _dpo_files,
            models_from=("sft", "export", *_MODELS),
            base_fallback=True,
            override=lambda c: c.dpo.model,
            section="dpo",
        ),
        Stage(
            "finetune",
            "finetune",
            "lowlm finetune",
            lambda c: bool(c.finetune.train),
            _finetune_config,
            _finetune_files,
            models_from=("export", *_MODELS),
            base_fallback=True,
            override=lambda c: c.finetune.model,
            section="finetune",
        ),
        Stage(
            "eval",
            "eval",
            "lowlm eval",
            lambda c: bool(c.eval.tasks),
            _eval_config,
            _eval_files,
            models_from=("dpo", "sft", "export", *_MODELS),
            base_fallback=True,
            override=lambda c: c.eval.model,
        ),
    )
}
ORDER = list(STAGES)
# Stages whose folder is a model (or adapter / embeddings) that generate and eval can load.
MODEL_STAGES = ("dpo", "sft", "export", *_MODELS)
INFERENCE = "eval"  # generate and chat use the model eval would use


def folder(config: LowlmConfig, name: str) -> Path:
    return config.run_dir / STAGES[name].folder


def tokenizer_folder(config: LowlmConfig) -> Path | None:
    """The run's tokenizer folder when this config builds one; None otherwise, so that a
    folder left by an earlier config is never read as if it were current."""
    return folder(config, "tokenize") if STAGES["tokenize"].enabled(config) else None


# ----- keys and states ------------------------------------------------------------------------


@dataclass
class Plan:
    """What a stage would read now: its inputs (label -> hash), key, parents, model."""

    name: str
    inputs: dict[str, str]
    key: str
    parents: list[str]
    model: str | None = None  # the path or id of the model it starts from
    model_stage: str | None = None  # the run stage that model comes from, if any


@dataclass
class State:
    name: str
    status: str  # done | stale | running | interrupted | failed | not run | error
    reason: str = ""
    plan: Plan | None = None
    record: dict = field(default_factory=dict)


class Graph:
    """Keys and states of one config's stages (each computed once per Graph)."""

    def __init__(self, config: LowlmConfig):
        self.config = config
        self.run_dir = RunDir(config)
        self._plans: dict[tuple, Plan] = {}
        self._states: dict[tuple, State] = {}
        self._manifest: dict | None = None

    def enabled(self) -> list[str]:
        return [name for name in ORDER if STAGES[name].enabled(self.config)]

    def manifest(self) -> dict:
        if self._manifest is None:
            self._manifest = self.run_dir.read_manifest()["stages"]
        return self._manifest

    def model_source(self, name: str, override: str | None = None) -> tuple[str | None, str | None]:
        """(run stage, path) of the model `name` starts from; (None, path or id) outside the run."""
        stage = STAGES[name]
        chosen = override or stage.override(self.config)
        if chosen:
            resolved = Path(chosen).expanduser().resolve()
            for candidate in MODEL_STAGES:  # a folder of this run is that stage, checked as one
                if candidate != name and resolved == folder(self.config, candidate).resolve():
                    return candidate, str(folder(self.config, candidate))
            return None, str(chosen)
        for candidate in stage.models_from:
            if STAGES[candidate].enabled(self.config):
                return candidate, str(folder(self.config, candidate))
        if stage.base_fallback and self.config.model.base:
            return None, self.config.model.base
        return None, None

    def plan(self, name: str, override: str | None = None) -> Plan:
        cache_key = (name, override)
        if cache_key in self._plans:
            return self._plans[cache_key]
        stage = STAGES[name]
        inputs = dict(stage.config(self.config))
        inputs.update(stage.files(self.config))
        parents = [n for n in stage.needs if STAGES[n].enabled(self.config)]
        if stage.corpus_reader and STAGES["prepare"].enabled(self.config):
            if corpus_patterns(self.config, stage.corpus_reader) == prepared_corpus(self.config):
                parents.insert(0, "prepare")
        model_stage, model = (None, None)
        if stage.models_from or stage.override(self.config) or override:
            model_stage, model = self.model_source(name, override)
            if model_stage is not None:
                parents.append(model_stage)
            elif model is not None:
                inputs[f"model:{model}"] = content_id(model)
        for parent in parents:
            inputs[f"parent:{parent}"] = self.parent_id(parent)
        plan = Plan(name, inputs, fingerprint(name, inputs), parents, model, model_stage)
        self._plans[cache_key] = plan
        return plan

    def parent_id(self, parent: str) -> str:
        """What a child's key records of a parent: the parent's key and the stamp of the output
        it recorded, so a rebuild (even a forced one with the same inputs) is a new parent."""
        record = self.manifest().get(parent) or {}
        stamp = (record.get("outputs") or {}).get(STAGES[parent].folder, "")
        return fingerprint(self.plan(parent).key, stamp)

    def state(self, name: str, override: str | None = None) -> State:
        if (name, override) in self._states:
            return self._states[(name, override)]
        record = self.manifest().get(name) or {}
        try:
            plan = self.plan(name, override)
        except LowlmError as exc:
            state = State(name, "error", str(exc), None, record)
            self._states[(name, override)] = state
            return state
        state = State(name, "not run", "", plan, record)
        status = record.get("status")
        if status == "running":
            state.status, state.reason = _running(record)
        elif status == "failed":
            state.status, state.reason = "failed", record.get("error", "")
        elif status == "interrupted":
            state.status, state.reason = "interrupted", record.get("reason", "")
        elif status == "done":
            changed = _changed(record.get("inputs", {}), plan.inputs)
            if record.get("key") != plan.key:
                state.status, state.reason = (
                    "stale",
                    "changed: " + (", ".join(changed) or "the stage's definition"),
                )
            else:
                touched = [
                    out
                    for out, stamp in record.get("outputs", {}).items()
                    if not (self.run_dir.path / out).exists()
                    or signature(self.run_dir.path / out) != stamp
                ]
                if touched:
                    state.status = "stale"
                    state.reason = "output changed or missing since it was written: " + ", ".join(
                        touched
                    )
                else:
                    state.status = "done"
        self._states[(name, override)] = state
        return state

    def require_parents(self, plan: Plan, reader: str | None = None) -> None:
        """Refuse to build on a parent that is not done with its current inputs."""
        for parent in plan.parents:
            state = self.state(parent)
            if state.status == "done":
                continue
            what = {
                "not run": "has not run",
                "stale": f"is stale ({state.reason})",
                "running": "is still running",
                "interrupted": "was interrupted",
                "failed": "failed",
                "error": f"cannot be checked ({state.reason})",
            }[state.status]
            raise LowlmError(
                f"{reader or plan.name} reads {parent}, which {what}; run "
                f"`{STAGES[parent].command} CONFIG` first, or `lowlm run CONFIG` to rebuild what "
                "is needed."
            )


def _changed(recorded: dict, current: dict) -> list[str]:
    labels = sorted(set(recorded) | set(current))
    return [label for label in labels if recorded.get(label) != current.get(label)]


def _running(record: dict) -> tuple[str, str]:
    pid, host = record.get("pid"), record.get("host")
    if host and host != socket.gethostname():
        return "running", f"on {host}"
    if pid:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return "interrupted", f"process {pid} is gone; the next run resumes"
        except PermissionError:
            pass
    return "running", f"process {pid}" if pid else ""


def current_model(config: LowlmConfig, model: str | None = None, reader: str = "generate") -> str:
    """The model generate and chat use: --model, else the one eval would score; refused when
    it is a run stage that is not done with its current inputs."""
    graph = Graph(config)
    model_stage, source = graph.model_source(INFERENCE, model)
    if model_stage is not None:
        graph.require_parents(Plan(INFERENCE, {}, "", [model_stage]), reader)
    if not source:
        raise LowlmError(
            "there is no model to use; pass --model, set model.base, or configure and run a stage."
        )
    return source
