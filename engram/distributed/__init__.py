"""Training beyond one process: ``parallelize`` places a model over a torch.distributed group (hashed
tables sharded by rows, dense parameters under DistributedDataParallel) and returns the ``Parallel``
that holds every collective the trainer uses; ``checkpoint`` writes and reads sharded checkpoints that
load on any number of ranks. See docs/DISTRIBUTED.md."""

from engram.distributed.parallelize import Parallel, materialise, parallelize
from engram.distributed.sharded import ShardedEmbedding, ShardedTable, shard_tables, sharded_lookup, sharded_tables

__all__ = ["Parallel", "ShardedEmbedding", "ShardedTable", "materialise", "parallelize", "shard_tables",
           "sharded_lookup", "sharded_tables"]
