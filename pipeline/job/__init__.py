"""The batch job: the shard worker, the Ray runner and the cluster it joins (the two modules that import Ray)."""
