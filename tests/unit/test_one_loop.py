"""Every stage trains through the one loop (vlmscale.train.loop.run_loop) and ends through finish():
the watchdog, step fault hook, checkpoint cadence, preemption and export are written once."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*ROOT.joinpath("vlmscale").rglob("*.py"), *ROOT.joinpath("recipes").glob("*.py")])


def _calls(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
            if isinstance(f, ast.Attribute) and f.attr == "fire" and node.args and isinstance(node.args[0], ast.Constant):
                names.add(f"fire:{node.args[0].value}")
    return names


def _owners(name: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in SOURCES if name in _calls(p))


def test_loop_concerns_have_one_home():
    assert _owners("Watchdog") == ["vlmscale/train/loop.py"]
    assert _owners("fire:step") == ["vlmscale/train/loop.py"]
    assert _owners("Preempted") == ["vlmscale/train/loop.py"]
    assert _owners("export_hf") == ["vlmscale/train/loop.py"]
    saves = sorted(str(p.relative_to(ROOT)) for p in SOURCES if ".checkpoints.save(" in p.read_text())
    assert saves == ["vlmscale/train/loop.py"]

def test_every_recipe_reaches_the_loop():
    """Each stage recipe's entry point leads to run_loop (directly, or through train_loop)."""
    stage_modules = {p.stem: p.read_text() for p in ROOT.joinpath("vlmscale/stages").glob("*.py")}
    for recipe in sorted(ROOT.joinpath("recipes").glob("*.py")):
        text = recipe.read_text()
        assert "run_loop" in text or any(
            f"stages.{mod} import" in text and ("train_loop" in src or "run_loop" in src)
            for mod, src in stage_modules.items()), f"{recipe.name} does not train through vlmscale.train.loop"
