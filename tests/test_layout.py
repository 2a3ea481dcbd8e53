"""The package's structure: a subpackage per layer, each saying what belongs in it; no import
cycle among hvd_train's modules (imports inside functions included: a lazy import is still a
dependency); no library module importing the package root (its __init__ maps public names
lazily onto the modules, so that would close a cycle)."""
from __future__ import annotations

import ast
import re
from typing import Dict, List, Set

from conftest import REPO

PACKAGE = REPO / "hvd_train"


def import_graph() -> Dict[str, Set[str]]:
    """module -> the hvd_train modules it imports anywhere in its source."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = {f"{target}.{a.name}" for a in node.names} & set(modules)
                if len(subs) < len(node.names) and target in modules:
                    subs.add(target)  # names defined in the module (or the package's __init__) itself
                graph[name] |= subs - {name}
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in modules} - {name}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while component[-1:] != [v]:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "hvd_train.training.trainer" in graph and "hvd_train.training.loop" in graph["hvd_train.training.trainer"]
    assert cycles(graph) == []


def test_the_checker_sees_a_cycle():
    # The two modules that imported each other before loop.py and session.py existed.
    graph = {"hvd_train.trainer": {"hvd_train.elastic"}, "hvd_train.elastic": {"hvd_train.trainer"},
             "hvd_train.loop": set()}
    assert cycles(graph) == [["hvd_train.elastic", "hvd_train.trainer"]]


def test_no_package_module_imports_the_package_root():
    graph = import_graph()
    library = [m for m in graph if m != "hvd_train" and not m.startswith("hvd_train.tools")]
    assert [m for m in library if "hvd_train" in graph[m]] == []


LAYERS = ("config", "data", "training", "outputs", "launchers", "tools")


def test_a_subpackage_per_layer_each_saying_what_belongs_there():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists())
    assert top == sorted(["__init__.py", "__main__.py", "cli.py", "runtime.py", "storage.py", "version.py",
                          "watchdog.py", *LAYERS])
    for layer in LAYERS:
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
        assert doc and len(doc) > 80, f"hvd_train/{layer}/__init__.py says what belongs there"


def test_paths_to_the_repository_from_inside_the_package_exist():
    from hvd_train.launchers import LAUNCH_DIR
    from hvd_train.tools.bench import startup

    assert (LAUNCH_DIR / "local.sh").is_file() and LAUNCH_DIR.parent == REPO
    assert startup.REPO == REPO


def test_nothing_imports_horovods_keras_layer_or_tf_keras():
    """Horovod's Keras layer stops averaging under Keras 3 without a word (docs/design.md): the
    engine is training/distributed.py on horovod.tensorflow's ops, and Keras is Keras 3."""
    banned = ("horovod.tensorflow.keras", "horovod._keras", "horovod.keras", "tf_keras")
    found = []
    for path in [*PACKAGE.rglob("*.py"), *(REPO / "tests").rglob("*.py"), *(REPO / "examples").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(REPO)}: {n}" for n in names if n.startswith(banned)]
    assert found == []


# Modules that may touch files themselves, and why: none of these is a location a user gives for
# data, outputs, checkpoints or predict (those go through storage.py, local or s3://).
OWN_FILES = {
    "config/configfile.py": "the --config TOML file, local by design",
    "training/trainer.py": "Horovod's timeline folder (Horovod writes it; local only, URIs refused)",
    "training/pruning.py": "a sweep's pruning file (the local sweep directory's)",
    "training/legacy.py": "a local copy of a hvd_train 0.1 model file (storage.local_copy made it)",
    "outputs/run_dir.py": "Horovod's timeline and autotune files (local only) and the autotune scratch in /tmp",
    "outputs/predict.py": "the local temporary file storage.writing hands out",
    "data/reader.py": "/proc, the reader process's CPU and memory",
    "runtime.py": "/proc and /dev/null",
    "watchdog.py": "/proc (this machine's boot id) and /dev/null",
}
FILE_CALL = re.compile(r"(?<![\w.])open\(|\bos\.(listdir|remove|replace|rename|makedirs|unlink|scandir|walk)\b|"
                       r"\bshutil\.|\bglob\.|\bos\.path\.(exists|isdir|isfile|getsize)\(|\bzipfile\.ZipFile\(")


def test_only_storage_touches_the_locations_a_user_gives():
    """No module but storage.py opens, lists, writes or deletes files, apart from the few that
    handle files of their own (OWN_FILES, each with its reason); the tools and launchers are
    programs around the library and are not counted."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        name = path.relative_to(PACKAGE).as_posix()
        if name == "storage.py" or name.startswith(("tools/", "launchers/")):
            continue
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        if FILE_CALL.search(code):
            found.add(name)
    assert found == set(OWN_FILES), sorted(found ^ set(OWN_FILES))


def test_the_file_check_sees_a_file_call():
    assert FILE_CALL.search("with open(path) as f:") and FILE_CALL.search("os.remove(old)")
    assert FILE_CALL.search("on_rank0(rt, os.makedirs, d)") and not FILE_CALL.search("storage.open_input(path)")
