"""`lowlm generate` and `lowlm chat`: try any model or adapter of a run.

The model is `--model FOLDER` or the run's newest (sft adapter first). Prompts are wrapped
in the template the model was tuned with (its card), or `--template`; `--raw` sends them
as they are. Text streams to stdout as it is generated.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TextStreamer

from lowlm.config import LowlmConfig
from lowlm.data.templates import template_from_card
from lowlm.errors import LowlmError
from lowlm.graph import current_model
from lowlm.models.load import load_for_inference, pad_id


def load_for_generation(config: LowlmConfig, model_path: str | None):
    """(model, tokenizer, card) for --model, else the run's model that eval would score (the
    last stage the config builds), refused when that stage is not current."""
    return load_for_inference(current_model(config, model_path), config.model)


class Generator:
    """Greedy or sampled generation with streaming, under the model's template."""

    def __init__(
        self,
        config: LowlmConfig,
        model_path: str | None,
        template: str | None,
        raw: bool,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        greedy: bool,
        write: Callable[[str], None] | None = None,
    ):
        self.model, self.tokenizer, card = load_for_generation(config, model_path)
        self.template = (
            None if raw else template_from_card(card, self.tokenizer, template, config.sft.system)
        )
        self.settings = dict(
            max_new_tokens=max_new_tokens, do_sample=not greedy and temperature > 0
        )
        if self.settings["do_sample"]:
            self.settings.update(temperature=temperature, top_p=top_p)
        self.write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))

    def reply(self, messages: list[dict] | None = None, text: str | None = None) -> str:
        """Generate after a conversation (templated) or a raw text; stream and return it."""
        if self.template is not None and messages is not None:
            # The ids training built for this conversation's prompt (a prefix of its examples).
            ids = self.template.encode_prompt(messages)
        else:
            prompt = text if text is not None else messages[-1]["content"]
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        input_ids = torch.tensor([ids], device=self.model.device)
        encoded = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        streamer = _Streamer(self.tokenizer, self.write)
        with torch.no_grad():
            output = self.model.generate(
                **encoded,
                streamer=streamer,
                pad_token_id=pad_id(self.tokenizer),
                eos_token_id=self.tokenizer.eos_token_id,
                **self.settings,
            )
        new_tokens = output[0, encoded["input_ids"].shape[1] :]
        self.write("\n")
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True)


class _Streamer(TextStreamer):
    """TextStreamer that writes through a callback instead of print()."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._write = write

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self._write(text)


def generate(prompts: list[str], generator: Generator) -> list[str]:
    if not prompts:
        raise LowlmError("no prompt given; pass --prompt TEXT or --file FILE.")
    outputs = []
    for prompt in prompts:
        generator.write(f">>> {prompt}\n")
        outputs.append(generator.reply([{"role": "user", "content": prompt}], text=prompt))
    return outputs


def read_prompts(prompts: list[str] | None, file: Path | None) -> list[str]:
    collected = list(prompts or [])
    if file is not None:
        if not file.is_file():
            raise LowlmError(f"prompt file {file} does not exist.")
        try:
            collected += [
                line for line in file.read_text(encoding="utf-8").split("\n") if line.strip()
            ]
        except UnicodeDecodeError as exc:
            raise LowlmError(f"prompt file {file} is not UTF-8 ({exc}).") from None
    return collected


def chat(generator: Generator, read: Callable[[str], str] = input) -> None:
    """An interactive conversation; /reset forgets it, /exit (or end of input) leaves."""
    messages: list[dict] = []
    generator.write("lowlm chat: /reset starts over, /exit leaves.\n")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = []
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        generator.write("model> ")
        answer = generator.reply(messages, text=line)
        messages.append({"role": "assistant", "content": answer})
