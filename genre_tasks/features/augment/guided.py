"""Guided greedy decoding for the local backend: each chat's structured reply in one pass, with
the key/value cache kept from one generated value to the next and the prompt prefix that every
chat shares (the system prompt) computed once per process.

It feeds the model the token sequences of the step-by-step reference,
:func:`engine.generate_structured` over ``backend.generate``. The reference generates value k
greedily after ``tokenize(prompt + literal_0 + value_0 + ... + literal_k)``. It stops at its stop
string, EOS or ``max_new_tokens``, and keeps the text before the first stop. It re-reads the whole
prompt for every value. Here:

* the prompts' common token prefix runs once; later batches reuse its keys/values when it is
  still a prefix of all their prompts. It is kept once, not copied per row: the model attends to
  it with :func:`cpu.prefix_attention` (one matrix product for the whole batch) and each row's
  cache holds only its own positions (:class:`cpu.GrowingCache`, written in place);
* the language-model head runs only for rows whose next token is not already known (a literal
  being fed);
* when a value ends, the row's text so far plus the next literal is tokenized as the reference
  tokenizes it. Cached tokens that differ from that (a token that ran past the stop string) are
  masked out. The rest of the sequence is fed one token per step ("forced"), then generation
  resumes. So each value is generated after exactly the reference's tokens;
* a row leaves the batch when its last value ends;
* a ``{{choice:...}}`` value (templates) is constrained greedy: each step takes the best token
  that keeps the value on the token path of one of the job's vocabulary values (and its stop
  string), values already chosen in the same JSON array excluded. The step-by-step path has no
  such constraint, so for choice values the two differ by design.

For free values, results equal the reference's up to float rounding: a padded batch and a cached prefix sum in
another order, which can only flip a near-tie of two tokens (the reference itself varies with
its batch's padding). ``tests/test_augment_guided.py`` checks the equality on a small model.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

MIN_PREFIX = 8  # shorter common prefixes are not worth a separate cache


@dataclass
class _Row:
    prompt: str  # chat text up to and including literals[0]
    literals: list[str]
    stops: list[str]
    tokens: list[int]  # the row's unmasked tokens in the cache, in order
    columns: list[int]  # their cache columns
    values: list[str] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)  # the current value's generated ids
    forced: list[int] = field(default_factory=list)
    masked: list[int] = field(default_factory=list)  # cache columns to mask out before the next feed
    n_generated: int = 0
    options: list = field(default_factory=list)  # per value: None (free) or the allowed strings
    paths: list | None = None  # a choice value: the token sequences (option + stop) still possible

    def start_choice(self, tokenizer, stop: str) -> None:
        """The token sequences of the current choice value's options, minus the values chosen
        before it in the same JSON array (no ']' in between: arrays hold unique values)."""
        v = len(self.values)
        taken = set()
        for j in range(v - 1, -1, -1):
            if "]" in "".join(self.literals[j + 1:v + 1]):
                break
            if self.options[j] is not None:
                taken.add(self.values[j])
        allowed = [o for o in self.options[v] if o not in taken] or list(self.options[v])
        self.paths = [tokenizer(o + stop, add_special_tokens=False)["input_ids"] for o in allowed]

    def text(self) -> str:
        out = self.literals[0]
        for value, literal in zip(self.values, self.literals[1:]):
            out += value + literal
        return out


class PrefixCache:
    """The keys/values of one token prefix (batch 1) per layer, kept between calls."""

    def __init__(self) -> None:
        self.ids: tuple[int, ...] = ()
        self.layers: list | None = None  # per layer: (keys, values), each [kv heads, P, head dim]

    def for_rows(self, model, rows: Sequence[Sequence[int]]):
        """(prefix length P, its per-layer keys/values, or None when P = 0) for a batch whose
        prompts are ``rows``; call it under ``torch.inference_mode``."""
        import torch

        usable = lambda ids: (self.layers is not None and len(ids) > len(self.ids)  # noqa: E731
                              and tuple(ids[:len(self.ids)]) == self.ids)
        if not all(usable(r) for r in rows):
            self.ids, self.layers = (), None
            n = min(len(r) for r in rows) - 1  # every row keeps >= 1 token for its own forward
            first = rows[0]
            p = 0
            while p < n and all(r[p] == first[p] for r in rows):
                p += 1
            if p < MIN_PREFIX:
                return 0, None
            from .cpu import GrowingCache

            out = model(input_ids=torch.tensor([list(first[:p])]), past_key_values=GrowingCache(),
                        use_cache=True, logits_to_keep=1)
            self.ids = tuple(first[:p])
            self.layers = [(layer.keys[0].contiguous(), layer.values[0].contiguous())
                           for layer in out.past_key_values.layers]
        return len(self.ids), self.layers


@contextlib.contextmanager
def _shared_prefix(model, layers):
    """The model's attention sees ``layers`` (PrefixCache) as every row's first positions."""
    from .cpu import attention_modules

    modules = attention_modules(model)
    if layers is not None and len(modules) != len(layers):  # the prefix would silently be missing
        raise RuntimeError(f"guided decoding: {len(layers)} cached layers but {len(modules)} attention modules found")
    try:
        for module, kv in zip(modules, layers or [None] * len(modules)):
            module.shared_prefix = kv
        yield
    finally:
        for module in modules:
            module.shared_prefix = None


def generate(model, tokenizer, prompts: Sequence[str], plans: Sequence[tuple[list[str], list[str]]],
             max_new_tokens: int, prefix: PrefixCache | None = None,
             ends: Counter | None = None, options: Sequence[Sequence] | None = None) -> list[tuple[str, int]]:
    """(reply text, generated tokens) per prompt. ``prompts[i]`` is the chat text up to the
    assistant's turn followed by ``plans[i]``'s first literal; ``plans[i]`` = (literals, stops)
    from :func:`templates.split_prefill` with at least one stop. ``max_new_tokens`` per value.
    ``ends`` counts how the values ended: ``stop``, ``eos`` or ``budget`` (cut at max_new_tokens).
    ``options[i][k]``: None, or the strings value k of prompt i must be one of (constrained
    greedy: at each step the best token that keeps the text on an ``option + stop`` path).
    The model attends with :func:`cpu.prefix_attention` (``cpu.use_prefix_attention``)."""
    import torch

    from .cpu import PREFIX_ATTENTION, use_prefix_attention

    if model.config._attn_implementation != PREFIX_ATTENTION:
        use_prefix_attention(model)  # SDPA for everything but the shared prefix
    for literals, stops in plans:
        if not stops or any(not lit for lit in literals[1:-1]):
            raise ValueError("guided decoding needs >= 1 generated value and a literal between values")
    if not prompts:
        return []
    end_ids = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    prefix = prefix if prefix is not None else PrefixCache()
    with torch.inference_mode():
        p, layers = prefix.for_rows(model, ids)
    rows = [_Row(prompt, list(literals), list(stops), list(r), [])
            for prompt, r, (literals, stops) in zip(prompts, ids, plans)]
    for i, row in enumerate(rows):
        row.options = list(options[i]) if options is not None else [None] * len(row.stops)
    results: list[tuple[str, int] | None] = [None] * len(rows)
    live = list(range(len(rows)))  # the batch position -> the prompt index
    with torch.inference_mode(), _shared_prefix(model, layers):
        cache, mask, scored, logits = _prefill(model, rows, p, pad)
        while live:
            best = dict(zip(scored, logits.argmax(-1).tolist())) if scored else {}
            feed, keep = [], []
            for b, i in enumerate(live):
                row = rows[i]
                if not row.forced and row.options[len(row.values)] is not None:
                    best[b] = _choose(row, logits[scored.index(b)], tokenizer)
                token = _step(row, best.get(b, -1), tokenizer, end_ids, max_new_tokens, ends)
                if token is None:
                    results[i] = (row.text(), row.n_generated)
                    continue
                for column in row.masked:
                    if column < 0:  # cannot happen: the prompt's tokens never change
                        raise RuntimeError("guided decoding: a shared prefix token would be masked")
                    mask[b, column] = False
                feed.append(token)
                keep.append(b)
            if not keep:
                break
            if len(keep) < len(live):
                index = torch.tensor(keep)
                cache.batch_select_indices(index)
                mask = mask[index]
                live = [live[b] for b in keep]
            column = mask.shape[1]
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=torch.bool)], dim=1)
            step_positions = []
            for i, token in zip(live, feed):
                row = rows[i]
                step_positions.append(len(row.tokens))
                row.tokens.append(token)
                row.columns.append(column)
            cache, scored, logits = _forward(model, [not rows[i].forced for i in live],
                                             input_ids=torch.tensor(feed)[:, None],
                                             attention_mask=mask[:, None, None, :],
                                             position_ids=torch.tensor(step_positions)[:, None],
                                             past_key_values=cache)
    return results  # type: ignore[return-value]


def _prefill(model, rows: Sequence[_Row], p: int, pad: int):
    """The rows' prompts after the shared prefix of length ``p``, left-padded into one forward:
    (cache, mask [rows, width], scored positions, logits). Sets each row's cache columns."""
    import torch

    from .cpu import GrowingCache

    width = max(len(r.tokens) - p for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)  # the rows' own cache columns
    for b, row in enumerate(rows):
        tail = row.tokens[p:]
        start = width - len(tail)
        input_ids[b, start:] = torch.tensor(tail)
        positions[b, start:] = torch.arange(p, len(row.tokens))
        mask[b, start:] = True
        row.columns = [-1] * p + list(range(start, width))  # -1: the shared prefix (never masked)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    cache, scored, logits = _forward(model, [True] * len(rows), input_ids=input_ids, position_ids=positions,
                                     attention_mask=mask[:, None, None, :] & causal,
                                     past_key_values=GrowingCache())
    return cache, mask, scored, logits


