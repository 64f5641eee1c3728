"""The row-sharded table on 2 gloo processes equals one full table: rows forward, gradients backward."""

import os

import pytest
import torch
import torch.distributed as dist

from support import spawn_group

NUM_ROWS, DIM = 11, 3  # 11 rows over 2 ranks: uneven, padded to 12

# per rank: (ids, description); rank 1's second batch is empty, rank 0 asks only rank 1's rows once
BATCHES = [
    [torch.tensor([[0, 5, 5, 10], [3, 3, 0, 6]]), torch.tensor([6, 7, 8, 10, 10])],
    [torch.tensor([[10, 1, 1, 2]]), torch.tensor([], dtype=torch.int64)],
]


def _full_table() -> torch.Tensor:
    return torch.randn(NUM_ROWS, DIM, generator=torch.Generator().manual_seed(0))


def _grad_out(rank: int, step: int, shape) -> torch.Tensor:
    return torch.randn(*shape, DIM, generator=torch.Generator().manual_seed(100 * rank + step))


def _worker(sparse: bool, out_dir: str) -> None:
    from engram.distributed import ShardedTable
    from engram.distributed.sharded import TRAFFIC

    rank = dist.get_rank()
    table = ShardedTable(NUM_ROWS, DIM, sparse=sparse)
    table.load_full(_full_table())
    sent = TRAFFIC.lookup_bytes
    for step, ids in enumerate(BATCHES[rank]):
        rows = table(ids)
        assert rows.shape == (*ids.shape, DIM)
        torch.testing.assert_close(rows, _full_table()[ids], rtol=0, atol=0)
        rows.backward(_grad_out(rank, step, ids.shape))
    grad = table.weight.grad
    torch.save({"grad": grad.to_dense() if sparse else grad, "weight": table.weight.detach(),
                "sent": TRAFFIC.lookup_bytes - sent},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("sparse", [True, False])
def test_two_ranks_match_one_full_table(tmp_path, sparse):
    world = 2
    spawn_group(world, _worker, sparse, str(tmp_path))
    # the reference: one full table sees every rank's batches and gradients
    full = _full_table().requires_grad_(True)
    for rank in range(world):
        for step, ids in enumerate(BATCHES[rank]):
            full[ids].backward(_grad_out(rank, step, ids.shape))
    padded = torch.cat([full.grad, torch.zeros(1, DIM)])  # (12, d)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["grad"], padded[6 * rank: 6 * rank + 6], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["weight"][: 6 if rank == 0 else 5], _full_table()[6 * rank: 6 * rank + 6])
        assert got["sent"] == _expected_sent(rank)


def _expected_sent(rank: int) -> int:
    """Bytes rank sends to the other rank: per lookup, its split sizes (int64), the distinct ids the
    other rank owns (int64), the rows the other rank asks of it, and, backward, the gradients of the
    rows the other rank owns (fp32)."""
    other = 1 - rank
    total = 0
    for mine, theirs in zip(BATCHES[rank], BATCHES[other]):
        asked = sum(1 for i in mine.unique().tolist() if i // 6 == other)
        served = sum(1 for i in theirs.unique().tolist() if i // 6 == rank)
        total += 8 + 8 * asked + 4 * DIM * served + 4 * DIM * asked
    return total


def test_needs_a_process_group():
    from engram.distributed import ShardedTable

    with pytest.raises(RuntimeError, match="process group"):
        ShardedTable(10, 4)


def _model_worker(out_dir: str) -> None:
    """A model with Engram and OverEncoding tables, sharded, gives the unsharded model's logits and
    loss on each rank's own batch; the distributed validation loss equals one process's."""
    import dataclasses

    from engram.config import OverEncodingConfig
    from engram.presets import get_preset
    from engram.distributed import ShardedEmbedding, shard_tables
    from engram.model.transformer import EngramLM
    from engram.storage import apply_storage
    from engram.train.loop import mean_loss

    rank = dist.get_rank()
    oe = OverEncodingConfig(engram_vocab_size=[211, 211], max_ngram_size=3, n_embed_per_ngram=32,
                            n_head_per_ngram=4, pad_id=2)
    config = dataclasses.replace(get_preset("tiny-engram"), overencoding=oe)
    torch.manual_seed(0)
    full = EngramLM(config).eval()
    torch.manual_seed(0)
    model = EngramLM(config).eval()
    sharded = shard_tables(model)
    assert sorted(sharded) == ["layers.1.engram.embedding", "overencoding.embedding"]
    assert all(isinstance(t, ShardedEmbedding) for t in sharded.values())
    ids = torch.randint(0, 512, (2 + rank, 12), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, full(ids).logits, rtol=0, atol=1e-6)
    batches = [(torch.randint(0, 512, (b, 10), generator=torch.Generator().manual_seed(b)), None)
               for b in (1, 3, 4)]  # 1 row: fewer rows than ranks, scored once
    got = mean_loss(model, batches, torch.device("cpu"), distributed=True)
    want = mean_loss(full, batches, torch.device("cpu"))
    assert got[1] == want[1] and abs(got[0] - want[0]) < 1e-6, (got, want)
    with pytest.raises(ValueError, match="already sharded"):
        shard_tables(model)
    with pytest.raises(ValueError, match="no hashed tables"):
        shard_tables(EngramLM(get_preset("tiny-moe")))
    offloaded = EngramLM(get_preset("tiny-engram"))
    apply_storage(offloaded, "host").close()
    with pytest.raises(ValueError, match="storage tier"):
        shard_tables(offloaded)
    open(os.path.join(out_dir, f"ok{rank}"), "w").close()


def test_sharded_model_gives_the_unsharded_logits(tmp_path):
    spawn_group(2, _model_worker, str(tmp_path))
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


def _one_rank_worker(device: str) -> None:
    from engram.distributed import ShardedTable

    table = ShardedTable(NUM_ROWS, DIM, sparse=True, device=device)
    table.load_full(_full_table().to(device))
    ids = BATCHES[0][0].to(device)
    rows = table(ids)
    torch.testing.assert_close(rows.cpu(), _full_table()[BATCHES[0][0]], rtol=0, atol=0)
    rows.backward(_grad_out(0, 0, ids.shape).to(device))
    full = _full_table().requires_grad_(True)
    full[BATCHES[0][0]].backward(_grad_out(0, 0, ids.shape))
    torch.testing.assert_close(table.weight.grad.to_dense().cpu(), full.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", [("gloo", "cpu"), ("nccl", "cuda")])
def test_one_rank_group_on_each_backend(backend, device):
    """The lookup on the backend the trainer picks for each device (NCCL needs one GPU per rank, so a
    one-GPU machine checks it with a group of one)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    spawn_group(1, _one_rank_worker, device, backend=backend)
