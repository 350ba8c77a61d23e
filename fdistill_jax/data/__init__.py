"""Tasks, tokenizers and input pipelines."""
