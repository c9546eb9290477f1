"""Package hygiene: nothing heavy at import, lisa_agent never imports ROS, the CLI lists its commands."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_light():
    code = ("import sys, lisa_agent, lisa_agent.cli; "
            "heavy = [m for m in ('torch', 'transformers', 'zmq', 'rclpy', 'segment_anything') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_library_never_imports_ros():
    offenders = []
    for path in (ROOT / "lisa_agent").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in {"rclpy", "sensor_msgs", "std_msgs", "geometry_msgs", "visualization_msgs",
                           "ros_nodes", "launch", "launch_ros", "builtin_interfaces", "diagnostic_msgs"}:
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, offenders


def test_cli_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "lisa_agent.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for cmd in ("demo", "segment", "bench", "make-tiny", "make-data", "finetune", "eval", "serve", "bag"):
        assert cmd in out


def test_a_command_that_loads_the_model_prints_no_library_noise(tmp_path):
    """stderr carries what a user needs (nothing here), not other libraries' import-time chatter."""
    out = subprocess.run([sys.executable, "-m", "lisa_agent.cli", "demo", "--mode", "fast", "--out",
                          str(tmp_path / "overlay.png")], capture_output=True, text=True, check=True)
    assert "knife" in out.stdout
    assert "Enum subclass" not in out.stderr, out.stderr


#: Top-level names of ROS packages the library may not import by any means.
ROS_MODULES = {"rclpy", "sensor_msgs", "std_msgs", "geometry_msgs", "visualization_msgs", "ros_nodes", "launch",
               "launch_ros", "builtin_interfaces", "diagnostic_msgs", "rcl_interfaces", "lisa_interfaces"}


def test_library_never_imports_ros_dynamically_either():
    """No ``importlib.import_module("ros_nodes...")``, ``__import__("rclpy")`` or ``find_spec`` of a ROS module."""
    offenders = []
    for path in (ROOT / "lisa_agent").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name not in {"import_module", "__import__", "find_spec", "spec_from_file_location", "run_module"}:
                continue
            arg = node.args[0]
            text = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
            if text is None or text.split(".")[0] in ROS_MODULES:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:100]}")
    # the CLI's commands and the lazy top-level names are imported by name from a table of lisa_agent modules
    allowed = {"lisa_agent/cli.py", "lisa_agent/__init__.py"}
    assert [o for o in offenders if o.split(":")[0] not in allowed] == []


