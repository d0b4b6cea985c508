"""The one sequence every stage follows: key -> skip or resume -> record start -> work ->
record finish. A stage supplies only its work function; this module does the rest, the same
way for every stage, on one process or several.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lowlm.config import LowlmConfig
from lowlm.errors import LowlmError, StageInterrupted
from lowlm.graph import STAGES, Graph, Plan, folder
from lowlm.processes import launched_state
from lowlm.rundir import RunDir, recover_dir, signature


@dataclass
class StageRun:
    """What a stage's work function gets: where to write, what to start from, whether to resume."""

    config: LowlmConfig
    run_dir: RunDir
    plan: Plan
    folder: Path
    resume: bool
    started: float

    @property
    def key(self) -> str:
        return self.plan.key

    def parent_key(self) -> str | None:
        """The key of the model this stage starts from (a run stage's key, or its content)."""
        if self.plan.model_stage:
            return self.plan.inputs[f"parent:{self.plan.model_stage}"]
        return self.plan.inputs.get(f"model:{self.plan.model}")


def execute(
    config: LowlmConfig,
    name: str,
    work: Callable[[StageRun], dict],
    *,
    force: bool = False,
    resume: bool = True,
    say: Callable[[str], None] = print,
    override: str | None = None,
    accelerator=None,
) -> dict:
    """The one sequence every stage follows: key -> skip or resume -> record start -> work ->
    record finish. `work` writes its artifact atomically into `run.folder` and returns
    {"metrics": ..., and optionally "record": extra manifest fields}.

    Under several processes (accelerate launch, torchrun), a training stage passes its
    `accelerator` and every rank works; any other stage works on the main rank only while
    the others wait. Only the main rank writes the manifest; every rank reads it before the
    main one writes it (the same skip and resume decision everywhere) and none goes on to
    the next stage before the record is written."""
    is_main, barrier = _processes(accelerator)
    out = folder(config, name)
    if is_main:
        recover_dir(out)  # a kill between atomic_dir's two moves: put the old artifact back
    barrier()
    graph = Graph(config)
    plan = graph.plan(name, override)
    graph.require_parents(plan)
    state = graph.state(name, override)
    run_dir = graph.run_dir
    if state.status == "done" and not force:
        say(f"{name}: already done with these inputs in {out}; --force reruns it.")
        barrier()
        return state.record.get("metrics", {})
    if state.status == "running":
        raise LowlmError(
            f"{name} is already running ({state.reason}); wait for it, or stop it first."
        )
    record = graph.manifest().get(name) or {}
    resume = resume and not force and record.get("key") == plan.key
    barrier()  # every rank has read the manifest before the main one writes it
    started = time.time()
    metrics: dict = {}
    try:
        if is_main:
            run_dir.start(name, plan.inputs, plan.key, pid=os.getpid(), host=socket.gethostname())
        if is_main or accelerator is not None:
            result = work(StageRun(config, run_dir, plan, out, resume, started))
            metrics = result.get("metrics", {})
            if is_main:
                run_dir.finish(
                    name,
                    outputs={STAGES[name].folder: signature(out)},
                    metrics=metrics,
                    seconds=round(time.time() - started, 2),
                    **result.get("record", {}),
                )
    except LowlmError as exc:
        if is_main:
            run_dir.fail(name, str(exc))
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C: recorded as a kill would be, resumable
        reason = str(exc) or "interrupted (Ctrl-C); the next run starts it again."
        if is_main:
            with contextlib.suppress(Exception):
                run_dir.interrupt(name, reason)
        raise StageInterrupted(f"{name}: {reason}") from None
    except BaseException as exc:
        if is_main:
            with contextlib.suppress(Exception):
                run_dir.fail(name, f"{type(exc).__name__}: {exc}")
        raise
    barrier()  # no rank starts the next stage before this one is recorded
    if not is_main and accelerator is None:
        metrics = (RunDir(config).stage_record(name) or {}).get("metrics", {})
    return metrics


def _processes(accelerator) -> tuple[bool, Callable[[], None]]:
    """(main process?, barrier) of this run: the accelerator's, or accelerate's shared state
    when launched with several processes, else a single process."""
    if accelerator is not None:
        return accelerator.is_main_process, accelerator.wait_for_everyone
    state = launched_state()
    if state is not None:
        return state.is_main_process, state.wait_for_everyone
    return True, lambda: None
