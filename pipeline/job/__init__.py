"""The batch job: the shard ledger, the shard worker, and the Ray runner (the only module that imports Ray)."""
