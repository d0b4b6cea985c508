"""Prompt templates: render a conversation to text plus the character spans the model learns.

A conversation is a list of messages {"role": "system" | "user" | "assistant",
"content": str}; a user message may carry an Alpaca "input". Every template ends each
assistant response with the tokenizer's EOS (or the template's own end-of-turn token
followed by EOS where they differ), and that end is part of the trained span.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowlm.errors import LowlmError

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
)
NAMED = ("alpaca", "llama2", "chatml", "tokenizer")


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # [start, end) character ranges that carry the loss
    add_special_tokens: bool  # whether the tokenizer should add its own BOS


class Template:
    """One of the named templates, or a custom per-turn string with {user} and {assistant}."""

    def __init__(self, spec: str, tokenizer, system: str | None = None, append_input: bool = False):
        self.spec, self.tokenizer, self.system, self.append_input = (
            spec,
            tokenizer,
            system,
            append_input,
        )
        self.eos = tokenizer.eos_token or ""
        self.bos = tokenizer.bos_token or ""
        if spec not in NAMED:
            if "{user}" not in spec or not spec.endswith("{assistant}"):
                raise LowlmError(
                    f"sft.template '{spec}' is neither {', '.join(NAMED)} nor a custom template "
                    "with {user} that ends with {assistant}."
                )
        if spec == "tokenizer" and not getattr(tokenizer, "chat_template", None):
            raise LowlmError(
                "sft.template is 'tokenizer' but the tokenizer has no chat template; choose "
                "alpaca, llama2, chatml or a custom template."
            )

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
        """The training text (assistant turns included), or the prompt for generation."""
        messages = self._with_system(messages)
        if self.spec == "tokenizer":
            return self._render_chat_template(messages, add_generation_prompt)
        parts: list[tuple[str, bool]] = []
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        turns = [m for m in messages if m["role"] != "system"]
        first = True
        for message in turns:
            if message["role"] == "user":
                parts.append((self._user(message, system, first), False))
                first = False
            elif message["role"] == "assistant":
                parts.append((message["content"], True))
                parts.append((self._end_of_turn(), True))
                if self.spec == "chatml":
                    parts.append(("\n", False))
        text, spans, position = "", [], 0
        for piece, trained in parts:
            if trained and spans and spans[-1][1] == position:
                spans[-1] = (spans[-1][0], position + len(piece))
            elif trained:
                spans.append((position, position + len(piece)))
            text += piece
            position += len(piece)
        return Rendered(text, spans, add_special_tokens=self.spec != "llama2")

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.system and not any(m["role"] == "system" for m in messages):
            return [{"role": "system", "content": self.system}, *messages]
        return messages

    def _user(self, message: dict, system: str | None, first: bool) -> str:
        content, extra = message["content"], message.get("input") or ""
        if self.spec == "alpaca":
            if extra and self.append_input:
                content, extra = f"{content}\n{extra}", ""
            header = (
                system + "\n\n" if system else (ALPACA_WITH_INPUT if extra else ALPACA_NO_INPUT)
            )
            prefix = header if first else ""
            body = f"### Instruction:\n{content}\n\n"
            if extra:
                body += f"### Input:\n{extra}\n\n"
            return f"{prefix}{body}### Response:\n"
        content = self._joined(message)
        if self.spec == "llama2":
            sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system and first else ""
            return f"{self.bos}[INST] {sys_block}{content} [/INST] "
        if self.spec == "chatml":
            sys_block = f"<|im_start|>system\n{system}<|im_end|>\n" if system and first else ""
            return f"{sys_block}<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
        before, _, _ = self.spec.partition("{assistant}")
        shown_system = (system or "") if first else ""
        return before.replace("{system}", shown_system).replace("{user}", content)

    def _end_of_turn(self) -> str:
        if self.spec == "llama2":
            return f" {self.eos}"
        if self.spec == "chatml":
            return "<|im_end|>" + (self.eos if self.eos != "<|im_end|>" else "")
        return self.eos

    def _render_chat_template(self, messages: list[dict], add_generation_prompt: bool) -> Rendered:
        """The tokenizer's own template; assistant spans found by rendering prefixes."""
        plain = [{"role": m["role"], "content": self._joined(m)} for m in messages]

        def render(upto: int, generation: bool) -> str:
            return self.tokenizer.apply_chat_template(
                plain[:upto], tokenize=False, add_generation_prompt=generation
            )

        if add_generation_prompt:
            return Rendered(render(len(plain), True), [], add_special_tokens=False)
        spans = []
        for index, message in enumerate(plain):
            if message["role"] == "assistant":
                start = len(render(index, True))
                end = len(render(index + 1, False))
                spans.append((start, end))
        text = render(len(plain), False)
        if spans and self.eos and self.eos not in text[spans[-1][0] : spans[-1][1]]:
            text += self.eos  # the template does not end turns with EOS: add it
            spans[-1] = (spans[-1][0], len(text))
        return Rendered(text, spans, add_special_tokens=False)

    def _joined(self, message: dict) -> str:
        extra = message.get("input") or ""
        if not extra:
            return message["content"]
        return (
            f"{message['content']}\n{extra}"
            if self.append_input
            else f"{message['content']}\n\n{extra}"
        )

    def prompt(self, messages: list[dict]) -> Rendered:
        """The text that asks the model for the next assistant turn (no trained spans)."""
        if self.spec == "tokenizer":
            return self.render(messages, add_generation_prompt=True)
        rendered = self.render([*messages, {"role": "assistant", "content": ""}])
        return Rendered(rendered.text[: rendered.spans[-1][0]], [], rendered.add_special_tokens)
