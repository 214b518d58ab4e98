"""epd-bench: a serving benchmark for OpenAI-compatible chat servers (ours and vLLM alike)."""
