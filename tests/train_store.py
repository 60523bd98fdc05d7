"""A small training store for the tiny checkpoint, written directly (no VLM run): fast loop tests."""

from pathlib import Path

from shared.checkpoint import AlpamayoCheckpoint
from shared.store import KVSpec, StoreWriter, synthetic_sample


def write_train_store(path: Path, ckpt_dir: Path, n: int = 12, bad: dict | None = None, codec: str = "zstd",
                      quant: str = "none") -> Path:
    """n synthetic samples shaped for the tiny checkpoint's VLM (every 4th in 'val').

    bad: {sample index: callable(CachedSample) -> None} to corrupt a sample before it is written."""
    ckpt = AlpamayoCheckpoint.open(ckpt_dir)
    text = ckpt.vlm_config_dict()["text_config"]
    spec = KVSpec(num_layers=text["num_hidden_layers"], num_kv_heads=text["num_key_value_heads"],
                  head_dim=text["head_dim"], hidden_size=text["hidden_size"], kv_dtype="float32",
                  store_hidden=False, thumb_hw=(6, 10), codec=codec, quant=quant)
    prov = dict(checkpoint=ckpt.identity(), head_config_hash=ckpt.head_config().hash(), processor="tiny",
                prefix_mode="teacher", dataset_revision="synthetic", code_version="test")
    with StoreWriter.create(str(path), prov, spec) as w:
        for i in range(n):
            s = synthetic_sample(i, spec)
            if bad and i in bad:
                bad[i](s)
            w.write(s)
    return path