def test_importing_every_library_module_loads_no_ros():
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for p in (ROOT / "lisa_agent").rglob("*.py"))
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n    importlib.import_module(name)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(ROS_MODULES)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def _import_graph() -> dict[str, set[str]]:
    """lisa_agent's imports, module -> modules it imports (function-level ones too; TYPE_CHECKING blocks aside)."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "lisa_agent").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()

        def visit(node: ast.AST, name: str = name, package: str = package, deps: set[str] = deps) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                targets: list[str] = []
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        parts = package.split(".")
                        parts = parts[: len(parts) - (child.level - 1)]
                        base = ".".join(parts + ([child.module] if child.module else []))
                    targets = [f"{base}.{a.name}" for a in child.names] + [base]
                for target in targets:
                    while target and target not in files and "." in target:
                        target = target.rsplit(".", 1)[0]
                    if target in files and target != name:
                        deps.add(target)
                visit(child)

        visit(ast.parse(path.read_text()))
        graph[name] = deps
    return graph


def test_no_import_cycle_in_the_library():
    graph = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            strong(v)
    assert cycles == []


def test_the_vocabulary_sits_below_the_engine_and_the_doors():
    """Modules at the package root (frames, options, results, errors, geometry, images, ...) import nothing from
    the engine or the doors at module level; only open_backend reaches up, when it is called."""
    graph = _import_graph()
    upper = ("lisa_agent.engine", "lisa_agent.serving", "lisa_agent.console", "lisa_agent.integrations",
             "lisa_agent.commands", "lisa_agent.evaluation", "lisa_agent.training", "lisa_agent.benchmarks",
             "lisa_agent.data")
    packages = {m.rsplit(".", 1)[0] for m in graph}
    root = [m for m in graph if m.count(".") == 1 and m not in packages and m != "lisa_agent.cli"]
    offenders = {m: sorted(d for d in graph[m] if d.startswith(upper)) for m in root}
    offenders = {m: d for m, d in offenders.items() if d}
    # open_backend loads the engine or the client when it is called (the one place that chooses between them)
    assert offenders == {"lisa_agent.backend": ["lisa_agent.engine.segmenter", "lisa_agent.serving.client"]}


#: Names users import from the engine's modules that were split by responsibility (issue 27), and the module
#: that owns each now: the old import keeps working and gives the same object.
MOVED_NAMES = {
    "lisa_agent": {"LisaSegmenter": "lisa_agent.engine.segmenter", "Conversation": "lisa_agent.engine.segmenter"},
    "lisa_agent.engine.segmenter": {
        "LisaSegmenter": "lisa_agent.engine.segmenter", "Conversation": "lisa_agent.engine.segmenter",
        "optimization_switches": "lisa_agent.engine.segmenter", "ImageInput": "lisa_agent.engine.encoding",
        "DECLINE_MAX_TOKENS": "lisa_agent.engine.answering"},
    "lisa_agent.engine.loading": {
        "BUNDLED_MODELS": "lisa_agent.engine.loading", "resolve_checkpoint": "lisa_agent.engine.loading",
        "load_vision_tower": "lisa_agent.engine.loading", "load_lisa": "lisa_agent.engine.loading",
        "read_state_dict": "lisa_agent.engine.weights", "published_state_dict": "lisa_agent.engine.weights",
        "map_published_keys": "lisa_agent.engine.weights", "load_weights": "lisa_agent.engine.weights",
        "LisaConfig": "lisa_agent.engine.build", "build_model": "lisa_agent.engine.build",
        "assemble": "lisa_agent.engine.build", "check_transformers": "lisa_agent.engine.build",
        "MIN_TRANSFORMERS": "lisa_agent.engine.build", "torchao_config": "lisa_agent.engine.quantization",
        "resolve_quant_backend": "lisa_agent.engine.quantization", "quantize_llm": "lisa_agent.engine.quantization",
        "resolve_precision": "lisa_agent.engine.device", "TORCH_DTYPES": "lisa_agent.engine.device"},
    "lisa_agent.engine.acceleration": {
        "BUCKET": "lisa_agent.engine.acceleration.static_cache", "bucket": "lisa_agent.engine.acceleration.static_cache",
        "pad_length": "lisa_agent.engine.acceleration.static_cache",
        "preallocated_cache": "lisa_agent.engine.acceleration.static_cache",
        "StaticDecoder": "lisa_agent.engine.acceleration.static_cache",
        "MAX_DECODE_GRAPHS": "lisa_agent.engine.acceleration.static_cache",
        "GraphCapturer": "lisa_agent.engine.acceleration.graphs", "GraphedStages": "lisa_agent.engine.acceleration.graphs",
        "MAX_STAGE_GRAPHS": "lisa_agent.engine.acceleration.graphs",
        "CompiledEncoders": "lisa_agent.engine.acceleration.compiled", "LRU": "lisa_agent.engine.lru"},
}


def test_names_of_the_split_engine_modules_import_from_where_they_did():
    import importlib

    wrong = []
    for old, names in MOVED_NAMES.items():
        for name, owner in names.items():
            if getattr(importlib.import_module(old), name) is not getattr(importlib.import_module(owner), name):
                wrong.append(f"{old}.{name} is not {owner}.{name}")
    assert wrong == []


def test_the_engines_modules_stay_small():
    """One responsibility per module: none of the engine's is over 450 lines."""
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "lisa_agent" / "engine").rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 450} == {}
