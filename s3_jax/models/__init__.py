"""Models and checkpoint conversion (`gguf_export`: GGUF -> plain Hugging Face folder)."""
