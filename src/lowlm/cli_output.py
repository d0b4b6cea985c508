"""What the CLI prints around the stages: the summary of each stage a command finished, the
tokenizer's spinner, and the table of `lowlm status`."""

from __future__ import annotations

import contextlib
import json
import sys

import typer

from lowlm.config import LowlmConfig
from lowlm.graph import ORDER, Graph
from lowlm.processes import is_main_process


def _finished(resolved: LowlmConfig) -> dict[str, str | None]:
    from lowlm.rundir import RunDir

    stages = RunDir(resolved).read_manifest()["stages"]
    return {name: (record or {}).get("finished") for name, record in stages.items()}


@contextlib.contextmanager
def summarised(resolved: LowlmConfig):
    """After the body: the short summary table of every stage it finished (main process)."""
    before = _finished(resolved)
    yield
    if not is_main_process():
        return
    from lowlm.report import stage_summary

    after = _finished(resolved)
    for name in ORDER:
        if after.get(name) and after.get(name) != before.get(name):
            typer.echo(stage_summary(resolved, name))


@contextlib.contextmanager
def tokenizer_spinner(resolved: LowlmConfig, force: bool):
    """Tokenizer training is one SentencePiece call with no progress to report: say so, with a
    spinner and the time elapsed on a terminal, unless the stage will be skipped."""
    if not is_main_process() or (not force and Graph(resolved).state("tokenize").status == "done"):
        yield
        return
    message = "tokenize: reading the corpus, training and merging the tokenizer"
    if not sys.stderr.isatty():
        typer.echo(f"{message} (one SentencePiece call: no progress bar)...", err=True)
        yield
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn(message),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        progress.add_task(message, total=None)
        yield


def print_status(graph: Graph) -> bool:
    """`lowlm status`: a row per stage the config enables or the manifest records (its status,
    when it finished, its figures or the reason it is not done), then the report's path.
    True when a stage cannot be checked."""
    recorded = graph.manifest()
    names = [n for n in ORDER if n in graph.enabled() or n in recorded]
    if not names:
        typer.echo(f"{graph.run_dir.path}: no stage is configured or has run.")
        return False

    def short(value):
        return float(f"{value:.4g}") if isinstance(value, float) else value

    typer.echo(f"{'stage':<17}{'status':<13}{'finished':<26}details")
    for name in names:
        state = graph.state(name)
        record = state.record
        if state.status == "done":
            detail = json.dumps(
                {k: short(v) for k, v in (record.get("metrics") or {}).items()},
                ensure_ascii=False,
            )
        else:
            detail = state.reason
        if name not in graph.enabled():
            detail = f"(not in this config) {detail}"
        typer.echo(
            f"{name:<17}{state.status:<13}{record.get('finished', '') if record else '':<26}"
            f"{detail}"
        )
    from lowlm.report import REPORT_FILE

    page = graph.run_dir.path / REPORT_FILE
    if page.is_file():
        typer.echo(f"report: {page} (`lowlm report` rewrites it)")
    return any(graph.state(name).status == "error" for name in names)
