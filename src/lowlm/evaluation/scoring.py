"""Log-likelihood scoring of multiple-choice continuations, the way lm-evaluation-harness does it.

Encoding follows the harness's HF model: trailing spaces of the context move to the
continuation, the pair is encoded whole and the context alone (no special tokens), the
continuation is the difference, and the input is the last max_length tokens of
context + continuation minus its last token. When every choice is one token after the
same context, one forward pass of the context scores all four; otherwise each choice is a
sequence of its own. Requests are batched, longest first.

Two things the harness does not do, which change no score beyond float rounding:
- all texts are tokenised in one batched call of the fast tokenizer, not one by one;
- requests of one `group` (a subject: the same description and few-shot examples) share
  the key/value cache of their longest common token prefix, computed once; each question
  then runs only its own tokens (most of a 5-shot prompt is the shared prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowlm.models.load import start_id


@dataclass
class Request:
    context: str
    continuations: list[str]
    group: str | None = None  # requests that share a prompt prefix (a subject's few-shot text)


# A group's cache is used when its shared prefix is at least this share of its prompts
# (5-shot: most of each prompt; 0-shot: only the description, where batching questions of
# every subject together by length is faster than a cache per subject, measured).
MIN_SHARED_SHARE = 0.5
MIN_SHARED_PREFIX = 8  # tokens


def _split_spaces(context: str, continuation: str) -> tuple[str, str]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        return context[:-spaces], context[-spaces:] + continuation
    return context, continuation


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool) -> tuple[list, list]:
    context, continuation = _split_spaces(context, continuation)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    continuation_ids = whole[len(context_ids) :]
    if add_bos or not context_ids:
        context_ids = [start_id(tokenizer), *context_ids]
    return context_ids, continuation_ids


def encode_requests(tokenizer, requests: list[Request], add_bos: bool) -> list[list[tuple]]:
    """encode_pair for every choice of every request, in two batched tokenizer calls."""
    contexts, wholes, index = [], [], []
    for i, request in enumerate(requests):
        for j, continuation in enumerate(request.continuations):
            context, moved = _split_spaces(request.context, continuation)
            contexts.append(context)
            wholes.append(context + moved)
            index.append((i, j))
    if not contexts:
        return [[] for _ in requests]
    context_ids = tokenizer(contexts, add_special_tokens=False)["input_ids"]
    whole_ids = tokenizer(wholes, add_special_tokens=False)["input_ids"]
    encoded: list[list[tuple]] = [[] for _ in requests]
    start = start_id(tokenizer)
    for (i, _), ctx, whole in zip(index, context_ids, whole_ids, strict=True):
        continuation = whole[len(ctx) :]
        if add_bos or not ctx:
            ctx = [start, *ctx]
        encoded[i].append((list(ctx), list(continuation)))
    return encoded


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


def _common_prefix(rows: list[list[int]]) -> int:
    first = rows[0]
    length = min(len(r) for r in rows) - 1  # every row keeps at least one token of its own
    for row in rows[1:]:
        n = 0
        while n < length and row[n] == first[n]:
            n += 1
        length = n
    return max(length, 0)


def _forward_last_cached(model, prefix_cache, prefix_len: int, suffixes: list[list[int]]):
    """Log-probabilities after each suffix, on top of a shared prefix's key/value cache.

    Suffixes are left-padded so that every row ends at the last position; the padding sits
    between the prefix and the suffix and is masked out, and position ids continue from the
    prefix, so each row computes exactly what the whole prompt would."""
    import copy

    device = _model_device(model)
    width = max(len(r) for r in suffixes)
    ids = torch.zeros((len(suffixes), width), dtype=torch.long)
    mask = torch.zeros((len(suffixes), prefix_len + width), dtype=torch.long)
    positions = torch.zeros((len(suffixes), width), dtype=torch.long)
    mask[:, :prefix_len] = 1
    for i, row in enumerate(suffixes):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, prefix_len + width - len(row) :] = 1
        positions[i, width - len(row) :] = torch.arange(prefix_len, prefix_len + len(row))
    cache = copy.deepcopy(prefix_cache)
    cache.batch_repeat_interleave(len(suffixes))
    logits = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=True,
        logits_to_keep=1,
        **{_cache_argument(model): cache},
    ).logits[:, -1]
    return F.log_softmax(logits.float(), dim=-1).cpu()


def _cache_argument(model) -> str:
    """The forward argument that takes a key/value cache: `cache` in recent transformers 5
    releases, `past_key_values` before (and in models with their own code)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _score_group_cached(model, rows: list[list[int]], batch_size: int) -> torch.Tensor | None:
    """Last-position log-probabilities of rows that share a long token prefix, or None when
    their common prefix is too short to be worth a cache."""
    prefix_len = _common_prefix(rows)
    mean_length = sum(len(r) for r in rows) / len(rows)
    if len(rows) < 2 or prefix_len < max(MIN_SHARED_PREFIX, MIN_SHARED_SHARE * mean_length):
        return None
    device = _model_device(model)
    prefix = torch.tensor([rows[0][:prefix_len]], device=device)
    output = model(input_ids=prefix, use_cache=True)
    prefix_cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
    if prefix_cache is None:
        return None
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    results: dict[int, torch.Tensor] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        log_probs = _forward_last_cached(
            model, prefix_cache, prefix_len, [rows[i][prefix_len:] for i in chunk]
        )
        for row, i in enumerate(chunk):
            results[i] = log_probs[row]
    return torch.stack([results[i] for i in range(len(rows))])


@torch.no_grad()
def score_requests(
    model,
    tokenizer,
    requests: list[Request],
    batch_size: int,
    max_length: int,
    add_bos: bool = False,
    progress=None,
    prefix_cache: bool = True,
) -> list[list[float]]:
    """Summed log-likelihood of every continuation of every request, in request order."""
    model.eval()
    encoded = []
    for pairs in encode_requests(tokenizer, requests, add_bos):
        kept = []
        for context_ids, continuation_ids in pairs:
            overflow = len(context_ids) + len(continuation_ids) - (max_length + 1)
            kept.append((context_ids[max(0, overflow) :], continuation_ids))  # keep the end
        encoded.append(kept)
    scores: list[list[float] | None] = [None] * len(requests)
    fast = [
        i
        for i, pairs in enumerate(encoded)
        if all(len(k) == 1 for _, k in pairs) and len({tuple(c) for c, _ in pairs}) == 1
    ]
    slow = [i for i in range(len(requests)) if i not in set(fast)]
    if prefix_cache:
        groups: dict[str, list[int]] = {}
        for i in fast:
            if requests[i].group is not None:
                groups.setdefault(requests[i].group, []).append(i)
        for members in groups.values():
            log_probs = _score_group_cached(model, [encoded[i][0][0] for i in members], batch_size)
            if log_probs is None:
                continue
            for row, i in enumerate(members):
                scores[i] = [log_probs[row, k[0]].item() for _, k in encoded[i]]
            if progress is not None:
                progress.update(len(members))
        fast = [i for i in fast if scores[i] is None]
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
