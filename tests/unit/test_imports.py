"""The import graph: no cycles, the producer never imports the worker, and the layers hold (wire, amqp, programs)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("worker", "producer")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at any depth of the file: lazy imports count too)."""
    files = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            imported |= {t for t in targets if t in files and t != name}
        graph[name] = imported
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_module_of_worker_or_producer_is_part_of_an_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_the_producer_never_imports_the_worker() -> None:
    graph = import_graph()
    offenders = {
        m: sorted(t for t in ts if t.startswith("worker")) for m, ts in graph.items() if m.startswith("producer")
    }
    assert not {m: ts for m, ts in offenders.items() if ts}


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# The layers, bottom up: a module may import its own group and the layers below it.
#   wire: the pure contract (producer.wire) -- imports nothing else of the project
#   amqp: what both sides say to the broker (producer.amqp) -- imports wire
#   client, bulk, loadtest, worker: the programs -- import amqp and wire, never each other, except that the load
#     generator packs calls with the client's coalescer, as a client does
#   cli: the ``producer`` command and the package's front door -- may import any producer module
_BELOW = {
    "wire": {"wire"},
    "amqp": {"amqp", "wire"},
    "client": {"client", "amqp", "wire"},
    "bulk": {"bulk", "amqp", "wire"},
    "loadtest": {"loadtest", "client", "amqp", "wire"},
    "worker": {"worker", "amqp", "wire"},
    "cli": {"cli", "client", "bulk", "loadtest", "amqp", "wire"},
}


def layer(module: str) -> str:
    """The layer a project module belongs to (see ``_BELOW``)."""
    parts = module.split(".")
    if parts[0] == "worker":
        return "worker"
    if len(parts) > 1 and parts[1] in ("wire", "amqp", "client", "bulk", "loadtest"):
        return parts[1]
    return "cli"  # producer/__init__.py, producer/cli.py, producer/route_cli.py, ...


def test_every_module_imports_only_its_own_layer_and_the_layers_below() -> None:
    offenders = {
        module: sorted(t for t in targets if layer(t) not in _BELOW[layer(module)])
        for module, targets in import_graph().items()
    }
    assert not {m: ts for m, ts in offenders.items() if ts}


def test_the_layer_rule_catches_a_worker_importing_the_client() -> None:
    assert layer("producer.client.rpc") not in _BELOW[layer("worker.intake")]
    assert layer("producer.amqp.tls") not in _BELOW[layer("producer.wire.protocol")]


def test_importing_the_worker_loads_neither_the_client_nor_bulk_jobs() -> None:
    code = (
        "import sys, worker.service, worker.cli\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('producer.client', 'producer.bulk', "
        "'producer.loadtest')))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == ""


def test_the_wire_contract_loads_no_broker_library() -> None:
    code = "import sys, producer.wire.protocol, producer.wire.rows\nprint('aio_pika' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "False"
