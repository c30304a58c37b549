"""Which Ray a job runs on, and whether that cluster's nodes can run it.

The address follows Ray's own convention (`given_address`, `ray_address`); an address that
cannot be joined is one line (`ClusterJoinError`: `silent_address` before Ray is called,
`join_failure` after), and each node is asked what it would import of this package before any
worker starts (`check_nodes_have_this_package`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from contextlib import contextmanager

from pipeline.errors import PipelineError


class ClusterJoinError(PipelineError, ConnectionError):
    """The Ray cluster a job was given cannot be joined, or its nodes cannot run the job."""


def init_ray(address: str | None, source: str | None = None):
    """(ray, whether this call started a private instance). Ray's own convention: `address`
    (auto, host:port, ray://...; `local` for a new private instance; `given_address` says which
    and its `source`), else a cluster already running on this machine (`ray start`), else a new
    private instance sized to this machine."""
    import ray

    private = False
    if not ray.is_initialized():
        kwargs = dict(include_dashboard=False, logging_level="WARNING", configure_logging=True)
        address = ray_address(address, local_cluster_running)
        if address != "local":
            rejoined = ", the address this job's last run was given" if source == LAST_RUN else ""
            print(f"joining the Ray cluster at {address}{rejoined} (pass --address local for a private Ray instead)")
            silence = silent_address(address)
            if silence:  # ray.init would retry for about 14 minutes, hearing Ctrl-C only between attempts
                raise ClusterJoinError(join_failure(address, silence))
            try:
                with _without_default_auth_warning():
                    ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError, ray.exceptions.AuthenticationError) as exc:
                # ValueError: an address Ray cannot parse; ConnectionError hides the reason (a missing token) in
                # its cause
                causes, cause = [], exc
                while cause is not None:
                    causes.append(str(cause))
                    cause = cause.__cause__ or cause.__context__
                raise ClusterJoinError(join_failure(address, "\n".join(causes))) from exc
        else:
            with _without_default_auth_warning():
                ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)
            private = True
    return ray, private


# Ray turns its token authentication on for every new local instance, and for a client that joins a
# cluster in Ray's default mode, and logs this, with how to opt out, as a WARNING: it would be the
# first line of every job on a private Ray, and on a cluster it tells the client to opt out of the
# cluster's own authentication.
_DEFAULT_AUTH_WARNING = "Token authentication is enabled for this Ray cluster"


@contextmanager
def _without_default_auth_warning():
    """Leave out Ray's _DEFAULT_AUTH_WARNING while starting a private instance or joining a
    cluster (the authentication stays on; setting RAY_AUTH_MODE here instead would not reach
    Ray's already-read config)."""
    import logging

    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_DEFAULT_AUTH_WARNING)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def join_failure(address: str, error: str) -> str:
    """One line saying why the cluster at address could not be joined, and the fix."""
    if any(sign in error for sign in ("InvalidAuthToken", "Unauthenticated", "no authentication token was found")):
        return (f"cannot join the Ray cluster at {address}: it uses Ray's token authentication and this shell "
                "sent no token or another one: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the token "
                "`ray get-auth-token` prints on the head> (or copy the head's ~/.ray/auth_token here)")
    versions = _RELEASES.findall(error) if "Version mismatch" in error else []
    if len(versions) == 2:
        (cluster_ray, cluster_python), (own_ray, own_python) = versions
        patch_only = cluster_ray == own_ray and cluster_python.split(".")[:2] == own_python.split(".")[:2]
        return (f"cannot join the Ray cluster at {address}: it runs Ray {cluster_ray} on Python {cluster_python}, "
                f"this environment Ray {own_ray} on Python {own_python}, and Ray joins only the same releases: run "
                "pseudolabel in the environment that `ray start` ran in on the head (where the cluster's workers "
                "need it installed too), or submit it to run there with jobs/cluster_submit.sh"
                + ("; for another Python patch release alone, export RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor"
                   if patch_only else ""))
    lines = [line.strip() for line in error.splitlines() if line.strip()] or ["no answer"]
    reason = lines[0]
    if reason.endswith(":") and len(lines) > 1:  # an introduction ("Initialization failure from server:")
        reason = f"{reason} {lines[-1]}"  # and what it introduces: a traceback's last line, its error
    return (f"cannot join the Ray cluster at {address}: {reason}; check the address (`ray status` on the head "
            "prints it), or pass --address local for a private Ray")


# The releases in Ray's version mismatch error: the cluster's, then this process's.
_RELEASES = re.compile(r"Ray: (\S+)\s+Python: (\S+)")


def dashboard_address_refusal(given: str, address: str) -> str:
    """Why a job does not join an http(s) address (`given`: --address or RAY_ADDRESS): it is a
    cluster's dashboard, where `ray job submit` sends jobs, and the fix."""
    unset = "; or unset RAY_ADDRESS on the head, where a job joins its cluster by itself"
    return (f"{given}={address} is a Ray dashboard's address, where `ray job submit` sends jobs "
            "(jobs/cluster_submit.sh takes it as RAY_ADDRESS), not one a job's driver joins: pass --address "
            "HEAD:6379 (the address `ray start --head` printed) or ray://HEAD:10001"
            + (unset if given == "RAY_ADDRESS" else ""))


# The source of an address that a resumed job takes from its last run (job.json's `ray_address`).
LAST_RUN = "the job's last run"


