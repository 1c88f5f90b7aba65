"""GENRE generative augmentation (Liu et al., 2023) for any item domain.

backends     local SmolLM2 GGUF (transformers) | OpenAI-compatible HTTP
templates    prompt files under prompts/ with a version string
validation   JSON schema per operation (vocabulary-restricted genres, length bounds), injection check
cache        (model id, template version, input hash) -> generation, append-only, resumable
engine       cache -> batched generation -> validate -> repair -> accept / reject
stage        the `augment` stage (enrich_items, profile_users, synthesize_cold_users)
server       `genre llm-serve`: an OpenAI-compatible server around the local model
use          how downstream stages consume the outputs (embed text, user pseudo-items)
reasons      LLM-phrased recommendation reasons grounded in the deterministic facts
"""
