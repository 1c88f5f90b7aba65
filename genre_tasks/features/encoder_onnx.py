"""ONNX Runtime item encoder: ``embed.quantize`` = ``onnx`` | ``onnx-int8-attention`` |
``onnx-int8-no-ffn-out`` | ``onnx-int8``.

The embed stage's local encoder folder (all-MiniLM-L6-v2 by default) is exported once to ONNX
with ``torch.onnx.export`` (the TorchScript exporter, ``dynamo=False``, opset 17, dynamic batch
and sequence axes; inputs ``input_ids`` / ``attention_mask`` int64 [B, L], output
``last_hidden_state`` float32 [B, L, d]) and, for the int8 variants, quantized with
``onnxruntime.quantization.quantize_dynamic`` (int8 weights per output channel, uint8
activations quantized per batch at run time):

``onnx``                 float32 graph (ONNX Runtime instead of torch, same weights)
``onnx-int8-attention``  only the attention projections' MatMuls (query, key, value, attention
                         output) are int8, as ``int8-attention`` does in torch
``onnx-int8-no-ffn-out`` every MatMul with a weight but the feed-forward output projection
                         (d_ff -> d, whose GELU input has the outliers that int8 loses)
``onnx-int8``            every MatMul with a weight (the feed-forward ones too)

Only the encoder runs in ONNX Runtime: the output is mean-pooled over the attention mask and
L2-normalised by exactly the code of the torch path (:func:`genre_tasks.features.embed.encode_texts`),
because :class:`OrtEncoder` answers the same call as the Hugging Face model.

Files are derived artifacts, written atomically under the stage's ``.cache/encoders``
(``Paths.encoder_cache``; elsewhere ``$GENRE_ENCODER_CACHE``, default ``./.cache/encoders``) in a
folder keyed by the model folder's digest, the export recipe and the torch / onnxruntime versions:
``model.onnx``, ``model.int8-attention.onnx``, ``model.int8.onnx``. Nothing is downloaded; a
second load reuses the files without loading the torch weights.

Requires the ``onnx`` extra (``pip install -e .[onnx]``: onnx, onnxruntime).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from genre_tasks import io, logs
from genre_tasks.errors import StageError

logger = logging.getLogger("genre.embed")

#: embed.quantize values served by ONNX Runtime -> weight-carrying MatMuls made int8
#: (None: none; "attention": the attention block's; "no-ffn-out": all but the feed-forward
#: output projections; "all": every one)
VARIANTS = {"onnx": None, "onnx-int8-attention": "attention", "onnx-int8-no-ffn-out": "no-ffn-out",
            "onnx-int8": "all"}
#: Bumped whenever the export or quantization recipe changes (part of the artifact folder key).
EXPORT_RECIPE = "torchscript-export/opset17/eager-attention+quantize_dynamic/qint8/per-channel/v1"
OPSET = 17
#: Environment variable naming the artifact folder (default: ``.cache/encoders``).
CACHE_ENV = "GENRE_ENCODER_CACHE"


def _require_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise StageError("embed.quantize onnx*: onnxruntime is not installed; install the project's "
                         "onnx extra (pip install -e '.[onnx]')") from exc
    return onnxruntime


def cache_root(root: str | Path | None = None) -> Path:
    """Folder of the exported/quantized encoders: ``root`` if given, else
    ``$GENRE_ENCODER_CACHE``, else ``./.cache/encoders`` (absolute)."""
    return Path(root or os.environ.get(CACHE_ENV) or Path(".cache") / "encoders").resolve()


def artifact_dir(digest: str, root: str | Path | None = None) -> Path:
    """``cache_root(root)/<key>``: key = sha1(model digest, recipe, torch and onnxruntime versions)."""
    import torch

    ort = _require_ort()
    key = f"{digest}|{EXPORT_RECIPE}|torch={torch.__version__}|onnxruntime={ort.__version__}"
    return cache_root(root) / hashlib.sha1(key.encode()).hexdigest()[:20]


def onnx_file(path: str, digest: str, variant: str, root: str | Path | None = None) -> Path:
    """The ONNX file of ``variant`` (see VARIANTS) for the model folder ``path`` under
    ``cache_root(root)``; exported (and quantized) on first use, then reused."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ONNX variant {variant!r}; one of {list(VARIANTS)}")
    folder = artifact_dir(digest, root)
    fp32 = folder / "model.onnx"
    if not fp32.is_file():
        _export(path, fp32)
    scope = VARIANTS[variant]
    if scope is None:
        return fp32
    target = folder / f"model.{variant.removeprefix('onnx-')}.onnx"
    if not target.is_file():
        _quantize(fp32, target, scope)
    return target


