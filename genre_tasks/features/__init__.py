"""Features of items and users: the language-model side of the pipeline (the LLM augmentation
today; embed and genre move here with the layered layout)."""
