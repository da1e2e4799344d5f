"""Integrations of fastattn with other libraries. ``huggingface``: ``attn_implementation="fastattn"``
for transformers models (import it explicitly; transformers is an optional dependency)."""
