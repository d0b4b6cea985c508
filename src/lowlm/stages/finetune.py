"""`lowlm finetune`: downstream classification, the way TeenyTinyLlama measured its models
(ASSIN 2, FaQuAD-NLI, HateBR, IMDB-pt, ToLD-BR): the run's model as a sequence classifier.

Reads `finetune` (labelled train / test sets, fields, method full or LoRA, epochs) and the
run's model (or `finetune.model`); writes `finetune/`: the classifier (an HF
`AutoModelForSequenceClassification` folder, or a peft adapter over it), `labels.json` (the
label map, read from the training set) and `results.json` (accuracy, macro F1, per-label
precision and recall, confusion matrix on the test set). Training, checkpoints, resume and
energy are the shared ones.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

from lowlm.config import LowlmConfig
from lowlm.data.labelled import encode_labelled, labelled_sets
from lowlm.errors import LowlmError
from lowlm.execute import StageRun
from lowlm.models.classifier import load_classifier
from lowlm.models.load import check_vocab, pad_id, tokenizer_for
from lowlm.models.setup import apply_lora
from lowlm.training.classification import collate_labels, test_scores
from lowlm.training.loop import seed_everything
from lowlm.training.session import plan_from, run_training_stage, starting_model, train_and_save

STAGE = "finetune"


def run(config: LowlmConfig, force: bool = False, resume: bool = True) -> dict:
    cfg = config.finetune
    if not cfg.train:
        raise LowlmError("finetune.train is not set; name the labelled training set.")
    return run_training_stage(config, STAGE, _work, force, resume)


def _work(run: StageRun, accelerator) -> dict:
    config, cfg = run.config, run.config.finetune
    source = starting_model(
        run, "there is no model to fine-tune; set finetune.model or model.base."
    )
    train_examples, test_examples, labels = labelled_sets(config)
    label_ids = {label: i for i, label in enumerate(labels)}

    tokenizer = tokenizer_for(source, config.model)
    pad = pad_id(tokenizer)
    if pad is None:
        raise LowlmError("the tokenizer has neither a pad nor an EOS token to pad batches with.")
    train_rows = encode_labelled(tokenizer, train_examples, label_ids, cfg.max_length)
    test_rows = encode_labelled(tokenizer, test_examples, label_ids, cfg.max_length)
    world = accelerator.num_processes
    steps = max(
        1, math.ceil(cfg.epochs * len(train_rows) / (cfg.batch_size * cfg.grad_accum * world))
    )
    accelerator.print(
        f"finetune: {len(train_rows)} training and {len(test_rows)} test examples, "
        f"{len(labels)} labels ({', '.join(labels)}), {steps} steps ({cfg.epochs} epochs), "
        f"method {cfg.method}"
    )
    seed_everything(config.run.seed)
    work = Path(tempfile.mkdtemp(dir=run.run_dir.path, prefix=".finetune-work-"))
    try:
        model = load_classifier(source, config.model, labels, work, pad)
        check_vocab(model, tokenizer, source)
        if cfg.method == "lora":
            model = apply_lora(model, cfg.lora, task_type="SEQ_CLS")
        plan = plan_from(cfg, steps, cfg.lr, config.run.seed, frozen_base=cfg.method == "lora")
        test: dict = {}
        result = train_and_save(
            run,
            accelerator,
            model,
            tokenizer,
            train_rows,
            None,
            plan,
            kind="classifier" if cfg.method == "full" else "classifier-adapter",
            parent=None,
            collate=collate_labels(pad),
            final_metrics=test_scores(test_rows, labels, pad, test),
            files=lambda: {
                "labels.json": json.dumps(
                    {"labels": labels, "label2id": label_ids}, indent=2, ensure_ascii=False
                ),
                "results.json": json.dumps(test, indent=2, ensure_ascii=False) + "\n",
            },
            trained_from=source,
            labels=labels,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if accelerator.is_main_process:
        accelerator.print(
            f"finetune: accuracy {test['accuracy']:.4f}, macro F1 {test['macro_f1']:.4f} on "
            f"{test['n']} test examples (majority class {test['majority_class_accuracy']:.4f}); "
            f"wrote {run.folder}"
        )
    return result
