"""`lowlm init`: a Llama model from scratch, sized by name or by fields, for the run's tokenizer.

Reads `init` and the run's `tokenizer/`; writes `model-init/` (HF model, tokenizer,
lowlm_model.json).
"""

from __future__ import annotations

import time

import torch

from lowlm.config import LowlmConfig
from lowlm.models.load import load_tokenizer, save_model_folder
from lowlm.models.presets import llama_config
from lowlm.rundir import RunDir, atomic_dir, fingerprint
from lowlm.tokenization.base import tokenizer_hash

STAGE = "init"


def run(config: LowlmConfig, force: bool = False) -> dict:
    from transformers import LlamaForCausalLM

    run_dir = RunDir(config)
    tokenizer_folder = run_dir.run_tokenizer()
    inputs = {"tokenizer": tokenizer_hash(tokenizer_folder)}
    key = fingerprint(config.init.model_dump(), config.run.seed, inputs)
    if run_dir.skip_done(STAGE, key, force):
        return run_dir.stage_record(STAGE)["metrics"]

    started = time.time()
    with run_dir.recording(STAGE, inputs, key):
        tokenizer = load_tokenizer(tokenizer_folder)
        llama = llama_config(config.init, tokenizer)
        torch.manual_seed(config.run.seed)
        model = LlamaForCausalLM(llama)
        parameters = sum(p.numel() for p in model.parameters())
        with atomic_dir(run_dir.folder(STAGE)) as out:
            card = save_model_folder(
                model,
                tokenizer,
                out,
                "model",
                None,
                size=config.init.size,
                new_token_ids=[0, len(tokenizer)],
            )
    metrics = {
        "size": config.init.size,
        "parameters": parameters,
        "hidden_size": llama.hidden_size,
        "num_hidden_layers": llama.num_hidden_layers,
        "vocab_size": llama.vocab_size,
    }
    run_dir.finish_model(STAGE, card, metrics, started)
    print(
        f"init: {config.init.size} Llama, {parameters / 1e6:.2f}M parameters, vocabulary "
        f"{llama.vocab_size}; wrote {run_dir.folder(STAGE)}"
    )
    return metrics
