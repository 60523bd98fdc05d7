import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (paths.py, ...)


@pytest.fixture(scope="session")
def tiny_text_cfg() -> dict:
    """A tiny Qwen3-VL text config (what `vlm_name_or_path`'s text_config would hold)."""
    from transformers import Qwen3VLTextConfig

    return Qwen3VLTextConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, rms_norm_eps=1e-6, vocab_size=300, rope_theta=5e6,
        rope_scaling={"mrope_interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"},
    ).to_dict()


@pytest.fixture(scope="session")
def tiny_head_cfg(tiny_text_cfg):
    from shared.config import HeadConfig

    alp = {
        "expert_cfg": {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
                       "intermediate_size": 96},
        "action_in_proj_cfg": {"hidden_size": 32, "num_enc_layers": 2},
    }
    return HeadConfig.from_alpamayo_config(alp, tiny_text_cfg)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The tiny official-format checkpoint (fp32 weights so equivalence tests are exact)."""
    from shared.tiny_checkpoint import write_tiny_checkpoint

    out = tmp_path_factory.mktemp("tiny")
    return write_tiny_checkpoint(out, dtype=torch.float32)
