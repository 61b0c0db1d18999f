"""Convert THUDM's original ChatGLM checkpoints into directories transformers 5 loads without remote code."""
