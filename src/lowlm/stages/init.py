"""`lowlm init`: a Llama model from scratch, sized by name or by fields, for the run's tokenizer.

Reads `init` and the run's `tokenizer/`; writes `model-init/` (HF model, tokenizer,
lowlm_model.json).
"""

from __future__ import annotations

import torch

from lowlm.config import LowlmConfig
from lowlm.errors import LowlmError
from lowlm.execute import StageRun, execute
from lowlm.graph import folder
from lowlm.models.load import load_tokenizer, save_whole_model
from lowlm.models.presets import llama_config

STAGE = "init"


def run(config: LowlmConfig, force: bool = False) -> dict:
    return execute(config, STAGE, _work, force=force)


def _work(run: StageRun) -> dict:
    from transformers import LlamaForCausalLM

    config = run.config
    tokenizer_folder = folder(config, "tokenize")
    if not (tokenizer_folder / "tokenizer.json").exists():
        raise LowlmError(
            f"{tokenizer_folder} holds no tokenizer; set tokenize.corpus and run `lowlm tokenize`."
        )
    tokenizer = load_tokenizer(tokenizer_folder)
    llama = llama_config(config.init, tokenizer)
    torch.manual_seed(config.run.seed)
    model = LlamaForCausalLM(llama)
    parameters = sum(p.numel() for p in model.parameters())
    whole = {"size": config.init.size, "new_token_ids": [0, len(tokenizer)]}
    record = save_whole_model(run.folder, model, tokenizer, run.key, **whole)
    metrics = {
        "size": config.init.size,
        "parameters": parameters,
        "hidden_size": llama.hidden_size,
        "num_hidden_layers": llama.num_hidden_layers,
        "vocab_size": llama.vocab_size,
    }
    print(
        f"init: {config.init.size} Llama, {parameters / 1e6:.2f}M parameters, vocabulary "
        f"{llama.vocab_size}; wrote {run.folder}"
    )
    return {"metrics": metrics, "record": record}