def _export(path: str, target: Path) -> None:
    import torch
    from transformers import AutoModel

    logger.info("embed: exporting %s to ONNX -> %s", path, target)
    # eager attention: a plain MatMul/Softmax graph (the SDPA one traces in NaN guards)
    with logs.hf_quiet():
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                          attn_implementation="eager").eval()

    class _Hidden(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    # an example with padding, so the mask path is what gets traced
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 2178, 102, 0, 0, 0]])
    mask = (ids != 0).to(torch.int64)
    axes = {0: "batch", 1: "sequence"}
    with io.atomic_path(target) as tmp, warnings.catch_warnings(), torch.inference_mode(False), \
            torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation + tracer notes
        torch.onnx.export(_Hidden(model), (ids, mask), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], do_constant_folding=True,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                        "last_hidden_state": axes})


def weight_matmuls(model_file: Path, scope: str) -> list[str]:
    """Names of the MatMul nodes of ``model_file`` whose second input is a weight (an
    initializer): all of them (``scope="all"``), those of the attention blocks
    (``"attention"``) or all but the feed-forward output projections (``"no-ffn-out"``; BERT
    naming: ``.../layer.N/output/dense/MatMul``, the attention's is ``.../attention/output/...``)."""
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    every = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    names = {"all": every,
             "attention": [n for n in every if "/attention/" in n],
             "no-ffn-out": [n for n in every if "/attention/" in n or "/output/dense/" not in n]}[scope]
    if not names or (scope != "all" and len(names) == len(every)):
        raise StageError(f"embed: cannot select the {scope} MatMuls of {model_file} (quantizing "
                         f"{len(names)} of {len(every)}); is it a BERT-style encoder?")
    return names


def _quantize(fp32: Path, target: Path, scope: str) -> None:
    _require_ort()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logger.info("embed: int8 dynamic quantization (%s MatMuls) -> %s", scope, target)
    hint = _DropHint()  # quantize_dynamic advises pre-processing on the root logger (tried: same vectors)
    logging.getLogger().addFilter(hint)
    try:
        with io.atomic_path(target) as tmp:
            quantize_dynamic(str(fp32), str(tmp), per_channel=True, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul"],
                             nodes_to_quantize=weight_matmuls(fp32, scope))
    finally:
        logging.getLogger().removeFilter(hint)


class _DropHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


class OrtEncoder:
    """An ONNX Runtime session answering like the Hugging Face model: ``enc(input_ids=...,
    attention_mask=...)`` -> object with ``last_hidden_state`` (torch float32 [B, L, d]);
    ``attention_mask=None`` means no padding. ``config`` is the model folder's config."""

    def __init__(self, model_file: Path, config: Any, threads: int) -> None:
        ort = _require_ort()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # ORT's threads spin while waiting, like OpenMP's by default; follow OMP_WAIT_POLICY so
        # both back-ends wait the same way (PASSIVE is what a shared, loaded machine wants)
        passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0" if passive else "1")
        self.session = ort.InferenceSession(str(model_file), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self.model_file = model_file
        self.config = config
        self.threads = threads

    def __call__(self, input_ids: Any, attention_mask: Any = None) -> types.SimpleNamespace:
        import torch

        ids = input_ids.numpy() if hasattr(input_ids, "numpy") else np.asarray(input_ids)
        mask = (np.ones_like(ids) if attention_mask is None else
                attention_mask.numpy() if hasattr(attention_mask, "numpy") else np.asarray(attention_mask))
        feed = {"input_ids": ids.astype(np.int64, copy=False),
                "attention_mask": mask.astype(np.int64, copy=False)}
        (hidden,) = self.session.run(["last_hidden_state"], feed)
        return types.SimpleNamespace(last_hidden_state=torch.from_numpy(hidden))


def load(path: str, digest: str, variant: str, threads: int,
         root: str | Path | None = None) -> tuple[Any, OrtEncoder]:
    """(tokenizer, :class:`OrtEncoder` with ``threads`` intra-op threads) for the model folder
    ``path`` (content ``digest``), files under ``cache_root(root)``; memoised per (folder,
    variant, threads, cache root)."""
    return _load(path, digest, variant, threads, str(cache_root(root)))


@functools.lru_cache(maxsize=4)
def _load(path: str, digest: str, variant: str, threads: int, root: str) -> tuple[Any, OrtEncoder]:
    _require_ort()
    from transformers import AutoConfig, AutoTokenizer

    model_file = onnx_file(path, digest, variant, root)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return tokenizer, OrtEncoder(model_file, config, threads)


__all__ = ["CACHE_ENV", "OrtEncoder", "VARIANTS", "artifact_dir", "cache_root", "load", "onnx_file",
           "weight_matmuls"]
