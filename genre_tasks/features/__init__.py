"""features layer: embed (item text -> vectors), genre (genre classifier) and augment (GENRE's
generative augmentation with an LLM)."""