def given_address(flag: str | None, environment: str | None, last_run: str | None = None
                  ) -> tuple[str | None, str | None]:
    """The Ray address a job is given and where from: --address, else RAY_ADDRESS, else (on
    resume) the one its last run was given (`last_run`, LAST_RUN); (None, None) where none is.
    A dashboard's http(s) address (as `ray job submit` takes it, exported for it) is a
    ClusterJoinError."""
    for address, source in ((flag, "--address"), (environment, "RAY_ADDRESS"), (last_run, LAST_RUN)):
        if address and address.startswith(("http://", "https://")):
            raise ClusterJoinError(dashboard_address_refusal(source, address))
        if address:
            return address, source
    return None, None


def ray_address(given: str | None, local_cluster_running) -> str:
    """The Ray address a job joins: the one it was given, else `auto` when a cluster started by
    `ray start` runs on this machine (local_cluster_running() says), else `local` (a new
    private instance)."""
    if given:
        return given
    return "auto" if local_cluster_running() else "local"


def local_cluster_running() -> bool:
    """Whether the cluster the last `ray start` on this machine recorded (the file Ray itself
    reads for this) still accepts connections."""
    try:
        from ray._private.services import find_bootstrap_address

        address = find_bootstrap_address(None)
        return bool(address) and _refused(address, timeout=1.0) is None
    except Exception:  # no address file, a stale one, or a Ray without that helper
        return False


def _refused(host_port: str, timeout: float) -> str | None:
    """Why a TCP connection to host_port failed within timeout (seconds), or None if it opened."""
    import socket

    host, port = host_port.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return f"nothing answers at {host_port} ({exc.strerror or exc})"


def silent_address(address: str, timeout: float = 5.0) -> str | None:
    """Why nothing would answer a join of address (host:port, auto, ray://host:port), or None
    when something accepts connections where Ray would connect (Ray's own canonical address:
    `localhost` becomes this node's IP) or when Ray can tell the fault itself at once."""
    if address.startswith("ray://"):
        target = address[len("ray://"):]
    else:
        try:
            from ray._private.services import canonicalize_bootstrap_address

            target = canonicalize_bootstrap_address(address)
        except Exception:  # a malformed address: ray.init names it
            return None
    if not target or ":" not in target or not target.rsplit(":", 1)[1].isdigit():
        return None  # a malformed address: ray.init names it
    return _refused(target, timeout)


def check_nodes_have_this_package(ray, timeout_s: float = 120.0) -> None:
    """Before any worker starts, ask each node what its Ray workers would import of this package
    (`node_probe.package_on_this_node`, one task a node). A node that cannot import the
    worker module (a cluster started from another Python environment) is a ClusterJoinError
    naming it: its segmenter workers would fail to start, after a hundred lines of Ray's
    tracebacks and stack dumps. A node whose copy of the package holds other code than this
    one's (an older release, a checkout not updated) is said in a line, with the files that
    differ: its workers would make masks with that code. A node that does not answer within
    timeout_s, or fails otherwise, is left to the workers."""
    from ray import cloudpickle
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.job import node_probe

    cloudpickle.register_pickle_by_value(node_probe)  # sent whole: a node without the package runs it too
    here = node_probe.package_on_this_node(WORKER_MODULE)
    resources = ("CPU", "GPU")  # the nodes a worker or a post-processing task can be given
    nodes = [node for node in ray.nodes()
             if node.get("Alive") and any(node.get("Resources", {}).get(r, 0) > 0 for r in resources)]
    probe = ray.remote(node_probe.package_on_this_node)
    probes = [(node, probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        node["NodeID"], soft=False)).remote(WORKER_MODULE)) for node in nodes]
    other_code: dict[tuple, list[str]] = {}  # (their folder, files that differ) -> the nodes holding that copy
    for node, answer in probes:
        try:
            there = ray.get(answer, timeout=timeout_s)
        except ray.exceptions.RayError:  # timed out, the node gone
            continue
        host = node.get("NodeManagerHostname") or node["NodeManagerAddress"]
        if not there["has_module"]:
            missing = ("where it is not installed" if there["package"] is None
                       else f"which holds a pseudolabel without {WORKER_MODULE} (another release)")
            raise ClusterJoinError(
                f"the Ray workers on {host} cannot import pseudolabel: Ray there runs a Python with the packages of "
                f"{there['packages']}, {missing} (this shell's are in {here['packages']}): install this pseudolabel "
                "there on every node, or start Ray from the environment it is installed in")
        differing = differing_sources(there["sources"], here["sources"])
        if differing:
            other_code.setdefault((there["package"], tuple(differing)), []).append(host)
    for (folder, differing), hosts in other_code.items():  # one line for the nodes of one copy
        print(f"the Ray workers on {_first_of(hosts)} hold another pseudolabel than this shell's ({folder} there, "
              f"{here['package']} here; {len(differing)} file(s) differ: {_first_of(differing)}): their masks can "
              "differ from this copy's; install this one on every node, or start Ray from its environment",
              flush=True)


def _first_of(names: list[str] | tuple[str, ...], shown: int = 3) -> str:
    """`a, b, c and 4 more`: the first `shown` names."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def differing_sources(node: Mapping[str, str], here: Mapping[str, str]) -> list[str]:
    """The package's .py files ({path: sha256}) that a node holds with other bytes than this
    copy's, or lacks; files only the node holds are not counted (no code here imports them),
    nor a missing __init__.py (a package's marker, which an editable install of a mapped
    folder such as pipeline.configs places elsewhere)."""
    return [path for path, digest in here.items()
            if node.get(path, digest if path.endswith("__init__.py") else None) != digest]


# The module a segmenter worker runs (`runner.ray_shard_worker_class`).
WORKER_MODULE = "pipeline.job.worker"
