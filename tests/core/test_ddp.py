"""The implicit backward under DistributedDataParallel: 2 CPU processes (gloo) give the full-batch gradient."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from tests.core.test_norm_dropout import Net


def _make_net():
    torch.manual_seed(0)
    return Net(max_iter=20, tol=1e-6, b_max_iter=20, b_tol=1e-6)


def _worker(rank, world, init_file, img, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = DistributedDataParallel(_make_net())
    shard = img.chunk(world)[rank]
    (model(shard).pow(2).sum() * world).backward()  # DDP averages: scale to the full-batch sum
    grads = {n: p.grad for n, p in model.module.named_parameters()}
    torch.save({"grads": grads, "bwd_nstep": model.module.stats.backward.nstep}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_gradients_equal_single_process_gradients():
    img = torch.randn(4, 3, 8, 8)
    ref = _make_net()
    ref(img).pow(2).sum().backward()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), img, tmp), nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=True) for r in range(2)]
    for name, p in ref.named_parameters():
        assert p.grad.abs().sum() > 0, name
        for res in results:
            torch.testing.assert_close(res["grads"][name], p.grad, rtol=1e-4, atol=1e-6)
    assert all((res["bwd_nstep"] > 0).all() for res in results)
