"""A small generated model-and-data set for the demo: safetensors shards, an index, a CSV."""

from __future__ import annotations

import json
from pathlib import Path


def generate(root: Path, shard_mib: int = 48, shards: int = 3) -> dict[str, int]:
    """Write the dataset under ``root``; returns {relative path: size}."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(20261129)
    root.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    rows = shard_mib * 2**20 // (2 * 4096)  # float16 rows of 4096
    for i in range(1, shards + 1):
        name = f"model-{i:05d}-of-{shards:05d}.safetensors"
        tensors = {
            f"layers.{i}.mlp.weight": rng.standard_normal((rows, 4096), dtype=np.float32).astype(np.float16),
            f"layers.{i}.norm.weight": np.ones(4096, dtype=np.float16),
        }
        save_file(tensors, str(root / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
    (root / "config.json").write_text(json.dumps({"model_type": "syncbit-demo", "hidden_size": 4096}, indent=1))
    data = root / "data"
    data.mkdir(exist_ok=True)
    with open(data / "train.csv", "w") as f:
        f.write("id,prompt,label\n")
        for i in range(100_000):
            f.write(f"{i},example prompt number {i},{i % 7}\n")
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
