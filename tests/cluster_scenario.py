"""Driver of test_cluster.py, in a process of its own (the environment sets RAY_AUTH_MODE=token
and RAY_AUTH_TOKEN): a Ray test cluster of a head and two worker nodes on this machine, the job
over SHARDS into OUT with two workers, and a worker node that runs one of them removed once a
shard is in progress. LAYOUT `spare`: a head of 2 CPUs and nodes of 1, so the lost worker
restarts on the head; `tight`: a head of 1 CPU and nodes of 2, so no node has its share free
again, and its shards go to the other worker (the job's looks for lost workers made quick);
`alone`: a head of 1 CPU and one node of 2, one worker, so the job waits for it, and a node of
2 CPUs joins once the job has said so; `both`: as `tight`, both worker nodes removed, so the job
waits for both, and one node of 2 CPUs joins once it has said so.
Prints one JSON line: whether a node was removed, how many nodes ran workers at the start,
(shards done, shards failed, images ok), and what the remover met: the errors it read the
cluster's state through and the nodes the workers were on when it looked."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from pipeline.config import load_config
from pipeline.data.ledger import Ledger
from pipeline.job import runner
from pipeline.job.runner import run_job


# CPUs of the head, CPUs of each worker node, worker nodes (and segmenter workers)
LAYOUTS = {"spare": (2, 1, 2), "tight": (1, 2, 2), "alone": (1, 2, 1), "both": (1, 2, 2)}
JOINS_AFTER_THE_WAIT = ("alone", "both")  # a node joins once the job has said that it waits


def main(shards: str, out: str, config: str, layout: str = "spare", retries: str = "2") -> None:
    head_cpus, node_cpus, nodes = LAYOUTS[layout]
    if layout != "spare":
        runner.PLACEMENT_NOTICE_S, runner.LOST_WORKER_LOOK_S = 3.0, 0.5
    said_lost = threading.Event()
    if layout in JOINS_AFTER_THE_WAIT:
        notice = runner.LostWorkers.notice
        runner.LostWorkers.notice = staticmethod(lambda *args: (said_lost.set(), notice(*args))[1])
    head = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False})
    try:
        workers = [head.add_node(num_cpus=node_cpus) for _ in range(nodes)]
        head.wait_for_nodes()
        removed: list[str] = []
        joined: list[subprocess.Popen] = []
        seen = {"errors": [], "worker_nodes": []}  # why no node was removed, where that happens

        def worker_nodes() -> set[str]:
            """Nodes running an alive ShardWorker actor (read from the GCS)."""
            return {info["Address"]["NodeID"] for info in ray._private.state.actors().values()
                    if info["ActorClassName"] == "ShardWorker" and info["State"] == "ALIVE"}

        def remove_a_busy_node():
            deadline = time.time() + 600
            while time.time() < deadline:
                try:  # the GCS or a ledger file read at the wrong moment: look again, do not end the remover
                    if ray.is_initialized() and any(e.state == "in_progress" for e in Ledger(out).entries()):
                        running = worker_nodes()
                        if running not in seen["worker_nodes"]:
                            seen["worker_nodes"].append(running)
                        busy = [node for node in workers if node.node_id in running]
                        if busy and (layout != "both" or len(busy) == len(workers)):
                            for node in busy if layout == "both" else busy[:1]:
                                head.remove_node(node)
                                removed.append(node.node_id)
                            if layout in JOINS_AFTER_THE_WAIT and said_lost.wait(timeout=120):
                                joined.append(join_a_node(head.address, node_cpus))
                            return
                except Exception as error:  # noqa: BLE001 - reported in the JSON line
                    seen["errors"] = (seen["errors"] + [repr(error)])[-3:]
                time.sleep(0.1)

        remover = threading.Thread(target=remove_a_busy_node, daemon=True)
        remover.start()
        summary = run_job(shards, out, load_config(config), "tiny", address=head.address, workers=nodes,
                          retries=int(retries), progress=False)
        remover.join(timeout=5)
        print(json.dumps({"removed": bool(removed), "nodes_used": summary.worker_nodes,
                          "summary": [summary.shards_done, summary.shards_failed, summary.images_ok],
                          "head": head.head_node.node_id, "remover_saw": {
                              "errors": seen["errors"],
                              "worker_nodes": [sorted(nodes) for nodes in seen["worker_nodes"]]}}))
    finally:
        ray.shutdown()
        for node in joined:
            leave(node)
        head.shutdown()


def join_a_node(address: str, cpus: int) -> subprocess.Popen:
    """A worker node joining the cluster the way a user's does, `ray start --address` (in a
    session of its own, ended by `leave`): Cluster.add_node sets signal handlers, which only the
    main thread may do, and the job runs there."""
    ray_command = str(Path(sys.executable).with_name("ray"))
    return subprocess.Popen([ray_command, "start", "--address", address, "--num-cpus", str(cpus), "--block",
                             "--dashboard-agent-listen-port", "0"],  # the head's agent has the default port
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def leave(node: subprocess.Popen) -> None:
    """Ends a node `join_a_node` started: its own session's processes, by its group."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.wait(timeout=20)


if __name__ == "__main__":
    main(*sys.argv[1:6])
