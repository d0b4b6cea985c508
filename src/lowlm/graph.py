"""The stage graph: every stage declared once, and everything derived from that declaration.

Each stage names its folder in the run directory, the command that builds it, the config it
reads and the files outside the run it reads (both hashed by `lowlm.stage_inputs`), and its
parents (the run stages it reads). From this one table come: the order `lowlm run` follows,
the model a stage starts from, the model `generate` / `chat` / `eval` use by default,
`lowlm status`, and every stage's key.

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

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lowlm import stage_inputs as reads
from lowlm.config import LowlmConfig
from lowlm.errors import LowlmError
from lowlm.rundir import RunDir, content_id, fingerprint, signature


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


def prepared_corpus(c: LowlmConfig) -> list[str]:
    """The kept documents `prepare` writes: the corpus tokenize and pretrain read by default."""
    return [str(c.run_dir / STAGES["prepare"].folder / "*.parquet")]


def corpus_patterns(c: LowlmConfig, reader: str) -> list[str]:
    """The corpus `reader` (tokenize or pretrain) reads: its own setting, pretrain's else
    tokenize's, else the prepared corpus when the config prepares one."""
    own = c.pretrain.corpus if reader == "pretrain" else []
    return own or c.tokenize.corpus or (prepared_corpus(c) if c.prepare.inputs else [])


# ----- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    name: str
    folder: str  # its artifact inside the run directory
    command: str  # the command that builds it
    enabled: Callable[[LowlmConfig], bool]  # part of `lowlm run` with this config
    config: Callable[[LowlmConfig], dict]  # the config it reads, hashed
    files: Callable[[LowlmConfig], dict] = reads.no_files  # what it reads outside the run, hashed
    needs: tuple[str, ...] = ()  # run stages it reads whenever they are enabled
    corpus_reader: str | None = None  # tokenize / pretrain: reads prepare's corpus by default
    models_from: tuple[str, ...] = ()  # its model: the first enabled of these...
    base_fallback: bool = False  # ...else model.base
    override: Callable[[LowlmConfig], str | None] = lambda c: None  # a model named in config
    section: str | None = None  # a training stage's config section (its loop settings)


_MODELS = ("pretrain-full", "pretrain-stage2", "pretrain-stage1", "resize", "init")


def _pretrain_stage(index: int) -> Stage:
    """Pre-training stage `index`: its model is the newest enabled earlier pre-training stage's,
    else the resized or initialised one, else (stages 2 and full only) model.base."""
    sub = PRETRAIN_STAGES[index]
    earlier = tuple(s.name for s in reversed(PRETRAIN_STAGES[:index]))
    return Stage(
        sub.name,
        sub.name,
        f"lowlm pretrain --stage {sub.flag}",
        lambda c: getattr(c.pretrain, sub.section).steps > 0,
        reads.pretrain_config(sub.section, {s.section for s in PRETRAIN_STAGES}),
        reads.pretrain_files,
        needs=("tokenize",),
        corpus_reader="pretrain",
        models_from=(*earlier, "resize", "init"),
        base_fallback=index > 0,
        section="pretrain",
    )


def _tuning_stage(
    name: str,
    enabled: Callable[[LowlmConfig], bool],
    files: Callable[[LowlmConfig], dict],
    after: tuple[str, ...] = (),
    needs: tuple[str, ...] = (),
    reads_data: bool = False,
) -> Stage:
    """sft, dpo or finetune: tunes `<name>.model` if set, else the first enabled of `after`,
    export and the pre-trained models, else model.base; `reads_data`: its key includes the data
    section too."""
    return Stage(
        name,
        name,
        f"lowlm {name}",
        enabled,
        reads.tuning_config(name, reads_data),
        files,
        needs=needs,
        models_from=(*after, "export", *_MODELS),
        base_fallback=True,
        override=lambda c: getattr(c, name).model,
        section=name,
    )


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "prepare",
            "corpus",
            "lowlm prepare",
            lambda c: bool(c.prepare.inputs),
            reads.prepare_config,
            reads.prepare_files,
        ),
        Stage(
            "tokenize",
            "tokenizer",
            "lowlm tokenize",
            lambda c: bool(c.tokenize.corpus or c.prepare.inputs),
            reads.tokenize_config,
            reads.tokenize_files,
            corpus_reader="tokenize",
        ),
        Stage(
            "init",
            "model-init",
            "lowlm init",
            lambda c: bool(c.init.size),
            reads.init_config,
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
            reads.resize_config,
            reads.resize_files,
            needs=("tokenize",),
        ),
        *(_pretrain_stage(index) for index in range(len(PRETRAIN_STAGES))),
        Stage(
            "export",
            "export",
            "lowlm export",
            lambda c: any(getattr(c.pretrain, s.section).steps > 0 for s in PRETRAIN_STAGES),
            reads.export_config,
            needs=("tokenize",),
            models_from=_MODELS,
        ),
        _tuning_stage(
            "sft", lambda c: bool(c.sft.data), reads.sft_files, needs=("tokenize",), reads_data=True
        ),
        _tuning_stage("dpo", lambda c: bool(c.dpo.data), reads.dpo_files, after=("sft",)),
        _tuning_stage("finetune", lambda c: bool(c.finetune.train), reads.finetune_files),
        Stage(
            "eval",
            "eval",
            "lowlm eval",
            lambda c: bool(c.eval.tasks),
            reads.eval_config,
            lambda c: reads.eval_files(c, folder(c, "tokenize")),
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
