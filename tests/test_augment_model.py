"""augment with the real SmolLM2-135M GGUF (slow: ~15-40 s to load, a few short generations)."""
from __future__ import annotations

import threading

import pytest

from genre_tasks.features.augment import server as llm_server
from genre_tasks.features.augment import stage
from genre_tasks.features.augment.backends import HttpBackend, LocalBackend
from test_augment import INJECTED, params, write_processed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local():
    backend = LocalBackend(threads=1)
    backend.load()
    return backend


def test_real_model_stage_validates_caches_and_resists_injection(tmp_path, local):
    paths = write_processed(tmp_path, ["Toy Story (1995)", INJECTED], {"u1": [0]})
    p = params(operations=["enrich_items"], batch_size=2, max_new_tokens=12, max_repairs=0)
    first = stage.run(p, paths, backend=local)
    op = first["per_operation"]["enrich_items"]
    assert op["generated"] == 2 and op["tokens"] > 0 and op["accepted"] + op["rejected"] == 2
    records = [r for r in stage.GenerationCache(stage.AugmentPaths(paths).cache).load().values()]
    assert {r["model_id"] for r in records} == {local.model_id} and all(r["attempts"] for r in records)
    import pandas as pd

    items = pd.read_parquet(paths / "data" / "augment" / "items.parquet")
    for row in items.itertuples(index=False):  # whatever was accepted is schema-valid data
        assert row.genres.tolist()[0] in {"Comedy", "Drama", "Horror"}
        assert "PWNED" not in row.summary and row.text.startswith("[generated] ")
    again = stage.run(p, paths, backend=local)
    assert again["generations_this_run"] == 0 and again["cached"] == 2


def test_http_backend_against_llm_serve_with_the_real_model(local):
    srv = llm_server.serve(local, "127.0.0.1", 0, batch_size=2, batch_wait=0.2)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        http = HttpBackend(f"http://127.0.0.1:{srv.server_address[1]}/v1", local.model_id, timeout=120,
                           retries=0, concurrency=2)
        chats = [([{"role": "user", "content": f"Name a colour number {k}."}], "The colour is") for k in (1, 2)]
        replies = http.generate(chats, 6)
        direct = local.generate(chats, 6)
        assert all(r.tokens > 0 and r.text for r in replies)
        assert [r.text for r in replies] == [d.text for d in direct]  # greedy: same text via HTTP
        assert srv.batcher.max_batch == 2  # the two requests were generated as one batch
    finally:
        srv.shutdown()
        srv.server_close()


def test_w8a8_local_backend_is_its_own_model_and_generates(tmp_path):
    """augment.quantize w8a8: every Linear layer but the MLP output projections (the
    language-model head too) becomes a W8A8Linear, the cache key's model id differs from
    float32's (no float32 reply is reused for it), and it still generates schema-checked data
    through the stage."""
    import torch

    from genre_tasks.config import ParamsError
    from genre_tasks.features.augment.cpu import W8A8_FLOAT_LAYERS, W8A8Linear

    fp32, w8a8 = LocalBackend(threads=1), LocalBackend(threads=1, quantize="w8a8")
    assert w8a8.model_id == fp32.model_id + "+w8a8"
    _, model = w8a8.load()
    assert isinstance(model.get_output_embeddings(), W8A8Linear)
    assert sum(type(m) is W8A8Linear for m in model.modules()) == 6 * model.config.num_hidden_layers + 1
    floats = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(floats) == model.config.num_hidden_layers and all(n.endswith(W8A8_FLOAT_LAYERS) for n in floats)
    assert model.get_input_embeddings().weight.dtype == torch.float32  # the embedding table stays
    paths = write_processed(tmp_path, ["Toy Story (1995)"], {"u1": [0]})
    p = params(operations=["enrich_items"], batch_size=1, max_new_tokens=12, max_repairs=0, quantize="w8a8")
    out = stage.run(p, paths)
    op = out["per_operation"]["enrich_items"]
    assert out["model_id"] == w8a8.model_id and op["generated"] == 1 and op["tokens"] > 0
    for bad in ("int8", "int4"):
        with pytest.raises(ParamsError, match="augment.quantize"):
            params(quantize=bad).validate()
