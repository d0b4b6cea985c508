"""Turn rendered conversations into token ids and labels (-100 where no loss), truncate, pack."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowlm.data.templates import IGNORE, Template


@dataclass
class EncodeReport:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    trained_tokens: int = 0
    packed_blocks: int | None = None


def truncate(ids: list, labels: list, max_length: int) -> tuple[list, list, str]:
    """Fit an example into max_length without losing its whole first response.

    Returns (ids, labels, outcome) with outcome "kept", "truncated" or "dropped". The end is
    cut first; if that would leave less than a quarter of max_length of the first response,
    prompt tokens after the first one (BOS) are removed instead.
    """
    if len(ids) <= max_length:
        return ids, labels, "kept"
    trained = [i for i, label in enumerate(labels) if label != IGNORE]
    if not trained:
        return ids, labels, "dropped"
    first = trained[0]
    response_length = sum(1 for label in labels[first:] if label != IGNORE)
    keep_response = min(response_length, max(1, max_length // 4))
    if first + keep_response <= max_length:
        return ids[:max_length], labels[:max_length], "truncated"
    surplus = first + keep_response - max_length
    if surplus >= first:  # the prompt cannot shrink enough
        return ids, labels, "dropped"
    ids = ids[:1] + ids[1 + surplus :]
    labels = labels[:1] + labels[1 + surplus :]
    return ids[:max_length], labels[:max_length], "truncated"


def build_examples(
    conversations: list,
    template: Template,
    max_length: int,
    train_on_inputs: bool = False,
) -> tuple[list[dict], EncodeReport]:
    report = EncodeReport()
    examples = []
    for messages in conversations:
        ids, labels = template.encode(messages, train_on_inputs)
        ids, labels, outcome = truncate(ids, labels, max_length)
        if outcome == "dropped":
            report.dropped += 1
            continue
        report.truncated += outcome == "truncated"
        report.trained_tokens += sum(1 for label in labels if label != IGNORE)
        examples.append(
            {
                "input_ids": np.asarray(ids, dtype=np.int64),
                "labels": np.asarray(labels, dtype=np.int64),
            }
        )
    report.examples = len(examples)
    return examples, report


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Put whole examples into blocks of at most max_length tokens, filling them tightly.

    Longest first, each into the block with the most room left (worst-fit decreasing, a heap:
    O(n log n) for millions of examples); in-order greedy packing left about a fifth of each
    block as padding on mixed-length data. Each block carries `position_ids` that restart at
    0 at every example, so the training loop keeps the examples of a block apart (each
    attends only to itself) and each is trained exactly as it would be alone: the same
    targets, the same positions. The first token of an example is never a target (alone,
    nothing precedes it). The loop shuffles blocks, so their order here does not matter.
    """
    import heapq

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    members: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (-tokens left, block index): the roomiest on top
    for index in order:
        size = len(examples[index]["input_ids"])
        if room and -room[0][0] >= size:
            left, block = heapq.heappop(room)
            members[block].append(index)
            heapq.heappush(room, (left + size, block))
        else:
            members.append([index])
            heapq.heappush(room, (-(max_length - size), len(members) - 1))
    blocks = []
    for rows in members:
        rows.sort()  # the examples' own order inside a block
        chosen = [examples[i] for i in rows]
        labels = np.concatenate([e["labels"] for e in chosen])
        positions = np.concatenate([np.arange(len(e["input_ids"])) for e in chosen])
        labels[positions == 0] = IGNORE
        ids = np.concatenate([e["input_ids"] for e in chosen])
        blocks.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return blocks
