"""The batch job: the shard worker, and the Ray runner (the only module that imports Ray)."""
