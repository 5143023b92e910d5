"""Two gloo ranks: the objectives' cross-rank statistics equal the single-process computation over
the concatenated batch (Sinkhorn-Knopp, running centers, and the DINO/iBOT losses and gradients)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.trainer.process_group import free_port, shutdown

WORLD = 2


def _tiny_objective(all_reduce, centering: str):
    import timm

    from engine.config import DinoConfig
    from engine.objectives.dino import DinoObjective

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        img_size=28,
        dynamic_img_size=True,
        embed_dim=32,
        depth=2,
        num_heads=2,
        init_values=1.0,
    )
    for n, p in vit.named_parameters():
        p.requires_grad = n.startswith(("blocks.1.", "norm."))
    cfg = DinoConfig(
        head_n_prototypes=16, head_hidden_dim=16, head_bottleneck_dim=8, koleo_loss_weight=0.0, centering=centering
    )
    return DinoObjective(vit, cfg, total_steps=10, all_reduce=all_reduce)


def _rank_slice(x: torch.Tensor, n_crops: int, rank: int) -> torch.Tensor:
    """Crop-major rows (crop c of sample b at c*B + b) -> this rank's samples, still crop-major."""
    B = x.shape[0] // n_crops
    per = B // WORLD
    return x.view(n_crops, B, *x.shape[1:])[:, rank * per : (rank + 1) * per].reshape(n_crops * per, *x.shape[1:])


def _check_primitives(rank: int, all_reduce) -> None:
    from engine.objectives.centering import RunningCenter, sinkhorn_knopp

    g = torch.Generator().manual_seed(0)
    logits = torch.rand(8, 6, generator=g) * 2 - 1
    full = sinkhorn_knopp(logits, 0.07)
    mine = sinkhorn_knopp(logits[rank * 4 : (rank + 1) * 4], 0.07, all_reduce)
    torch.testing.assert_close(mine, full[rank * 4 : (rank + 1) * 4], rtol=1e-5, atol=1e-6)
    # uneven counts, as with iBOT's masked patches: rank 0 holds 3 rows, rank 1 holds 5
    rows = slice(0, 3) if rank == 0 else slice(3, 8)
    torch.testing.assert_close(sinkhorn_knopp(logits[rows], 0.07, all_reduce), full[rows], rtol=1e-5, atol=1e-6)
    single, multi = RunningCenter(6, 0.5), RunningCenter(6, 0.5)
    single.update(logits)
    multi.update(logits[rows], all_reduce)
    torch.testing.assert_close(multi.center, single.center)


def _check_objective(rank: int, all_reduce, centering: str) -> None:
    g = torch.Generator().manual_seed(1)
    B = 4
    batch = {
        "global_crops": torch.randn(2 * B, 3, 28, 28, generator=g),
        "local_crops": torch.randn(2 * B, 3, 14, 14, generator=g),
        "masks": torch.rand(2 * B, 4, generator=g) < 0.5,
    }
    single = _tiny_objective(None, centering)
    ref_loss, ref_logs = single(batch, step=0)
    ref_loss.backward()

    multi = _tiny_objective(all_reduce, centering)
    mine = {k: _rank_slice(v, 2, rank) for k, v in batch.items()}
    loss, logs = multi(mine, step=0)
    loss.backward()
    # the trainer averages gradients over ranks; with equal per-rank batches the mean of the
    # per-rank losses is the global loss
    for key in ("dino_global", "dino_local", "ibot", "loss"):
        avg = all_reduce(torch.tensor(logs[key], dtype=torch.float64)) / WORLD
        assert abs(avg.item() - ref_logs[key]) < 1e-5 * max(1.0, abs(ref_logs[key])), (key, avg, ref_logs[key])
    for (n, p), (_, q) in zip(single.trainable_parameters(), multi.trainable_parameters()):
        torch.testing.assert_close(
            all_reduce(q.grad.clone()) / WORLD, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}"
        )
    if centering == "centering":
        torch.testing.assert_close(multi.dino_loss.center.center, single.dino_loss.center.center)
        torch.testing.assert_close(multi.ibot_loss.center.center, single.ibot_loss.center.center)


def _worker(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    clean = False
    try:
        from engine.trainer.collectives import all_reduce_sum, world_size
        from engine.trainer.collectives import rank as get_rank

        assert world_size() == WORLD and get_rank() == rank
        _check_primitives(rank, all_reduce_sum)
        for centering in ("sinkhorn_knopp", "centering"):
            _check_objective(rank, all_reduce_sum, centering)
        clean = True
    finally:
        shutdown(clean=clean)  # what the launchers do: barrier on a clean exit, then teardown


@pytest.mark.distributed
def test_cross_rank_statistics_match_single_process():
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD, join=True)
