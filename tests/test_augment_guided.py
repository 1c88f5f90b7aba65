"""The local backend's guided pass (genre_tasks/features/augment/guided.py) against its
reference, one batched ``generate`` per value, on a tiny random Llama with a BPE tokenizer
trained here (fast: no packaged model is loaded)."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from genre_tasks.features.augment import cpu, engine, guided, templates
from genre_tasks.features.augment.backends import LocalBackend

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CORPUS = [
    'You describe catalogue items for a recommender. Reply with one JSON object only.',
    '{"summary": "A film about a toy that comes alive.", "genres": ["Comedy"]}',
    '{"topics": ["Drama", "Horror"], "profile": "Likes dark and funny stories."}',
    'The quick brown fox jumps over the lazy dog; "quoted", [bracketed] and {braced} text.',
    'Toy Story (1995) GoldenEye (1995) Four Rooms (1995) Get Shorty (1995) Copycat (1995)',
]
TEMPLATE = "{{gen:\"}}\", \"b\": [\"{{gen:\"}}\"], \"c\": \"{{gen:.}}."


def tiny(seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.padding_side = "left"
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():  # peaked, and stop strings and EOS likelier: values end all three ways
        model.lm_head.weight.mul_(8.0)
        ends = [i for t, i in tok.get_vocab().items() if set(tok.convert_tokens_to_string([t])) & set('".')]
        model.lm_head.weight[ends + [tok.eos_token_id]] *= 3.0
    return tok, model


class TinyBackend(LocalBackend):
    def __init__(self, tok, model, guided_pass: bool = True):
        self.tok, self.model, self.guided_pass = tok, model, guided_pass
        self.model_id, self.threads, self.quantize = "tiny", 1, "none"
        import threading

        self._lock, self._prefix, self.ends = threading.Lock(), guided.PrefixCache(), Counter()

    def load(self):
        return self.tok, self.model

    def __getattribute__(self, name):
        if name == "generate_guided" and not object.__getattribute__(self, "guided_pass"):
            raise AttributeError(name)
        return object.__getattribute__(self, name)


def chats(n: int, system: str = "You describe catalogue items for a recommender. Reply with JSON."):
    titles = ["Toy Story (1995)", "GoldenEye", "Four Rooms (1995) and a much longer title here",
              "Get Shorty", "Copycat (1995)", "A", "The quick brown fox", "Jumps over \"the\" dog"]
    return [([{"role": "system", "content": system}, {"role": "user", "content": titles[k % len(titles)]}],
             '{"a": "' + TEMPLATE) for k in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_guided_pass_equals_one_generate_per_value(seed):
    tok, model = tiny(seed)
    fast, ref = TinyBackend(tok, model), TinyBackend(tok, model, guided_pass=False)
    batch = chats(6)
    want = [r.text for r in engine.generate_structured(ref, batch, 7)]
    assert [r.text for r in engine.generate_structured(fast, batch, 7)] == want
    assert fast._prefix is not None and len(fast._prefix.ids) >= guided.MIN_PREFIX  # the system prompt
    kept = fast._prefix.layers
    # one at a time (no padding) and in another batch: the same replies, from the same prefix cache
    assert [engine.generate_structured(fast, [c], 7)[0].text for c in batch[:3]] == want[:3]
    assert [r.text for r in engine.generate_structured(fast, batch[2:], 7)] == want[2:]
    assert fast._prefix.layers is kept
    # another system prompt: the prefix is recomputed and the replies still equal the reference
    other = chats(4, system="Another system prompt, so another shared prefix.")
    assert [r.text for r in engine.generate_structured(fast, other, 7)] == \
        [r.text for r in engine.generate_structured(ref, other, 7)]
    assert fast._prefix.layers is not kept


def test_values_end_by_stop_by_eos_and_by_budget_alike():
    """Over a few seeds each way a value can end occurs, and every reply still equals the reference."""
    ends = Counter()
    for seed in range(4):
        tok, model = tiny(seed)
        fast, ref = TinyBackend(tok, model), TinyBackend(tok, model, guided_pass=False)
        batch = chats(8)
        assert [r.text for r in engine.generate_structured(fast, batch, 5)] == \
            [r.text for r in engine.generate_structured(ref, batch, 5)]
        ends += fast.ends
    assert sum(ends.values()) == 4 * 8 * 3 and set(ends) == {"stop", "eos", "budget"}, ends


def test_guided_refuses_adjacent_values():
    tok, model = tiny(0)
    with pytest.raises(ValueError, match="literal between"):
        guided.generate(model, tok, ["x"], [(["", "", ""], ['"', '"'])], 3)


def test_choice_values_come_from_the_vocabulary_and_are_unique_within_their_array():
    vocab = ("Comedy", "Drama", "Horror", "Sci-Fi", "Film-Noir")
    prefill = '{"topics": ["{{choice:"}}", "{{choice:"}}"], "profile": "{{gen:"}}", "genres": ["{{choice:"}}"]}'
    assert templates.choice_values(prefill) == [True, True, False, True]
    picked = Counter()
    for seed in range(3):
        tok, model = tiny(seed)
        fast = TinyBackend(tok, model)
        batch = [(messages, prefill) for messages, _ in chats(8)]
        replies = engine.generate_structured(fast, batch, 6, [vocab] * len(batch))
        for r in replies:
            obj = json.loads(r.text)  # the literals are the program's: always JSON when values hold no quote
            assert set(obj["topics"]) <= set(vocab) and len(set(obj["topics"])) == 2, obj
            assert obj["genres"][0] in vocab, obj
            picked.update(obj["topics"] + obj["genres"])
        # without the vocabulary: free text (this random model then writes no vocabulary value)
        free = [r.text for r in engine.generate_structured(fast, batch, 6)]
        assert not any(f'["{v}"' in text for text in free for v in vocab), free
    assert len(picked) >= 2, picked  # the model's preferences decide, not a fixed first option


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_decode_linear_computes_what_linear_computes(rows):
    """W @ x.T for few rows, F.linear for many: the same values, shape and bias either way."""
    torch.manual_seed(rows)
    for bias in (True, False):
        plain = torch.nn.Linear(24, 40, bias=bias)
        fast = torch.nn.Linear(24, 40, bias=bias)
        fast.load_state_dict(plain.state_dict())
        assert cpu.use_decode_linears(torch.nn.Sequential(fast)) == 1 and type(fast) is cpu.DecodeLinear
        x = torch.randn(rows, 24)
        for shaped in (x, x.view(1, rows, 24)):
            want, got = plain(shaped), fast(shaped)
            assert got.shape == want.shape and got.is_contiguous()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 300])
def test_w8a8_linear_is_close_to_linear_and_a_row_never_depends_on_its_batch(rows):
    """augment.quantize w8a8: int8 weights per output channel x int8 activations per row. The
    error is int8 rounding only, and a row's output is bitwise the same alone, in any batch and
    in any shape (the dynamic int8 it replaced scaled the activations per batch, so a reply
    depended on the other prompts of its batch and on their padding)."""
    torch.manual_seed(rows)
    for bias in (True, False):
        plain = torch.nn.Linear(48, 40, bias=bias)
        net = torch.nn.Sequential(plain)
        assert cpu.use_w8a8_linears(net) == 1 and type(net[0]) is cpu.W8A8Linear
        quant = net[0]
        x = torch.randn(rows, 48) * torch.logspace(-2, 2, rows)[:, None]  # rows of very different scales
        want, got = plain(x), quant(x)
        assert got.shape == want.shape and got.dtype == want.dtype
        error = (got - want).norm(dim=1) / want.norm(dim=1)
        assert float(error.max()) < 0.02, error.max()
        for i in {0, rows // 2, rows - 1}:
            assert torch.equal(quant(x[i:i + 1]), got[i:i + 1])
            assert torch.equal(quant(torch.cat([x[i:i + 1], 1e3 * x])[:1]), got[i:i + 1])  # a loud batch
        assert torch.equal(quant(x.view(1, rows, 48)), got.view(1, rows, 40))
    kept = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    assert cpu.use_w8a8_linears(kept, skip=("1",)) == 1
    assert type(kept[0]) is cpu.W8A8Linear and type(kept[1]) is torch.nn.Linear


def test_fast_path_cache_and_shared_prefix_attention_match_the_plain_model():
    """The guided pass's forward (decode linears, the shared prefix attended once, a cache that
    grows in place and loses finished rows) gives the plain model's next-token logits: a padded
    prompt batch, then 80 greedy steps (past the cache's spare room), rows leaving midway."""
    tok, plain = tiny(3)
    _, fast = tiny(3)
    assert cpu.use_decode_linears(fast) > 0
    cpu.use_prefix_attention(fast)
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) + p for m, p in chats(5)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    prefix = guided.PrefixCache()
    rows = [guided._Row(t, [], [], list(r), []) for t, r in zip(texts, ids)]
    enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    seqs, masks = enc["input_ids"], enc["attention_mask"]
    with torch.inference_mode():
        p, layers = prefix.for_rows(fast, ids)
        assert p >= guided.MIN_PREFIX
        with guided._shared_prefix(fast, layers):
            cache, mask, scored, logits = guided._prefill(fast, rows, p, tok.pad_token_id)
            assert scored == list(range(5))
            live = list(range(5))
            for step in range(80):
                want = plain(input_ids=seqs, attention_mask=masks).logits[:, -1]
                torch.testing.assert_close(logits, want, rtol=1e-6, atol=1e-6)  # double: rounding only
                nxt = want.argmax(-1)
                if step in (20, 50):  # the first / last row finishes
                    keep = [1, 2, 3, 4] if step == 20 else [0, 1, 2]
                    cache.batch_select_indices(torch.tensor(keep))
                    mask, seqs, masks, nxt = mask[keep], seqs[keep], masks[keep], nxt[keep]
                    live = [live[k] for k in keep]
                seqs = torch.cat([seqs, nxt[:, None]], dim=1)
                masks = torch.cat([masks, torch.ones_like(nxt)[:, None]], dim=1)
                mask = torch.cat([mask, torch.ones((len(live), 1), dtype=torch.bool)], dim=1)
                positions = torch.tensor([[len(ids[i]) + step] for i in live])
                cache, scored, logits = guided._forward(fast, [True] * len(live), input_ids=nxt[:, None],
                                                        attention_mask=mask[:, None, None, :],
                                                        position_ids=positions, past_key_values=cache)
    assert cache.layers[0].keys.shape[2] > cpu.SPARE  # the cache grew past its first room


def test_backends_on_one_model_share_its_lock():
    """The guided pass sets the shared prefix on the model's modules while it runs, so two
    backends of one loaded model must not generate at once: they share one lock."""
    a, b = LocalBackend(), LocalBackend()
    assert a._lock is b._lock
    assert LocalBackend(quantize="w8a8")._lock is not a._lock  # another loaded model
