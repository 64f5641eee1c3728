"""Training beyond one process: Engram tables sharded by rows over a torch.distributed group, the
dense parameters under DistributedDataParallel (``runtime``), and checkpoints that load on any number
of ranks (``checkpoint``). See docs/DISTRIBUTED.md."""

from engram.distributed.sharded import ShardedEmbedding, ShardedTable, shard_tables, sharded_lookup, sharded_tables

__all__ = ["ShardedEmbedding", "ShardedTable", "shard_tables", "sharded_lookup", "sharded_tables"]
