"""One rank of the ESB-over-the-global-batch check (tests/test_losses.py); run as a script:
python esb_ddp_worker.py RANK WORLD PER_RANK PORT OUT_DIR  (RANK -1: one process on the concatenated batch)."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from fixtures_model import tiny_config  # noqa: E402

from amoe.model import AnomalyMoE, ModelOutput  # noqa: E402


def esb_and_router_grad(world: int, per_rank: int, rank: int | None):
    """ESB terms and router gradients of a tiny 3/3/3 top-3 model on rank's part of a fixed global batch
    (the whole batch when rank is None)."""
    torch.manual_seed(0)
    model = AnomalyMoE(tiny_config(num_patch_experts=3, num_component_experts=3, num_global_experts=3, top_k=3))
    cls = torch.randn(world * per_rank, model.encoder.dim) * 3
    if rank is not None:
        cls = cls[rank * per_rank : (rank + 1) * per_rank]
    router = model.router(cls)
    b, n = router.logits.shape
    out = ModelOutput(router, torch.zeros(b, n), torch.zeros(b, 3, 1, 1), torch.zeros(b, 3), None)
    losses = model.loss(out)
    losses.total.backward()
    return [t.detach() for t in losses.esb], [p.grad.clone() for p in model.router.parameters()]


if __name__ == "__main__":
    rank, world, per_rank, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    if rank < 0:
        esb, grads = esb_and_router_grad(world, per_rank, None)
    else:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        esb, grads = esb_and_router_grad(world, per_rank, rank)
        for g in grads:  # what DDP does with the ranks' gradients: their mean
            dist.all_reduce(g)
            g /= world
        dist.destroy_process_group()
    torch.save({"esb": esb, "grads": grads}, os.path.join(out, f"rank{rank}.pt"))
