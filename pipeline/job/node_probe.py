"""What a Ray node's Python holds of this package, asked before a job's workers start.

Ray sends this module's function by value (`ray.cloudpickle.register_pickle_by_value` in
`cluster.check_nodes_have_this_package`), so it runs on a node that has no copy of the package,
or another copy: it uses the standard library only."""

import hashlib
import importlib.util
import site
from pathlib import Path


def package_on_this_node(module: str) -> dict:
    """What this Python would import for `module` (a dotted name inside a package):
    {"packages": its first site-packages folder, "package": the top package's folder, or None
    where it has none, "has_module": whether that package holds `module`, "sources": {path
    inside the package: sha256 of the file} for its .py files}. Nothing is imported but the
    package's own __init__ files on the way to `module`."""
    top = module.split(".")[0]
    answer = {"packages": site.getsitepackages()[0], "package": None, "has_module": False, "sources": {}}
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return answer
    root = Path(list(spec.submodule_search_locations)[0])
    try:
        answer["has_module"] = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a package on the way is missing
        pass
    answer["package"] = str(root)
    answer["sources"] = {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
                         for path in sorted(root.rglob("*.py"))}
    return answer
