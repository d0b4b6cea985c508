"""Instruction data: Alpaca records and conversations from JSON / JSONL files or HF datasets.

Every record becomes a conversation (a list of {"role", "content"} messages; a user
message may carry an Alpaca "input"). Invalid records are counted and the first few are
reported with file and line; none is dropped silently, and no valid record is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowlm.data.corpus import resolve_sources
from lowlm.data.records import iter_records
from lowlm.errors import LowlmError

ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
SHOWN_PROBLEMS = 5


@dataclass
class ReadReport:
    records: int = 0
    valid: int = 0
    invalid: int = 0
    problems: list[str] = field(default_factory=list)

    def reject(self, where: str, reason: str) -> None:
        self.invalid += 1
        if len(self.problems) < SHOWN_PROBLEMS:
            self.problems.append(f"{where}: {reason}")


def _conversation(record: object, fields) -> list[dict] | str:
    """The record as messages, or the reason it is invalid."""
    if isinstance(record, Exception):
        return str(record)
    if not isinstance(record, dict):
        return "not a JSON object"
    if fields.messages in record:
        return _messages(record[fields.messages], fields)
    instruction, output = record.get(fields.instruction), record.get(fields.output)
    if not isinstance(instruction, str) or not instruction.strip():
        return f"no '{fields.instruction}' text (or '{fields.messages}' list)"
    if not isinstance(output, str) or not output.strip():
        return f"no '{fields.output}' text"
    extra = record.get(fields.input) or ""
    if not isinstance(extra, str):
        return f"'{fields.input}' is not text"
    messages = []
    system = record.get(fields.system)
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": instruction, "input": extra})
    messages.append({"role": "assistant", "content": output})
    return messages


def _messages(raw: object, fields) -> list[dict] | str:
    if not isinstance(raw, list) or not raw:
        return f"'{fields.messages}' is not a non-empty list"
    messages = []
    for position, item in enumerate(raw):
        if not isinstance(item, dict):
            return f"message {position} is not an object"
        role = ROLE_ALIASES.get(str(item.get(fields.role)), item.get(fields.role))
        content = item.get(fields.content)
        if role not in ("system", "user", "assistant"):
            return f"message {position} has role {item.get(fields.role)!r}"
        if not isinstance(content, str) or (role != "system" and not content.strip()):
            return f"message {position} has no '{fields.content}' text"
        messages.append({"role": role, "content": content})
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if "assistant" not in turns or turns[0] != "user":
        return "the conversation must start with a user turn and hold an assistant turn"
    if any(a == b for a, b in zip(turns, turns[1:], strict=False)):
        return "user and assistant turns must alternate"
    return messages


def read_conversations(
    patterns: list[str], fields, split: str = "train"
) -> tuple[list, ReadReport]:
    """Every valid record as a conversation, and the counts; no valid record is an error."""
    if not patterns:
        raise LowlmError("sft.data is empty; list JSON / JSONL files or dataset names.")
    report = ReadReport()
    conversations = []
    for source in resolve_sources(patterns, "sft.data"):
        if source.path is not None and source.path.suffix not in (".json", ".jsonl"):
            raise LowlmError(f"{source.path}: instruction data must be .json or .jsonl.")
        for where, record in iter_records(source, split):
            report.records += 1
            result = _conversation(record, fields)
            if isinstance(result, str):
                report.reject(where, result)
            else:
                report.valid += 1
                conversations.append(result)
    if not conversations:
        shown = "; ".join(report.problems) or "no records"
        raise LowlmError(f"no valid instruction record in {', '.join(patterns)} ({shown}).")
    return conversations, report


def describe(report: ReadReport) -> str:
    text = f"{report.valid} valid of {report.records} records"
    if report.invalid:
        text += f"; {report.invalid} invalid, e.g. " + "; ".join(report.problems)
    return text
