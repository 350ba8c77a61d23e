"""Loading real pretrained teachers from local files: Hugging Face folders and GGUF files."""
