"""The import graph of our packages has no cycle.

The graph is built from the source with :mod:`ast` (nothing is imported): one node per module of
``prism_otel/``, ``processors/``, ``receivers/`` and ``prism_eval/``; an edge A -> B for every ``import B`` /
``from B import x`` / ``from pkg import B`` in A, whether at module level or inside a function (a
lazy import still ties the two modules together: it only hides the tie from the import system).
Imports under ``if TYPE_CHECKING:`` are left out (they never run). The implicit import of a parent
package's ``__init__`` that every ``import a.b.c`` performs is not an edge: a package's face
re-exporting its modules would otherwise close a loop with each of them.

A cycle found here fails the test unless listed in ``ALLOWED``; that list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prism_otel", "processors", "receivers", "prism_eval")

# Cycles allowed for now, each as the sorted tuple of its modules (a strongly connected component).
# The list started with the five components of the tree this test was written on (the lifecycle and
# the instrumentations, DeepDive and device timing, the record layout and the ring, the fault
# catalogue, the OTLP receiver and its front ends) and only shrinks: it is empty.
ALLOWED: set[tuple] = set()


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_pkg: bool, mods: dict[str, Path]) -> set[str]:
    found: set[str] = set()

    def resolve(name: str) -> None:
        # the longest prefix of ``name`` that is one of our modules
        parts = name.split(".")
        while parts:
            cand = ".".join(parts)
            if cand in mods:
                found.add(cand)
                return
            parts.pop()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            for alias in node.names:
                sub = f"{src}.{alias.name}"
                if sub in mods:
                    found.add(sub)
                else:
                    resolve(src)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = _imports(tree, name, path.name == "__init__.py", mods)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[tuple] = []
    counter = [0]

    def strong(v: str) -> None:
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out)


def test_graph_sees_the_packages():
    graph = import_graph()
    # the walk reads real imports: the pipeline imports the record layout, a receiver its config
    assert "prism_otel.record" in graph["prism_otel.pipeline"]
    assert "receivers.otlp.config" in graph["receivers.otlp"]
    assert len(graph) > 100


def test_cycle_detection_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = set(cycles(import_graph()))
    new = found - ALLOWED
    assert not new, "import cycles (break them; a lazy import still counts):\n" + "\n".join(
        " <-> ".join(c) for c in sorted(new))
    gone = ALLOWED - found
    assert not gone, f"these allowed cycles are gone: remove them from ALLOWED: {sorted(gone)}"


# Who may import whom (docs/architecture.md): importer prefix -> what it must not import. A prefix
# matches a module and everything under it.
CORE = ("prism_otel.semconv", "prism_otel.version", "prism_otel.record", "prism_otel.ring",
        "prism_otel.config_error", "prism_otel._sdk_private", "prism_otel.otlp_json", "prism_otel.plugins",
        "prism_otel.config_decode")
LOADERS = ("prism_otel.cli", "prism_otel.attach", "prism_otel.bootstrap", "prism_otel.instrumentation.vllm.plugin")
RULES = {
    # the core imports nothing of ours outside the core
    **{m: ("prism_otel.", "processors", "receivers") for m in CORE},
    # instrumentation writes events: the recorder, the record layout, device timing, names; never the
    # runtime, the pipeline, the processors or the collector
    "prism_otel.instrumentation": ("prism_otel._runtime", "prism_otel.companion", "prism_otel.pipeline",
                                   "prism_otel.collector", "prism_otel.engines", "processors", "receivers"),
    # processors see StepRecords: no runtime, engine hooks, collector service or receivers
    "processors": ("prism_otel._runtime", "prism_otel.companion", "prism_otel.pipeline", "prism_otel.collector",
                   "prism_otel.instrumentation", "prism_otel.device", "receivers"),
    "receivers": ("processors", "prism_otel._runtime", "prism_otel.instrumentation", "prism_otel.pipeline"),
    "prism_otel.device": ("prism_otel._runtime", "prism_otel.instrumentation", "prism_otel.collector"),
}
CORE_ALLOWED = CORE  # what a core module may import
# evaluation and test fixtures sit on top of the product, like the entry layer: the product never imports them
PRODUCT = ("prism_otel", "processors", "receivers")
EVALUATION = "prism_eval"


def _under(module: str, prefix: str) -> bool:
    if prefix.endswith("."):
        return module.startswith(prefix)
    return module == prefix or module.startswith(prefix + ".")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for importer, deps in sorted(graph.items()):
        for prefix, banned in RULES.items():
            if not _under(importer, prefix):
                continue
            for dep in sorted(deps):
                if prefix in CORE and dep in CORE_ALLOWED:
                    continue
                if any(_under(dep, b) for b in banned):
                    out.append(f"{importer} -> {dep}")
        if any(_under(importer, p) for p in PRODUCT):
            out += [f"{importer} -> {dep} (the product never imports {EVALUATION})"
                    for dep in sorted(deps) if _under(dep, EVALUATION)]
        # the runtime (start / stop / status) is imported only by the package face and the loaders
        for dep in deps:
            if dep in ("prism_otel._runtime", "prism_otel") and importer not in ("prism_otel",) \
                    and not any(_under(importer, loader) for loader in LOADERS):
                out.append(f"{importer} -> {dep} (only the package, the CLI, attach and the loaders start prism-otel)")
    return out


def test_layers():
    bad = layer_violations(import_graph())
    assert not bad, "imports across the layers of docs/architecture.md:\n" + "\n".join(bad)


def test_layer_check_finds_a_violation():
    assert layer_violations({"processors.x": {"prism_otel.pipeline"}, "prism_otel.record": {"prism_otel.ring"},
                             "prism_otel.ring": {"prism_otel.spans"}}) == [
        "prism_otel.ring -> prism_otel.spans", "processors.x -> prism_otel.pipeline"]


def test_graph_sees_the_evaluation_package():
    graph = import_graph()
    assert "prism_otel.otlp_json" in graph["prism_eval.simulate.dataset"]  # evaluation reads the product


def test_layer_check_finds_the_product_importing_evaluation():
    assert layer_violations({"prism_otel.cli_ext": {"prism_eval.detect_cli"},
                             "processors.verdict": {"prism_eval.simulate.holdout"},
                             "receivers.otlp": {"prism_eval"},
                             "prism_eval.detect_cli": {"processors.verdict", "prism_otel.semconv"}}) == [
        "prism_otel.cli_ext -> prism_eval.detect_cli (the product never imports prism_eval)",
        "processors.verdict -> prism_eval.simulate.holdout (the product never imports prism_eval)",
        "receivers.otlp -> prism_eval (the product never imports prism_eval)"]
