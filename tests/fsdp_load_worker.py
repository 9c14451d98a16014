"""Run by test_model.py under `torchrun --nproc_per_node 2` (gloo): meta build -> fully_shard -> to_empty ->
load_weights, then write rank 0's logits and an export for the test to compare with the single-process model."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import Transformer, load_weights, read_args  # noqa: E402

path, out = Path(sys.argv[1]), Path(sys.argv[2])
dist.init_process_group("gloo")
try:
    with torch.device("meta"):
        model = Transformer(read_args(path))
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device="cpu")
    load_weights(model, path)
    tokens = torch.arange(1, 25)[None] % 97
    with torch.no_grad():
        logits = model(tokens)
    if dist.get_rank() == 0:
        torch.save(logits, out)
    model.save_pretrained(out.parent / "export", max_shard_bytes=50_000)
finally:
    dist.destroy_process_group()
