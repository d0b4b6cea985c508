"""The run config: one YAML file, one typed section per stage (docs/configuration.md).

Every section is a pydantic model that forbids unknown keys; `load_config` turns
pydantic's errors into one sentence per problem, naming the key and, for a typo,
the closest valid key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from lowlm.config_eval import EvalConfig, EvalTask
from lowlm.config_types import PathText, RunName, Section
from lowlm.data.prepare.settings import PrepareConfig
from lowlm.errors import LowlmError

# The LoRA stages' choice (pretrain stage 2, sft, dpo): the frozen base loaded quantised or not.
QuantizeBase = Annotated[
    Literal["none", "4bit", "8bit"],
    Field(
        description="Load the frozen base in 4-bit NF4 (QLoRA) or 8-bit with bitsandbytes; "
        "needs a CUDA GPU and the bitsandbytes package."
    ),
]


class RunConfig(Section):
    name: RunName = Field("lowlm-run", description="Artifacts go to <root>/<name>/.")
    root: PathText = Field("runs", description="Folder that holds run directories.")
    seed: int = Field(1234, description="Seed for sampling, shuffling and initialisation.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list,
        description="Live trackers the training stages also log to (tensorboard writes to "
        "<run>/tracking/<stage>/); log.jsonl stays the record.",
    )


class ModelConfig(Section):
    base: PathText | None = Field(
        None, description="Base model: HF id, local HF folder, or a local .gguf file."
    )
    tokenizer: PathText | None = Field(
        None,
        description="Base tokenizer: folder, SentencePiece tokenizer.model, or HF id "
        "(default: the base model's).",
    )
    trust_remote_code: bool = Field(False, description="Allow models that ship their own code.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Weights dtype for loading and training."
    )
    attn_implementation: (
        Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"] | None
    ) = Field(
        None,
        description="Attention kernel for training and evaluation (default: the model's own, "
        "sdpa for transformers models); flash_attention_2 needs the flash-attn package and a "
        "CUDA GPU.",
    )


class DataConfig(Section):
    text_field: str = Field(
        "text", description="Field holding the text in .jsonl/.parquet/HF rows."
    )
    hf_split: str = Field("train", description="Split used for Hugging Face dataset names.")
    nfkc: bool = Field(False, description="Apply Unicode NFKC normalisation to every line.")
    dedup: bool = Field(False, description="Drop exact duplicate lines (after normalisation).")
    min_chars: int = Field(1, ge=1, description="Drop lines shorter than this many characters.")
    invalid_utf8: Literal["error", "replace"] = Field(
        "error", description="On invalid UTF-8: stop with file and byte offset, or replace."
    )
    heldout_fraction: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Share of corpus documents held out of every training stage (chosen by a "
        "hash of run.seed and the text); held-out figures are measured on them.",
    )


class TokenizeConfig(Section):
    corpus: list[PathText] = Field(
        default_factory=list,
        description="Files, directories, globs, .jsonl/.parquet/.gz, or HF dataset names.",
    )
    eval_texts: dict[str, PathText] = Field(
        default_factory=dict, description="Extra held-out files reported before/after, by label."
    )
    model_type: Literal["bpe", "unigram"] = Field("bpe", description="SentencePiece model type.")
    vocab_size: int = Field(20000, ge=16, description="Size of the trained target-language model.")
    merge: bool = Field(True, description="Merge into the base tokenizer; false keeps it alone.")
    scripts: list[str] = Field(
        default_factory=lambda: ["Han"],
        description="New pieces must contain a character of one of these Unicode scripts.",
    )
    character_coverage: float = Field(
        0.9995, gt=0, le=1, description="Share of characters the trained model must cover."
    )
    byte_fallback: bool = Field(True, description="Fall back to bytes for unknown characters.")
    split_digits: bool = Field(True, description="Split numbers into single digits.")
    max_sentence_length: int = Field(
        16384, ge=1, description="Longest line (bytes) used in training; longer are skipped."
    )
    input_sentence_size: int = Field(
        2_000_000, ge=0, description="Lines sampled for training (0: all)."
    )
    shuffle_input_sentence: bool = Field(True, description="Sample lines at random, not the first.")
    num_threads: int = Field(0, ge=0, description="Training threads (0: all cores).")
    user_defined_symbols: list[str] = Field(
        default_factory=list, description="Pieces always kept whole."
    )
    holdout_lines: int = Field(
        500,
        ge=0,
        description="Lines of held-out documents written to tokenizer/heldout.txt, the text "
        "every held-out figure is measured on.",
    )
    min_frequency: int = Field(
        2, ge=1, description="Byte-level bases: least count for a new merge."
    )


class ResizeConfig(Section):
    init: Literal["subword_mean", "mean", "random"] = Field(
        "subword_mean",
        description="New rows: mean of the base rows of the token's base sub-tokens, mean of "
        "all rows, or random with the rows' std.",
    )
    pad_to_multiple_of: int | None = Field(
        64, ge=1, description="Round the row count up to a multiple of this (null: exact)."
    )
    eval_lines: int = Field(
        200, ge=0, description="Held-out lines for the before/after loss per character."
    )


class InitConfig(Section):
    size: Literal["tiny", "ttl-160m", "ttl-460m", "custom"] | None = Field(
        None, description="A named Llama size, or custom (fields below); null: no init stage."
    )
    hidden_size: int | None = Field(None, ge=8, description="Overrides the size's hidden size.")
    intermediate_size: int | None = Field(None, ge=8, description="MLP width.")
    num_hidden_layers: int | None = Field(None, ge=1, description="Transformer layers.")
    num_attention_heads: int | None = Field(None, ge=1, description="Attention heads.")
    num_key_value_heads: int | None = Field(None, ge=1, description="Key/value heads (GQA).")
    max_position_embeddings: int | None = Field(None, ge=16, description="Context length.")
    tie_word_embeddings: bool | None = Field(None, description="Share input and output rows.")


class LoraSection(Section):
    r: int = Field(64, ge=1, description="LoRA rank.")
    alpha: float = Field(128, gt=0, description="LoRA alpha (scale alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names that get LoRA.",
    )


class AttentionMlpLoraSection(LoraSection):
    """LoRA on attention and MLP by default: CLA2's pre-training and instruction tuning; in
    pre-training it beat attention-only LoRA at equal FLOPs (docs/adapt.md)."""

    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        description="Module names that get LoRA.",
    )


class Stage1Config(Section):
    steps: int = Field(0, ge=0, description="Optimizer steps; 0 skips stage 1.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    new_rows_only: bool = Field(False, description="Train only the new tokens' rows.")


class Stage2Config(Section):
    steps: int = Field(0, ge=0, description="Optimizer steps; 0 skips stage 2.")
    # The defaults are the levers that won at equal training FLOPs on SmolLM2-135M, pt-BR
    # (docs/adapt.md); a much larger base likely wants a lower lr (CLA2, 7B: 2e-4).
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (the LoRA weights').")
    lora: AttentionMlpLoraSection = Field(default_factory=AttentionMlpLoraSection)
    # new, not all: all gained 4.7% on the target language but cost the base language 6.7%
    # (English +5.3% over the base, 100 steps; docs/adapt.md).
    train_embeddings: Literal["all", "new", "none"] = Field(
        "new",
        description="Embedding and LM-head rows trained beside LoRA: new (the merge's rows), "
        "all, or none (LoRA alone: a run without a merge).",
    )
    embedding_lr: float | None = Field(
        3e-4,
        gt=0,
        description="Peak learning rate of the trained embedding and LM-head rows; "
        "null: lr (the LoRA weights').",
    )
    quantize_base: QuantizeBase = "none"


class FullConfig(Section):
    steps: int = Field(0, ge=0, description="Optimizer steps; 0 skips full training.")
    lr: float = Field(6e-4, gt=0, description="Peak learning rate.")


class EnergyConfig(Section):
    enabled: bool = Field(True, description="Record kWh and CO2 with codecarbon (offline).")
    country_iso_code: str = Field("USA", description="Grid of the machine, for kg CO2 per kWh.")


class TrainingSection(Section):
    """Fields every training stage shares (pretrain, sft, dpo, finetune)."""

    batch_size: int = Field(8, ge=1, description="Examples per device per micro-step.")
    grad_accum: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps before the cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a share of lr.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not on embeddings).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_skipped_steps: int = Field(
        5,
        ge=1,
        description="Steps in a row whose loss or gradient norm is not finite (each skipped, "
        "weights and optimizer untouched) before the stage stops.",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    compile: bool = Field(
        False, description="torch.compile the model (accelerate's dynamo plugin, inductor)."
    )
    liger_kernel: bool = Field(
        False,
        description="Liger's fused kernels (RMSNorm, RoPE, SwiGLU, linear + cross-entropy "
        "without the full logits); needs the liger-kernel package and a CUDA GPU.",
    )
    save_every: int = Field(500, ge=1, description="Checkpoint every N steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept per stage.")
    eval_every: int = Field(200, ge=1, description="Validation loss every N steps.")
    log_every: int = Field(10, ge=1, description="Log loss, lr, grad norm, tokens/s every N steps.")
    max_eval_blocks: int = Field(64, ge=1, description="Most held-out examples evaluated.")
    peak_tflops: float | None = Field(
        None, gt=0, description="Device peak for the MFU estimate (default: a table guess)."
    )
    energy: EnergyConfig = Field(default_factory=EnergyConfig)


class PretrainConfig(TrainingSection):
    eval_tasks: list[EvalTask] = Field(
        default_factory=list,
        description="Eval tasks scored every eval_every steps on the model being trained "
        "(e.g. {name: mmlu, path: data/mmlu, limit: 10}), logged with the loss.",
    )
    corpus: list[PathText] = Field(
        default_factory=list, description="Training text (default: tokenize.corpus)."
    )
    block_size: int = Field(512, ge=8, description="Tokens per packed training block.")
    isolate_documents: bool = Field(
        False,
        description="Keep the documents packed into a block apart: positions restart after "
        "each EOS and a document attends only to itself (off: the usual packed pre-training, "
        "where a document sees the end of the one before it).",
    )
    stage1: Stage1Config = Field(default_factory=Stage1Config)
    stage2: Stage2Config = Field(default_factory=Stage2Config)
    full: FullConfig = Field(default_factory=FullConfig)
    eval_lines: int = Field(
        200, ge=0, description="Held-out tokenizer lines for the final loss per character."
    )
    num_proc: int = Field(1, ge=1, description="Worker processes that tokenise the corpus.")


class InstructionFields(Section):
    instruction: str = Field("instruction", description="Alpaca: the instruction field.")
    input: str = Field("input", description="Alpaca: the optional input field.")
    output: str = Field("output", description="Alpaca: the response field.")
    system: str = Field("system", description="Alpaca: an optional system-message field.")
    messages: str = Field("messages", description="Conversations: the list of messages.")
    role: str = Field("role", description="Conversations: a message's role field.")
    content: str = Field("content", description="Conversations: a message's text field.")


class SftConfig(TrainingSection):
    quantize_base: QuantizeBase = "none"
    eval_tasks: list[EvalTask] = Field(
        default_factory=list,
        description="Eval tasks scored every eval_every steps on the model being trained "
        "(e.g. {name: ceval, path: data/ceval, limit: 10}), logged with the loss.",
    )
    eval_fraction: float = Field(
        0.01, ge=0, lt=1, description="Share of instruction examples kept for validation loss."
    )
    data: list[PathText] = Field(
        default_factory=list, description="JSON / JSONL files, globs, or HF dataset names."
    )
    hf_split: str = Field("train", description="Split used for Hugging Face dataset names.")
    fields: InstructionFields = Field(default_factory=InstructionFields)
    template: str = Field(
        "alpaca",
        description="alpaca | llama2 | chatml | tokenizer | a custom string with {user} that "
        "ends with {assistant} ({system} optional).",
    )
    system: str | None = Field(None, description="System message for records without one.")
    append_input: bool = Field(
        False, description="Append an Alpaca input to the instruction with a newline."
    )
    train_on_inputs: bool = Field(False, description="Also train on prompt and user tokens.")
    max_length: int = Field(1024, ge=8, description="Longest example in tokens.")
    packing: bool = Field(
        True,
        description="Pack several examples into one max_length block, each kept apart from the "
        "others (position ids restart at each; the loss is the same as unpacked, with less "
        "padding).",
    )
    model: PathText | None = Field(
        None, description="Model to tune (default: the run's newest model, or model.base)."
    )
    steps: int = Field(1000, ge=1, description="Optimizer steps.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    lora: AttentionMlpLoraSection = Field(default_factory=AttentionMlpLoraSection)
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full beside LoRA (e.g. norm, lm_head).",
    )


FINETUNE_LR = {"lora": 2e-4, "full": 2e-5}  # finetune.lr when unset, by method


class FinetuneConfig(TrainingSection):
    """Downstream classification (TeenyTinyLlama's evaluation): the model as a sequence
    classifier on a labelled set."""

    model: PathText | None = Field(
        None, description="Model to fine-tune (default: the run's model, as for sft)."
    )
    train: PathText | None = Field(
        None, description="Labelled training set: .jsonl, .csv, .parquet or an HF dataset name."
    )
    test: PathText | None = Field(None, description="Test set, same formats (else test_fraction).")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of train held out as the test set when test is unset."
    )
    hf_split: str = Field("train", description="Split of an HF training set.")
    hf_test_split: str = Field("test", description="Split of an HF test set.")
    text_field: str = Field("text", description="Field with the text.")
    text_pair_field: str | None = Field(
        None, description="Field with the second text of pair tasks (entailment, NLI)."
    )
    label_field: str = Field("label", description="Field with the label (string or integer).")
    method: Literal["full", "lora"] = Field("full", description="Train every weight, or LoRA.")
    epochs: float = Field(3, gt=0, description="Passes over the training set.")
    lr: float | None = Field(
        None, gt=0, description="Peak learning rate (default: 2e-4 for lora, 2e-5 for full)."
    )
    max_length: int = Field(256, ge=8, description="Longest input in tokens (longer: cut).")
    lora: LoraSection = Field(default_factory=LoraSection)

    @model_validator(mode="after")
    def _lr_for_the_method(self) -> FinetuneConfig:
        # A full fine-tuning rate barely moves a LoRA adapter (peft's and LLaMA-Factory's LoRA
        # examples use 1e-4 to 5e-4); the resolved config records the rate used.
        if self.lr is None:
            self.lr = FINETUNE_LR[self.method]
        return self


class DpoConfig(TrainingSection):
    """Direct Preference Optimization of a LoRA adapter on {prompt, chosen, rejected} pairs."""

    quantize_base: QuantizeBase = "none"

    data: list[PathText] = Field(
        default_factory=list, description="JSONL files (or HF dataset names) of preference pairs."
    )
    hf_split: str = Field("train", description="Split used for Hugging Face dataset names.")
    prompt_field: str = Field("prompt", description="Field with the prompt.")
    chosen_field: str = Field("chosen", description="Field with the preferred answer.")
    rejected_field: str = Field("rejected", description="Field with the other answer.")
    template: str | None = Field(
        None, description="Template around the prompt (default: the model's sft template)."
    )
    model: PathText | None = Field(
        None, description="Model to align (default: the sft adapter, merged, else as sft)."
    )
    beta: float = Field(0.1, gt=0, description="DPO temperature: how far from the reference.")
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of pairs held out for reward accuracy."
    )
    max_length: int = Field(512, ge=8, description="Longest prompt + answer in tokens.")
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    lr: float = Field(5e-6, gt=0, description="Peak learning rate.")
    lora: AttentionMlpLoraSection = Field(default_factory=AttentionMlpLoraSection)


class ExportConfig(Section):
    tolerance: float = Field(
        1e-3, gt=0, description="Largest merged-vs-adapter logit difference accepted."
    )
    check_sequences: int = Field(4, ge=1, description="Held-out blocks compared.")


class LowlmConfig(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    resize: ResizeConfig = Field(default_factory=ResizeConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name


_TYPE_WORDS = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "literal_error": None,
}


def _section_model(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = LowlmConfig
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None) if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            break
    return model


def _describe(error: dict) -> str:
    loc = tuple(error["loc"])
    where = ".".join(str(p) for p in loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _section_model(loc[:-1])
        valid = list(parent.model_fields)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}."
        return f"unknown key '{where}' in the config; {hint}"
    value = error.get("input")
    if kind == "value_error":  # a section's own check
        return f"'{where}': {error['ctx']['error']}."
    if kind == "literal_error":
        return f"'{where}' must be {error['ctx']['expected']}, got {value!r}."
    expected = _TYPE_WORDS.get(kind)
    if expected:
        return f"'{where}' must be {expected}, got {value!r}."
    if kind == "value_error":  # a validator's own sentence, without pydantic's prefix
        return f"'{where}': {error['ctx']['error']} (got {value!r})."
    return f"'{where}': {error['msg']} (got {value!r})."


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise LowlmError(f"--set '{item}' is not of the form section.key=value.")
        dotted, value = item.split("=", 1)
        parts = [p for p in dotted.strip().split(".") if p]
        if not parts:
            raise LowlmError(f"--set '{item}' names no key.")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise LowlmError(f"--set '{item}': '{part}' is not a section.")
            node = child
        try:
            node[parts[-1]] = _parse_value(value)
        except yaml.YAMLError as exc:
            problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
            raise LowlmError(
                f"--set '{item}': the value is not valid YAML ({problem}); quote it, e.g. "
                f"--set '{dotted}=\"{value}\"' for a string."
            ) from None
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> LowlmConfig:
    """Read, override and validate a config; every problem becomes one readable sentence."""
    path = Path(path)
    if not path.is_file():
        raise LowlmError(f"config file {path} does not exist; pass the path of a YAML config.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise LowlmError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise LowlmError(
            f"config file {path} must be a mapping of sections, not {type(raw).__name__}."
        )
    raw = apply_overrides(raw, overrides or [])
    try:
        return LowlmConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        raise LowlmError(" ".join(problems)) from None


def config_to_yaml(config: LowlmConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
