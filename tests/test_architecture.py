"""The layering rules of docs/architecture.md, checked over the package's import graph.

Read statically (every `import` and `from ... import` in pipeline/, those inside functions too),
so a rule holds for code paths the other tests never run."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

# Lowest first: a module may import its own layer and the layers below it, never one above.
LAYERS = ["config", "segment", "mask", "data", "job", "results", "cli"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """pipeline module -> the pipeline modules (or packages) it imports, and 'ray' if it does."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.level:
                    raise AssertionError(f"{path}: relative import; the package uses absolute imports")
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] == "ray":
                    targets.add("ray")
                elif name.startswith("pipeline.") and _known(name):
                    targets.add(_known(name))
        graph[_module_name(path)] = targets
    return graph


def _known(name: str) -> str | None:
    """The longest pipeline module or package that `name` names, or None (an imported object)."""
    parts = name.split(".")
    for end in range(len(parts), 1, -1):
        candidate = PACKAGE.parent.joinpath(*parts[:end])
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts[:end])
    return None


def _layer(module: str) -> int:
    """Modules directly in pipeline/ (config.py, errors.py) are the foundation, layer 0."""
    top = module.split(".")[1] if module.count(".") >= 1 else "config"
    return LAYERS.index(top) if top in LAYERS else 0


def test_every_module_belongs_to_a_layer():
    for module in _imports():
        parts = module.split(".")
        foundation = len(parts) == 2 and (PACKAGE / f"{parts[1]}.py").is_file()
        assert len(parts) == 1 or foundation or parts[1] in LAYERS or parts[1] == "configs", \
            f"{module} is in no layer of {LAYERS}"


def test_imports_run_down_the_layers():
    upward = [(module, target) for module, targets in _imports().items() for target in targets
              if target != "ray" and target != "pipeline" and _layer(target) > _layer(module)]
    assert not upward, f"imports that run up the layers: {upward}"


def test_segment_and_mask_know_nothing_of_files_jobs_or_results():
    for module, targets in _imports().items():
        if module.startswith(("pipeline.segment", "pipeline.mask")):
            bad = [t for t in targets if t.startswith(("pipeline.data", "pipeline.job", "pipeline.results",
                                                       "pipeline.cli"))]
            assert not bad, f"{module} imports {bad}"


def test_only_the_runner_and_the_cluster_join_import_ray():
    importers = sorted(module for module, targets in _imports().items() if "ray" in targets)
    assert importers == ["pipeline.job.cluster", "pipeline.job.runner"]


def test_no_import_cycles():
    graph = {module: {t for t in targets if t in _imports_keys()} for module, targets in _imports().items()}
    state: dict[str, int] = {}

    def visit(module, trail):
        state[module] = 1
        for target in graph[module]:
            if state.get(target) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(trail[trail.index(target):] + [target])}")
            if target not in state:
                visit(target, trail + [target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def _imports_keys() -> set[str]:
    return {_module_name(path) for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}


def test_the_rules_catch_a_violation(tmp_path, monkeypatch):
    """The checks fail when broken: an upward import planted in a copy of segment/ is found."""
    import shutil

    copy = tmp_path / "pipeline"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "sample"))
    bad = copy / "segment" / "transfer.py"
    bad.write_text(bad.read_text() + "\nfrom pipeline.job.runner import run_job  # planted\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", copy)
    upward = [(m, t) for m, ts in _imports().items() for t in ts if t != "ray" and _layer(t) > _layer(m)]
    assert ("pipeline.segment.transfer", "pipeline.job.runner") in upward


def test_the_reading_side_imports_no_model_libraries():
    """export, eval, report and the job's outputs read PNGs and Parquet: importing torch and
    diffusers there cost every command (and every process that scores shards) 3 s of start."""
    import subprocess
    import sys

    modules = ["pipeline.data.outputs", "pipeline.results.evaluate", "pipeline.results.export",
               "pipeline.results.report", "pipeline.cli"]
    code = (f"import sys\nfor m in {modules}: __import__(m)\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'ray') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
