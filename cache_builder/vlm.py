"""The frozen VLM, from shared.vlm (head-eval --live runs it too); kept here so cache_builder's callers keep working."""

from shared.vlm import SEQ_INPUTS, Prefill, cache_layers, load_vlm, prefill

__all__ = ["SEQ_INPUTS", "Prefill", "cache_layers", "load_vlm", "prefill"]
