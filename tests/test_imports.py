"""The library's import graph: no circle through ``jaxdlm.model`` (quant and sharding take a model or its layout,
they never import the model module, lazily or not)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "jaxdlm"


def _graph() -> dict[str, set[str]]:
    """Module -> the jaxdlm modules it imports anywhere in its body (lazy imports included; TYPE_CHECKING
    blocks excluded)."""
    mods = {".".join(f.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): f
            for f in ROOT.rglob("*.py")}
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        tree = ast.parse(f.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("jaxdlm"):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                graph[m].add(sub if sub in mods else node.module)
    return graph


def _reaches(graph, start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m == goal:
            return True
        if m not in seen and m != "jaxdlm":  # the package __init__ re-exports everything: not a dependency edge
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return False


def test_model_is_on_no_import_circle():
    graph = _graph()
    assert graph["jaxdlm.model"] >= {"jaxdlm.quant", "jaxdlm.sharding"}  # the edges the circle ran along
    back = [m for m in graph["jaxdlm.model"] if _reaches(graph, m, "jaxdlm.model")]
    assert back == [], f"jaxdlm.model imports {back}, which import jaxdlm.model back"
