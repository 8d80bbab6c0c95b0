"""A GPT-2 patched by apply_mmkern, trained under DistributedDataParallel (gloo, 2 CPU processes),
ends with the parameters of one process trained on the full batch.

Each rank takes half of the batch (same padding pattern in both halves, so the mean of the two
per-rank mean losses is the full-batch mean loss and DDP's averaged gradient is the full-batch one).
The mmkern ops run on the reference backend: the point here is the autograd/DDP plumbing of the
patched model (fused norms, varlen attention backward, tied weights), not a backend's numerics,
which tests/test_integration_transformers.py covers.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")

STEPS = 3
LR = 0.1


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 100, (4, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[[1, 3], :3] = 0   # left padding in sequence 1 of each half
    mask[[0, 2], 6:] = 0   # right padding in sequence 0 of each half
    ids = ids * mask
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return ids, mask, labels


def _train(model, ids, mask, labels):
    import mmkern
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        with mmkern.backend("reference"):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
        optimizer.step()
    return model


def _patched_gpt2():
    from mmkern.integrations.transformers import apply_mmkern
    from mmkern.integrations.transformers_parity import tiny_gpt2
    return apply_mmkern(tiny_gpt2(seed=0).float())


def _worker(rank, world_size, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_patched_gpt2())
        ids, mask, labels = _batch()
        half = slice(rank * 2, rank * 2 + 2)
        _train(model, ids[half], mask[half], labels[half])
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in model.module.state_dict().items()}, out_path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_ddp_two_processes_match_one_process_on_the_full_batch(tmp_path):
    out_path = str(tmp_path / "ddp_state.pt")
    mp.spawn(_worker, args=(2, _free_port(), out_path), nprocs=2, join=True)
    ddp_state = torch.load(out_path)

    single = _patched_gpt2()
    initial = {k: v.clone() for k, v in single.state_dict().items()}
    _train(single, *_batch())
    want = single.state_dict()
    assert list(ddp_state) == list(want)
    moved = max((want[k] - initial[k]).abs().max().item() for k in want)
    assert moved > 1e-3, "training did not change the parameters: the comparison would prove nothing"
    for key in want:
        torch.testing.assert_close(ddp_state[key], want[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
