"""Files in and out: shards and their sources (VOC, folder, COCO), atomic writes, the ledger, a job's outputs, torch datasets."""
