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
IGNORE = -100


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

        spans = []
        for index, message in enumerate(plain):
            if message["role"] == "assistant":
                start = len(render(index, True))
                end = len(render(index + 1, False))
                spans.append((start, end))
        if add_generation_prompt:  # the earlier turns' spans, for encode_prompt's segments
            return Rendered(render(len(plain), True), spans, add_special_tokens=False)
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

    # ----- token ids: what training and inference both feed the model ---------------------

    def encode(self, messages: list[dict], train_on_inputs: bool = False) -> tuple[list, list]:
        """(ids, labels) of a training conversation; labels are -100 outside trained spans.

        The text is tokenized in segments cut at the trained spans' edges: the first segment
        as a whole text (BOS as the template wants), each later one as a continuation. So a
        prompt's ids never merge with its answer's first characters (an answer after a
        prompt that ends in a space would otherwise swallow it: `▁word`), and the ids
        `encode_prompt` gives for generation are exactly a prefix of these, for every
        template and turn."""
        ids: list[int] = []
        labels: list[int] = []
        rendered = self.render(messages)
        for index, (text, trained) in enumerate(_segments(rendered)):
            piece = self._ids(text, index == 0, rendered.add_special_tokens)
            ids.extend(piece)
            labels.extend(piece if trained or train_on_inputs else [IGNORE] * len(piece))
        return ids, labels

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """The ids that ask the model for the next assistant turn (generate, chat)."""
        rendered = self.prompt(messages)
        ids: list[int] = []
        for index, (text, _) in enumerate(_segments(rendered)):
            ids.extend(self._ids(text, index == 0, rendered.add_special_tokens))
        return ids

    def _ids(self, text: str, first: bool, special: bool) -> list[int]:
        if first:
            return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
        return self._continuation(text)

    def _continuation(self, text: str) -> list[int]:
        """Ids of text that follows other text: without the word-start marker a SentencePiece
        tokenizer puts before a text of its own (`Hello` -> `▁Hello`)."""
        if not hasattr(self, "_continuing"):
            self._continuing = continuation_tokenizer(self.tokenizer)
        if self._continuing is not None:
            return self._continuing.encode(text, add_special_tokens=False).ids
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt(self, messages: list[dict]) -> Rendered:
        """The text that asks the model for the next assistant turn, with the spans of the
        assistant turns already in it (where training cuts its segments)."""
        if self.spec == "tokenizer":
            return self.render(messages, add_generation_prompt=True)
        rendered = self.render([*messages, {"role": "assistant", "content": ""}])
        start = rendered.spans[-1][0]
        return Rendered(rendered.text[:start], rendered.spans[:-1], rendered.add_special_tokens)


def template_from_card(
    card: dict, tokenizer, name: str | None = None, system: str | None = None
) -> Template | None:
    """The template a model was tuned with, read from its card (with the card's system prompt),
    or the named one when `name` is given (then with `system`); None when neither says."""
    chosen = name or card.get("template")
    if not chosen:
        return None
    prompt = system if name else card.get("system")
    return Template(chosen, tokenizer, prompt, bool(card.get("append_input", False)))


def _segments(rendered: Rendered) -> list[tuple[str, bool]]:
    """The text cut at the edges of its trained spans: (text, trained) in order, none empty."""
    pieces, position = [], 0
    for start, end in rendered.spans:
        if start > position:
            pieces.append((rendered.text[position:start], False))
        if end > start:
            pieces.append((rendered.text[start:end], True))
        position = max(position, end)
    if position < len(rendered.text):
        pieces.append((rendered.text[position:], False))
    return pieces


def continuation_tokenizer(tokenizer):
    """A copy of the fast tokenizer's backend that adds no word-start marker (`▁`) at the start
    of a text or after a special token, or None when it adds none already (byte-level BPE).

    transformers has no switch for this: SentencePiece-style tokenizers put the marker in a
    Metaspace pre-tokenizer (prepend_scheme "first", or "always" with legacy=True) or, in
    older tokenizer.json files, in a Prepend normalizer; both are turned off here."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    changed = False

    def pre(node):
        nonlocal changed
        if not isinstance(node, dict):
            return node
        if node.get("type") == "Metaspace":
            if node.get("prepend_scheme", "always") != "never" or node.get("add_prefix_space"):
                node["prepend_scheme"] = "never"
                node.pop("add_prefix_space", None)
                changed = True
        elif node.get("type") == "Sequence":
            node["pretokenizers"] = [pre(child) for child in node.get("pretokenizers", [])]
        return node

    def norm(node):
        nonlocal changed
        if not isinstance(node, dict):
            return node
        if node.get("type") == "Prepend":
            changed = True
            return None
        if node.get("type") == "Sequence":
            children = [norm(child) for child in node.get("normalizers", [])]
            node["normalizers"] = [child for child in children if child is not None]
        return node

    spec["pre_tokenizer"] = pre(spec.get("pre_tokenizer"))
    spec["normalizer"] = norm(spec.get("normalizer"))
    if not changed:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(spec))
