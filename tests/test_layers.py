"""The package's imports point one way: no module imports a higher layer (docs/design.md, "Layers").

Read from the source (every import, module-level or inside a function), so nothing is imported here.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nps"

# Lowest first. A module belongs to the layer of the longest prefix that names it.
LAYERS = (
    ("errors, Ctrl-C, configs, files, devices and processes",
     ("nps.errors", "nps.interrupts", "nps.config", "nps.files", "nps.accelerator", "nps.train.distributed")),
    ("the paper's maths", ("nps.layers", "nps.latent", "nps.likelihood", "nps.encoder", "nps.dpo")),
    ("the decoder LM", ("nps.lm",)),
    ("data", ("nps.data",)),
    ("models", ("nps.models",)),
    ("training", ("nps.train",)),
    ("results and active learning", ("nps.results", "nps.active")),
    ("a loaded steering run, plans", ("nps.steering_run", "nps.plan")),
    ("workflows", ("nps.workflow",)),
    ("the preference app", ("nps.serve",)),
    ("experiments", ("nps.experiments",)),
    ("the command", ("nps.cli",)),
)


def layer(module: str) -> int:
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS (and to docs/design.md)"
    return max(matches)[1]


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "nps"]


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        if module == "nps":
            continue  # the package's lazy table of public names
        for line, name in imports(path):
            # ``from nps.data import two_styles`` names a module; ``from nps.data.pairs import PairPool`` a name in one.
            target = name if (PACKAGE.parent / Path(*name.split("."))).with_suffix(".py").exists() or \
                (PACKAGE.parent / Path(*name.split("."))).is_dir() else name.rsplit(".", 1)[0]
            if layer(target) > layer(module):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} "
                              f"({LAYERS[layer(target)][0]}) from {LAYERS[layer(module)][0]}")
    assert not upward, "\n".join(upward)


def test_the_layers_catch_an_upward_import(tmp_path):
    assert layer("nps.workflow.ab") < layer("nps.serve.service")
    assert layer("nps.train.distributed") < layer("nps.data.prepared") < layer("nps.train.loop")
    module = tmp_path / "module.py"
    module.write_text("def f():\n    from nps.serve.service import PreferenceService\n")
    assert imports(module) == [(2, "nps.serve.service.PreferenceService")]