def _forward(model, scores: Sequence[bool], **inputs):
    """(cache, the rows b with ``scores[b]``, their next-token logits): the language-model head
    (a fifth of a decode step) runs only for rows whose next token is not already known."""
    out = model.get_decoder()(**inputs, use_cache=True)
    scored = [b for b, s in enumerate(scores) if s]
    hidden = out.last_hidden_state[scored, -1] if scored else None
    return out.past_key_values, scored, (model.get_output_embeddings()(hidden) if scored else None)


def _choose(row: _Row, logits, tokenizer) -> int:
    """The best next token of a choice value among those its remaining options allow."""
    if row.paths is None:
        row.start_choice(tokenizer, row.stops[len(row.values)])
    k = len(row.generated)
    allowed = sorted({path[k] for path in row.paths if len(path) > k})
    if not allowed:  # cannot happen: every path ends with the stop string, which ends the value
        return int(logits.argmax())
    token = allowed[int(logits[allowed].argmax())]
    row.paths = [path for path in row.paths if len(path) > k and path[k] == token]
    return token


def _step(row: _Row, best: int, tokenizer, end_ids: set[int], max_new_tokens: int,
          ends: Counter | None) -> int | None:
    """The token the row feeds next (``row.masked`` = cache columns to mask out first), or None
    when its last value has ended."""
    row.masked = []
    if row.forced:
        return row.forced.pop(0)
    stop = row.stops[len(row.values)]
    if best in end_ids:
        value, why = tokenizer.decode(row.generated, skip_special_tokens=True), "eos"
    else:
        row.generated.append(best)
        row.n_generated += 1
        text = tokenizer.decode(row.generated, skip_special_tokens=True)
        at = text.find(stop) if stop else -1
        open_path = row.paths is not None and any(len(path) > len(row.generated) for path in row.paths)
        if at < 0 and (len(row.generated) < max_new_tokens or open_path):  # an option is never cut
            return best
        value, why = (text, "budget") if at < 0 else (text[:at], "stop")
    if ends is not None:
        ends[why] += 1
    row.values.append(value)
    row.generated = []
    row.paths = None
    if len(row.values) == len(row.stops):
        return None
    # realign to the reference: the tokens of the text so far plus the next literal
    ref = tokenizer(row.prompt + row.text()[len(row.literals[0]):], add_special_tokens=False)["input_ids"]
    d = 0
    while d < min(len(ref), len(row.tokens)) and ref[d] == row.tokens[d]:
        d += 1
    row.masked = row.columns[d:]
    del row.tokens[d:], row.columns[d:]
    row.forced = ref[d:]
    if not row.forced:  # cannot happen: the fed tokens never reach past the stop, the literal is not empty
        raise RuntimeError(f"guided decoding: nothing to feed after value {len(row.values)} of {row.prompt[-80:]!r}")
    return row.forced.pop(0)
