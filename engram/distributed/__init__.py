"""Training beyond one process: Engram tables sharded by rows over a torch.distributed group."""

from engram.distributed.sharded import ShardedTable, sharded_lookup

__all__ = ["ShardedTable", "sharded_lookup"]
