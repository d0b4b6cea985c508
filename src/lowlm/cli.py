"""The `lowlm` command line: parse, load the config, call the stage. Nothing else lives here."""

from __future__ import annotations

import atexit
import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer vendors click
from typer.core import TyperGroup

from lowlm.cli_output import print_status, summarised, tokenizer_spinner
from lowlm.config import LowlmConfig, config_to_yaml, load_config
from lowlm.errors import LowlmError
from lowlm.processes import is_main_process


class _OneLineUsageErrors(TyperGroup):
    """click's usage errors (a missing argument, a bad option value) in lowlm's own form: one
    line starting "error:", exit 1, instead of a usage block ending in "Error:" and exit 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except ClickException as exc:
            where = f"`{exc.ctx.command_path} --help`" if getattr(exc, "ctx", None) else "--help"
            typer.secho(
                f"error: {exc.format_message().rstrip('.')}; {where} shows the usage.",
                fg=typer.colors.RED,
                err=True,
            )
            sys.exit(1)
        except typer.Abort:  # end of input where a prompt waited
            typer.secho("error: aborted (end of input).", fg=typer.colors.RED, err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    add_completion=False,
    no_args_is_help=True,
    # click's plain help: flags as `--force`, not typer's panels with `--force <bool>`
    rich_markup_mode=None,
    help="lowlm: a language model for a low-resource language on a modest budget.",
)


def _print_version(value: bool) -> None:
    if value:
        from lowlm import __version__

        typer.echo(f"lowlm {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """lowlm: a language model for a low-resource language on a modest budget."""


ConfigArg = Annotated[
    Path, typer.Argument(help="The run's YAML config.", show_default=False, metavar="CONFIG")
]
TargetArg = Annotated[
    Path,
    typer.Argument(
        help="The run's YAML config, or its run directory (which holds the recorded config).",
        show_default=False,
        metavar="CONFIG|RUN_DIR",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="SECTION.KEY=VALUE",
        help="Override a config value: section.key=value (repeatable).",
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rerun a stage that is already done.")]
ResumeOpt = Annotated[
    bool, typer.Option("--resume/--no-resume", help="Continue from the last checkpoint.")
]


def _load(config: Path, overrides: list[str] | None) -> LowlmConfig:
    return load_config(config, overrides or [])


def _load_target(target: Path, overrides: list[str] | None, command: str) -> LowlmConfig:
    """A config file or a run directory; a config that differs from the one its run recorded
    says so in one line on stderr."""
    from lowlm.recorded import load_target

    resolved, note = load_target(target, overrides or [], command)
    if note:
        typer.echo(note, err=True)
    return resolved


def _close_process_group() -> None:
    """Under several processes, destroy torch's process group before the interpreter exits: a
    gloo rank that leaves it alive can abort at exit ("terminate called without an active
    exception"), turning a finished run into a failed launch. Not accelerate's end_training,
    which also closes the trackers and is called per stage."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


atexit.register(_close_process_group)


def _fail(exc: LowlmError) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _interrupted(exc: KeyboardInterrupt) -> None:
    """Ctrl-C: where the stage stopped (the manifest records it as interrupted), exit 130."""
    # on a line of its own: a progress bar may be mid-line
    typer.secho("\n" + (str(exc) or "interrupted (Ctrl-C)."), fg=typer.colors.YELLOW, err=True)
    raise typer.Exit(130)


def _check_trackers(resolved: LowlmConfig) -> None:
    """A tracker named in run.report_to that is not installed stops before any stage runs."""
    if resolved.run.report_to:
        from lowlm.training.session import check_trackers

        check_trackers(resolved.run.report_to)


def _call(
    function, config: Path, overrides: list[str] | None, trackers: bool = False, **kwargs
) -> None:
    """Load the config and run a stage, then print the summary of what it finished; bad input
    becomes one line on stderr and exit 1. `trackers`: a training stage, whose run.report_to
    trackers are checked before it starts."""
    try:
        resolved = _load(config, overrides)
        if trackers:
            _check_trackers(resolved)
        with summarised(resolved):
            function(resolved, **kwargs)
    except LowlmError as exc:
        _fail(exc)
    except KeyboardInterrupt as exc:
        _interrupted(exc)


def _runner(name: str):
    """The function that runs stage `name` (the order and parents live in lowlm.graph)."""
    from importlib import import_module

    if name.startswith("pretrain-"):
        from lowlm.graph import PRETRAIN_BY_NAME
        from lowlm.stages import pretrain

        flag = PRETRAIN_BY_NAME[name].flag
        return lambda config, force: pretrain.run_stage(config, flag, force=force)
    return import_module(f"lowlm.stages.{name}").run


@app.command()
def validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Check a config without running anything; print it resolved."""
    try:
        resolved = _load(config, set_)
    except LowlmError as exc:
        _fail(exc)
    sys.stdout.write(config_to_yaml(resolved))
    typer.echo(f"{config}: valid.", err=True)


@app.command()
def prepare(config: ConfigArg, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Raw text in, a clean, deduplicated, decontaminated target-language corpus out."""
    _call(_runner("prepare"), config, set_, force=force)


@app.command()
def tokenize(config: ConfigArg, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Train a target-language tokenizer and merge it into the base vocabulary."""

    def run(resolved: LowlmConfig, force: bool) -> None:
        with tokenizer_spinner(resolved, force):
            _runner("tokenize")(resolved, force=force)

    _call(run, config, set_, force=force)


@app.command()
def resize(config: ConfigArg, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Append embedding rows for the merged tokenizer's new tokens to the base model."""
    _call(_runner("resize"), config, set_, force=force)


@app.command()
def init(config: ConfigArg, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Create a Llama model from scratch (init.size) for the run's tokenizer."""
    _call(_runner("init"), config, set_, force=force)


@app.command()
def pretrain(
    config: ConfigArg,
    set_: SetOpt = None,
    stage: Annotated[
        str | None, typer.Option("--stage", help="1, 2 or full (default: every stage with steps).")
    ] = None,
    resume: ResumeOpt = True,
    force: ForceOpt = False,
) -> None:
    """Pre-train: stage 1 (embeddings), stage 2 (LoRA + embeddings) or full; accelerate-aware."""
    _call(_runner("pretrain"), config, set_, trackers=True, stage=stage, force=force, resume=resume)


@app.command()
def export(
    config: ConfigArg,
    set_: SetOpt = None,
    source: Annotated[
        str | None, typer.Option("--source", help="Model folder to export (default: the newest).")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Merge LoRA into the weights and write a standalone HF model with its tokenizer."""
    _call(_runner("export"), config, set_, source=source, force=force)


def _tuning_command(name: str, summary: str) -> None:
    """Register `lowlm <name>` for a stage that tunes the run's model: sft, dpo and finetune
    take the same arguments."""

    def command(
        config: ConfigArg, set_: SetOpt = None, resume: ResumeOpt = True, force: ForceOpt = False
    ) -> None:
        _call(_runner(name), config, set_, trackers=True, force=force, resume=resume)

    app.command(name, help=summary)(command)


_tuning_command("sft", "Instruction-tune the run's model (or sft.model) with LoRA.")
_tuning_command(
    "dpo",
    "Preference-tune the run's sft model (or dpo.model) with DPO on {prompt, chosen, rejected}.",
)
_tuning_command(
    "finetune", "Fine-tune the run's model (or finetune.model) as a classifier on a labelled set."
)


ModelOpt = Annotated[
    str | None, typer.Option("--model", help="Model or adapter folder (default: the run's newest).")
]
TemplateOpt = Annotated[
    str | None,
    typer.Option("--template", help="Template (default: the one the model was tuned with)."),
]
RawOpt = Annotated[bool, typer.Option("--raw", help="Send prompts without a template.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate at most.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="Sampling temperature.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")]
GreedyOpt = Annotated[bool, typer.Option("--greedy", help="Always take the likeliest token.")]


def _generator(
    config,
    set_,
    model,
    template,
    raw,
    max_new_tokens,
    temperature,
    top_p,
    greedy,
    command="generate",
):
    from lowlm.stages.generate import Generator

    resolved = _load_target(config, set_, command)
    return Generator(resolved, model, template, raw, max_new_tokens, temperature, top_p, greedy)


@app.command()
def generate(
    config: TargetArg,
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable).")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="A file of prompts, one per line.")
    ] = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    template: TemplateOpt = None,
    raw: RawOpt = False,
    max_new_tokens: MaxNewOpt = 128,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 0.9,
    greedy: GreedyOpt = False,
) -> None:
    """Generate from prompts with any model or adapter of the run, streaming to stdout."""
    from lowlm.stages import generate as stage

    try:
        prompts = stage.read_prompts(prompt, file)
        generator = _generator(
            config, set_, model, template, raw, max_new_tokens, temperature, top_p, greedy
        )
        stage.generate(prompts, generator)
    except LowlmError as exc:
        _fail(exc)


@app.command()
def chat(
    config: TargetArg,
    set_: SetOpt = None,
    model: ModelOpt = None,
    template: TemplateOpt = None,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 0.9,
    greedy: GreedyOpt = False,
) -> None:
    """Talk with a model of the run; the conversation is kept (/reset, /exit)."""
    from lowlm.stages import generate as stage

    try:
        generator = _generator(
            config, set_, model, template, False, max_new_tokens, temperature, top_p, greedy, "chat"
        )
        stage.chat(generator)
    except LowlmError as exc:
        _fail(exc)


@app.command("eval")
def evaluate(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="The run's config, or with --compare two results.json (or run directories)."
        ),
    ],
    set_: SetOpt = None,
    force: ForceOpt = False,
    compare: Annotated[
        bool,
        typer.Option("--compare", help="Compare two results.json (or runs) side by side."),
    ] = False,
    checkpoints: Annotated[
        bool,
        typer.Option(
            "--checkpoints",
            help="Score every saved checkpoint of the newest pre-training stage (the report "
            "draws the curves).",
        ),
    ] = False,
) -> None:
    """Score the run's newest model (or eval.model) on MMLU, C-Eval, CMMLU, TMMLU+, mc, ppl."""
    from lowlm.stages import eval as stage

    try:
        if compare:
            from lowlm.recorded import results_file

            if len(paths) != 2:
                raise LowlmError("--compare takes two results.json files or run directories.")
            typer.echo(stage.compare(results_file(paths[0]), results_file(paths[1])), nl=False)
            return
        if len(paths) != 1:
            raise LowlmError("lowlm eval takes one config (or --compare A.json B.json).")
        resolved = _load(paths[0], set_)
        if checkpoints:
            stage.run_checkpoints(resolved)
            return
        with summarised(resolved):
            stage.run(resolved, force=force)
    except LowlmError as exc:
        _fail(exc)


@app.command("run")
def run_all(config: ConfigArg, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Run every stage the config asks for, in the graph's order, rebuilding what is stale.

    Stages done with the same inputs are skipped; a killed stage resumes."""
    from lowlm.graph import Graph
    from lowlm.report import write_report

    try:
        resolved = _load(config, set_)
        _check_trackers(resolved)
    except LowlmError as exc:
        _fail(exc)
    try:
        for name in Graph(resolved).enabled():
            spinner = (
                tokenizer_spinner(resolved, force)
                if name == "tokenize"
                else contextlib.nullcontext()
            )
            with summarised(resolved), spinner:
                _runner(name)(resolved, force=force)
    except LowlmError as exc:
        if is_main_process():
            with contextlib.suppress(Exception):  # the report shows the failed stage too
                write_report(resolved)
        _fail(exc)
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    if is_main_process():
        try:
            typer.echo(f"report: {write_report(resolved)}")
        except LowlmError as exc:
            _fail(exc)


@app.command()
def report(
    config: TargetArg,
    set_: SetOpt = None,
    baseline: Annotated[
        Path | None,
        typer.Option(
            "--baseline",
            help="A base model's eval/results.json to compare the eval table with, or a baseline "
            "run directory (e.g. runs/plain) to compare held-out curves and stages with.",
        ),
    ] = None,
) -> None:
    """Write <run>/report.html: every stage's status, time, figures and energy, the tokenizer,
    loss and eval charts, in one self-contained page; reads the run directory only."""
    import time

    from lowlm.report import write_report

    started = time.perf_counter()
    try:
        path = write_report(_load_target(config, set_, "report"), baseline)
    except LowlmError as exc:
        _fail(exc)
    typer.echo(f"report: {path} ({time.perf_counter() - started:.1f} s)")


@app.command()
def status(config: TargetArg, set_: SetOpt = None) -> None:
    """Show each stage as done, stale (and which input changed), running, interrupted, failed
    or not run."""
    from lowlm.graph import Graph

    try:
        graph = Graph(_load_target(config, set_, "status"))
        graph.manifest()  # a manifest it cannot read stops here, in one line
    except LowlmError as exc:
        _fail(exc)
    if print_status(graph):
        raise typer.Exit(1)  # a stage that cannot be checked: its reason is in its row


if __name__ == "__main__":
    app()
