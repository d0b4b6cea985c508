"""The config's eval sections: a task (native or lm-evaluation-harness) and the `eval` stage.

Their own module because the training sections name eval tasks too (eval during training).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lowlm.config_types import PathText, Section


class McFields(Section):
    question: str = Field("question", description="mc: the question field / column.")
    choices: list[str] = Field(
        default_factory=lambda: ["A", "B", "C", "D"], description="mc: the option fields."
    )
    answer: str = Field("answer", description="mc: the gold field (a letter or a 0-based index).")
    subject: str | None = Field(None, description="mc: an optional subject field.")


class EvalTask(Section):
    name: Literal["mmlu", "ceval", "cmmlu", "tmmluplus", "mc", "ppl"] | None = Field(
        None, description="A native task (or give `harness` instead)."
    )
    harness: str | None = Field(
        None,
        description="An lm-evaluation-harness task or group, run in-process on the loaded model "
        "(needs the `lowlm[harness]` extra); takes shots, limit and chat_template.",
    )
    path: PathText | None = Field(
        None,
        description="A benchmark's local release folder (omit: its Hugging Face dataset); mc "
        "and ppl: a file.",
    )
    heldout: bool = Field(
        False,
        description="ppl: score the run's own held-out text (tokenizer/heldout.txt, which no "
        "stage trains on) instead of a path.",
    )
    split: str | None = Field(None, description="Evaluated split (default: the task's).")
    fewshot_split: str | None = Field(None, description="Few-shot split (default: the task's).")
    shots: int = Field(
        0, ge=0, description="Few-shot examples, first n of the split (native tasks: at most 5)."
    )
    subjects: list[str] | None = Field(None, description="Only these subjects (default: all).")
    limit: int | None = Field(None, ge=1, description="At most this many questions a subject.")
    chat_template: bool = Field(
        False, description="Wrap each prompt in the tokenizer's chat template."
    )
    fields: McFields = Field(default_factory=McFields)
    description: str = Field("", description="mc: text before the questions.")
    answer_cue: str = Field("Answer:", description="mc: the line that ends each question.")

    @model_validator(mode="after")
    def _one_kind(self) -> EvalTask:
        if (self.name is None) == (self.harness is None):
            raise ValueError("give a task either `name` (native) or `harness`, exactly one")
        if self.harness is not None:
            native_only = [k for k in _NATIVE_ONLY if k in self.model_fields_set]
            if native_only:
                verb = "applies" if len(native_only) == 1 else "apply"
                raise ValueError(
                    f"{', '.join(native_only)} {verb} to native tasks only; a harness task "
                    "takes shots, limit and chat_template (its YAML says the rest)"
                )
        elif self.shots > 5:
            raise ValueError(f"native tasks take at most 5 shots, not {self.shots}")
        if self.heldout and (self.name != "ppl" or self.path):
            raise ValueError("heldout: true is for a ppl task without a path")
        if self.name == "ppl" and not self.path and not self.heldout:
            raise ValueError("a ppl task needs a path (a text file) or heldout: true")
        return self


_NATIVE_ONLY = (
    "path",
    "heldout",
    "split",
    "fewshot_split",
    "subjects",
    "fields",
    "description",
    "answer_cue",
)


class EvalConfig(Section):
    model: PathText | None = Field(
        None, description="Model or adapter folder, or HF id (default: the run's newest)."
    )
    tasks: list[EvalTask] = Field(default_factory=list, description="Tasks to run, in order.")
    batch_size: int | Literal["auto"] = Field(
        "auto", description="Questions per forward pass; auto: the largest that fits (GPU)."
    )
    max_length: int | None = Field(
        None, ge=16, description="Context limit in tokens (default: the model's)."
    )
    add_bos: bool = Field(
        False, description="Prefix contexts with BOS (the harness does not, by default)."
    )
    log_samples: bool = Field(True, description="Write eval/samples-<task>.jsonl.")
    harness_include: list[str] = Field(
        default_factory=list,
        description="Folders of your own lm-evaluation-harness task YAMLs (for harness tasks).",
    )
