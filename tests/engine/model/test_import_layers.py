"""engine/model imports run one way: architecture -> LoRA / ExPLoRA recipe -> weight files and
adapters -> build. Checked on the source (``ast``), every import statement counted, also those
inside functions, and through the first-party modules in between (``engine.config``, ``kernels``),
so neither a lazy import nor a detour can bring the old vit <-> adapters knot back."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
FIRST_PARTY = ("engine", "kernels", "shards", "launchers")

# lowest first; a module may import its own layer and the ones before it
LAYERS = {
    "architecture": ["patch_embed", "attention", "tokens", "layer_decay", "architecture"],
    "recipe": ["lora", "explora"],
    "files": [
        "tensor_files",
        "base_identity",
        "state_fit",
        "formats",
        "formats.dinov2",
        "formats.mae",
        "formats.trainer_checkpoint",
        "formats.adapter",
        "formats.merged",
        "formats.peft_export",
        "weights",
    ],
    "build": ["vit"],
}
RANK = {f"engine.model.{m}": i for i, mods in enumerate(LAYERS.values()) for m in mods}
# engine/model runs on one process and below the objectives: none of these, directly or not
FORBIDDEN = ("engine.objectives", "engine.trainer", "engine.eval", "launchers", "torch.distributed", "deepspeed")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for top in FIRST_PARTY for p in (REPO / top).rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (``from a.b import c`` counts a.b.c when
    that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)
    return out


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {name: _imports(path, name, known) for name, path in sources.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_every_model_module_has_a_layer():
    modules = {n for n in _sources() if n.startswith("engine.model.")}
    assert modules == set(RANK), f"place new modules in LAYERS: {sorted(modules ^ set(RANK))}"


def test_imports_only_run_down_the_layers():
    graph = _graph()
    wrong = []
    for name, rank in RANK.items():
        for dep in _reachable(graph, name):
            if RANK.get(dep, -1) > rank:
                wrong.append(f"{name} -> {dep}")
            if dep.startswith(FORBIDDEN):
                wrong.append(f"{name} -> {dep} (not for engine/model)")
    assert not wrong, wrong


def test_no_cycle_among_model_modules():
    graph = _graph()
    cycles = [
        f"{name} <-> {dep}"
        for name in RANK
        for dep in graph[name]
        if dep in RANK and dep != name and name in _reachable(graph, dep)
    ]
    assert not cycles, cycles


def test_the_check_sees_lazy_imports(tmp_path):
    """The parser counts a function-level import (the way the old knot hid) and a relative one."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from engine.model.vit import build_vit\n    from .weights import load_weights\n")
    found = _imports(f, "engine.model.lora", {"engine.model.vit", "engine.model.weights"})
    assert {"engine.model.vit", "engine.model.weights"} <= found
