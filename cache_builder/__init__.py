"""Phase 1: run the frozen VLM once and write its KV prefix to a cache store."""
