"""``parallelize`` on a model built on meta: each of 2 gloo ranks allocates only its block of every table,
holds exactly the rows one process initialises from the same seed, and trains under DDP; in a single
process it only materialises the model."""

import dataclasses
import os

import torch
import torch.distributed as dist

from support import spawn_group


def _config():
    from engram.config import OverEncodingConfig
    from engram.presets import get_preset

    oe = OverEncodingConfig(engram_vocab_size=[211, 211], max_ngram_size=3, n_embed_per_ngram=32,
                            n_head_per_ngram=4, pad_id=2)
    return dataclasses.replace(get_preset("tiny-engram"), overencoding=oe)


def _worker(out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from engram.distributed import Parallel, ShardedEmbedding, parallelize
    from engram.model.transformer import EngramLM

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    whole = EngramLM(_config())  # one process's model, from the same seed
    torch.manual_seed(0)
    with torch.device("meta"):
        model = EngramLM(_config(), sparse_tables=True)
    parallel = parallelize(model, torch.device("cpu"))
    assert isinstance(parallel, Parallel) and isinstance(parallel.net, DistributedDataParallel)
    assert parallel.distributed and parallel.tables_sharded and parallel.is_main == (rank == 0)
    whole_tables = whole.named_tables()
    for name, table in model.named_tables().items():
        assert isinstance(table, ShardedEmbedding) and table.sparse
        full = whole_tables[name].weight.detach()
        assert table.weight.shape == (table.rows_per_rank, full.shape[1]) and table.rows_per_rank < full.shape[0]
        local = table.weight.detach()[: table.local_rows]
        assert torch.equal(local, full[table.start: table.start + table.local_rows]), name
        assert not table.weight.detach()[table.local_rows:].any()  # padding rows are zero
    dense = {n: p for n, p in model.named_parameters() if "embedding.weight" not in n or "tok_" in n}
    reference = dict(whole.named_parameters())
    assert all(torch.equal(p.detach(), reference[n].detach()) for n, p in dense.items())
    # the tables' squared gradient norm is summed over the ranks' rows
    total = parallel.table_squares_reduce(torch.tensor(float(rank + 1)))
    assert total.item() == sum(range(1, world + 1))
    ids, _ = parallel.rows(torch.arange(8).view(4, 2), None)
    assert torch.equal(ids, torch.arange(8).view(4, 2).chunk(world)[rank])
    open(os.path.join(out_dir, f"ok{rank}"), "w").close()


def test_each_rank_materialises_only_its_block(tmp_path):
    spawn_group(2, _worker, str(tmp_path))
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


def test_one_process_is_only_materialised():
    from engram.distributed import parallelize
    from engram.model.transformer import EngramLM

    torch.manual_seed(0)
    direct = EngramLM(_config())
    torch.manual_seed(0)
    with torch.device("meta"):
        model = EngramLM(_config())
    parallel = parallelize(model, torch.device("cpu"))
    assert parallel.net is model and not parallel.distributed and not parallel.tables_sharded
    a, b = direct.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert parallel.mean(2.5) == 2.5 and parallel.sum([1.0, 2.0]) == [1.0, 2.0]
    squares = torch.tensor(3.0)
    assert parallel.sum_table_squares(squares) is squares
    assert parallel.table_squares_reduce is None  # one process sums the squares in its usual order
