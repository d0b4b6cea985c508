"""Log-likelihood scoring of multiple-choice continuations, the way lm-evaluation-harness does it.

Encoding follows the harness's HF model: trailing spaces of the context move to the
continuation, the pair is encoded whole and the context alone (no special tokens), the
continuation is the difference, and the input is the last max_length tokens of
context + continuation minus its last token. When every choice is one token after the
same context, one forward pass of the context scores all four; otherwise each choice is a
sequence of its own. Requests are batched, longest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Request:
    context: str
    continuations: list[str]


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool) -> tuple[list, list]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    continuation_ids = whole[len(context_ids) :]
    if add_bos or not context_ids:
        start = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
        context_ids = [start, *context_ids]
    return context_ids, continuation_ids


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _forward_last(model, rows: list[list[int]]) -> torch.Tensor:
    """Log-probabilities at the last position of each row (left-padded batch)."""
    device = _model_device(model)
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        logits_to_keep=1,
    ).logits[:, -1]
    return F.log_softmax(logits.float(), dim=-1).cpu()


def _forward_spans(model, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(summed log-probability, greedy?) of each continuation after its context."""
    device = _model_device(model)
    inputs = [(c + k)[:-1] for c, k in rows]
    width = max(len(x) for x in inputs)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(inputs):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    results = []
    for i, (context, continuation) in enumerate(rows):
        end = len(context) + len(continuation) - 1
        span = F.log_softmax(logits[i, end - len(continuation) : end].float(), dim=-1)
        target = torch.tensor(continuation, device=span.device)
        picked = span.gather(1, target[:, None]).squeeze(1)
        results.append((picked.sum().item(), bool((span.argmax(-1) == target).all())))
    return results


@torch.no_grad()
def score_requests(
    model,
    tokenizer,
    requests: list[Request],
    batch_size: int,
    max_length: int,
    add_bos: bool = False,
    progress=None,
) -> list[list[float]]:
    """Summed log-likelihood of every continuation of every request, in request order."""
    model.eval()
    encoded = []
    for request in requests:
        pairs = []
        for continuation in request.continuations:
            context_ids, continuation_ids = encode_pair(
                tokenizer, request.context, continuation, add_bos
            )
            overflow = len(context_ids) + len(continuation_ids) - (max_length + 1)
            pairs.append((context_ids[max(0, overflow) :], continuation_ids))  # keep the end
        encoded.append(pairs)
    scores: list[list[float] | None] = [None] * len(requests)
    fast = [
        i
        for i, pairs in enumerate(encoded)
        if all(len(k) == 1 for _, k in pairs) and len({tuple(c) for c, _ in pairs}) == 1
    ]
    slow = [i for i in range(len(requests)) if i not in set(fast)]
    fast.sort(key=lambda i: -len(encoded[i][0][0]))
    for start in range(0, len(fast), batch_size):
        chunk = fast[start : start + batch_size]
        log_probs = _forward_last(model, [encoded[i][0][0] for i in chunk])
        for row, i in enumerate(chunk):
            scores[i] = [log_probs[row, k[0]].item() for _, k in encoded[i]]
        if progress is not None:
            progress.update(len(chunk))
    flat = [(i, j) for i in slow for j in range(len(encoded[i]))]
    flat.sort(key=lambda ij: -sum(len(x) for x in encoded[ij[0]][ij[1]]))
    slow_scores: dict[tuple[int, int], float] = {}
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        results = _forward_spans(model, [encoded[i][j] for i, j in chunk])
        for (i, j), (total, _) in zip(chunk, results, strict=True):
            slow_scores[(i, j)] = total
    if progress is not None and slow:
        progress.update(len(slow))
    for i in slow:
        scores[i] = [slow_scores[(i, j)] for j in range(len(encoded[i]))]
    return scores  # type: ignore[return-value]


def auto_batch_size(model, probe_length: int, start: int = 64) -> int:
    """The largest power-of-two batch (<= start) whose forward pass fits on the GPU; 8 on CPU."""
    device = _model_device(model)
    if device.type != "cuda":
        return 8
    size = start
    while size >= 1:
        try:
            with torch.no_grad():
                _forward_last(model, [[0] * probe_length] * size)
            torch.cuda.empty_cache()
            return size
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            size //= 2
    return 1
