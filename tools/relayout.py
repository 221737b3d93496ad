"""Re-lay out the vlmscale package (issue #15): one home per concern, an import graph that runs one way.

Re-runnable on any tree (other branches may have added or edited files); every phase is idempotent,
so running a phase twice changes nothing the second time. Run from the repository root, in order,
committing after each phase so that ``git log --follow`` sees the moves as pure renames::

    python tools/relayout.py --moves   && git commit -qm "layout: move modules to their new homes (pure git mv)"
    python tools/relayout.py --rewrite && git commit -qam "layout: rewrite imports and paths to the new modules"
    python tools/relayout.py --split   && git add -A vlmscale && git commit -qam "layout: split and break cycles"
    python tools/relayout.py --check        # lists any old name left behind (exit 1 if one is)

--moves    ``git mv`` every module in MOVES (skipped when already moved); new package ``__init__``
           files replace the old ones (``git rm`` of the old, so the moves stay 100% renames).
--rewrite  rewrites old dotted module names (``from X import``, ``import X``, ``"X.attr"`` strings
           in ``monkeypatch.setattr``, logger names, ``python -m X``) and old file paths
           (``vlmscale/engine/checkpoint.py``) in every tracked text file, by the MODULES table;
           ``from vlmscale.engine import faults`` style imports of old packages are rewritten per name;
           each module's contiguous block of top-level ``from vlmscale...`` imports is then sorted by
           module and lines importing from one module are merged (blocks with comments are left alone).
--split    moves top-level definitions between modules (SPLITS): the loop out of ``stages/lm.py``
           into ``train/loop.py``, ``IGNORE`` and the special tokens into ``vlmscale/constants.py``,
           the demo's scene vocabulary (what the preset tokenizers are trained on) into
           ``vlmscale/demo_vocab.py``; then rewrites every ``from <old> import <moved name>`` and
           every ``"<old>.<moved name>"`` string in the tree, and drops imports left unused in the
           modules it edited. It refuses (exit 1) when a moved definition uses a name that stays
           behind, which would make the new module import the old one.
--check    greps for old module names and paths that survived (docs prose, new code written
           after this script); each needs a hand edit.

What it cannot do: prose that names an old *package* (``vlmscale/engine/``, "the engine package")
is listed by --check, not rewritten; imports it adds are placed after the module's last
``vlmscale`` import, not re-sorted.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

# ---------------------------------------------------------------- tables (old -> new)

MOVES = {  # file moves, relative to the repository root
    "vlmscale/engine/distributed.py": "vlmscale/distributed/group.py",
    "vlmscale/engine/zero.py": "vlmscale/distributed/zero.py",
    "vlmscale/engine/trainer.py": "vlmscale/train/step.py",
    "vlmscale/engine/checkpoint.py": "vlmscale/train/checkpoint.py",
    "vlmscale/engine/faults.py": "vlmscale/train/faults.py",
    "vlmscale/engine/flops.py": "vlmscale/train/flops.py",
    "vlmscale/engine/metrics.py": "vlmscale/train/metrics.py",
    "vlmscale/engine/preemption.py": "vlmscale/train/preemption.py",
    "vlmscale/engine/progress.py": "vlmscale/train/progress.py",
    "vlmscale/engine/safe_load.py": "vlmscale/train/safe_load.py",
    "vlmscale/engine/setup.py": "vlmscale/train/setup.py",
    "vlmscale/engine/watchdog.py": "vlmscale/train/watchdog.py",
    "vlmscale/engine/launch.py": "vlmscale/train/launch.py",
    "vlmscale/engine/lm_stage.py": "vlmscale/stages/lm.py",
    "vlmscale/engine/ppo.py": "vlmscale/stages/ppo.py",
    "vlmscale/preference/stage.py": "vlmscale/stages/preference.py",
    "vlmscale/preference/reference.py": "vlmscale/stages/dpo_reference.py",
    "vlmscale/preference/objectives.py": "vlmscale/stages/objectives.py",
    "vlmscale/preference/losses.py": "vlmscale/losses/preference.py",
    "vlmscale/objectives/ppo.py": "vlmscale/losses/ppo.py",
}
OLD_PACKAGES = ["vlmscale/engine", "vlmscale/preference", "vlmscale/objectives"]
NEW_PACKAGES = {  # package -> its __init__ docstring
    "vlmscale/distributed": "The process group, device-aware collectives, the launcher's environment, ZeRO-3 helpers.",
    "vlmscale/train": "Training machinery shared by every stage: the engine step, the loop, checkpoints, metrics, "
                      "progress, preemption, the watchdog, safe loading, fault injection, FLOPs, launch.",
    "vlmscale/stages": "One module per training stage (lm, preference, ppo) and the train-step adapters they plug "
                       "into the loop.",
    "vlmscale/losses": "Losses as pure tensor functions (preference pairs, PPO), unit-tested by hand.",
}


def _dotted(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


MODULES = {_dotted(old): _dotted(new) for old, new in MOVES.items()}  # dotted module names

# top-level definitions moved between modules (after the file moves): (from, to, names)
SPLITS = [
    ("vlmscale.stages.lm", "vlmscale.train.loop", ["total_peak_tflops", "train_loop"]),
    ("vlmscale.data.render", "vlmscale.constants", ["IGNORE"]),
    ("vlmscale.model.tokenizer", "vlmscale.constants",
     ["PAD", "IM_START", "IM_END", "IMG_START", "IMG_END", "IMG_CONTEXT", "VIDEO", "SPECIAL_TOKENS"]),
    ("vlmscale.data.demo", "vlmscale.demo_vocab",
     ["IMAGE_SIZE", "COLOURS", "SHAPES", "COLUMNS", "NUMBER_WORDS", "OBJECTS", "POPULARITY", "PARTNER", "WORDS",
      "DAYS", "Obj", "_sample_scene", "box_text", "caption", "_unique_shape_objs", "_alone_in_column",
      "absent_object", "vqa_questions", "grounding_question", "text_task", "tokenizer_corpus"]),
]
RENAMES = {"vlmscale.demo_vocab": {"_sample_scene": "sample_scene"}}  # moved private names used across modules
NEW_MODULE_DOCS = {
    "vlmscale.train.loop": "The training loop every stage runs: optimizer steps with checkpoints, metrics, periodic\n"
                           "evaluation, fault hooks, the hang watchdog and preemption; a stage plugs in through\n"
                           "``objective``, ``before_step`` and ``row_extra``.",
    "vlmscale.constants": "Values the model and the data agree on: the label ignore index and the special tokens.",
    "vlmscale.demo_vocab": "The demo's scenes and the text they are described in: objects, captions, questions, text\n"
                           "tasks, and the corpus the preset tokenizers are trained on. Pure Python, no imports from\n"
                           "the package, so both ``vlmscale.data.demo`` (which draws the images) and\n"
                           "``vlmscale.model.build`` (which trains the preset tokenizers) can use it.",
}

ROOT = Path.cwd()
SELF = Path(__file__).resolve()


# ---------------------------------------------------------------- helpers


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def text_files() -> list[Path]:
    out = []
    for name in git("ls-files", "-co", "--exclude-standard").splitlines():
        p = ROOT / name
        if not p.is_file() or p.resolve() == SELF:
            continue
        try:
            p.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        out.append(p)
    return out


def module_path(dotted: str) -> Path:
    return ROOT / (dotted.replace(".", "/") + ".py")


def _boundary(old: str) -> re.Pattern:
    return re.compile(r"(?<![\w.])" + re.escape(old) + r"(?!\w)")


# ---------------------------------------------------------------- phase 1: moves


def do_moves() -> None:
    for pkg, doc in NEW_PACKAGES.items():
        init = ROOT / pkg / "__init__.py"
        if not init.exists():
            init.parent.mkdir(parents=True, exist_ok=True)
            init.write_text(f'"""{doc}"""\n')
            git("add", str(init.relative_to(ROOT)))
    for old, new in MOVES.items():
        if (ROOT / old).exists() and not (ROOT / new).exists():
            git("mv", old, new)
            print(f"moved {old} -> {new}")
        elif (ROOT / old).exists():
            sys.exit(f"both {old} and {new} exist: merge them by hand")
    for pkg in OLD_PACKAGES:
        d = ROOT / pkg
        if not d.exists():
            continue
        left = [p for p in d.rglob("*.py") if p.name != "__init__.py"]
        if left:
            sys.exit(f"{pkg} still holds {[str(p.relative_to(ROOT)) for p in left]}: add them to MOVES")
        if (d / "__init__.py").exists():
            git("rm", "-q", str((d / "__init__.py").relative_to(ROOT)))
        for cache in d.rglob("__pycache__"):
            for f in cache.iterdir():
                f.unlink()
            cache.rmdir()
        if d.exists() and not any(d.iterdir()):
            d.rmdir()


# ---------------------------------------------------------------- phase 2: rewrite module names


_OLD_PKG_IMPORT = re.compile(r"^(\s*)from (vlmscale\.(?:engine|preference|objectives)) import ([\w ,]+?)\s*$", re.M)


def _rewrite_package_imports(text: str) -> str:
    """``from vlmscale.engine import faults, safe_load`` -> one import per new home."""

    def fix(m: re.Match) -> str:
        indent, pkg, names = m.group(1), m.group(2), m.group(3)
        lines = []
        for item in names.split(","):
            parts = item.split()
            name, alias = parts[0], (parts[2] if len(parts) == 3 else parts[0])
            new = MODULES.get(f"{pkg}.{name}")
            if new is None:
                return m.group(0)  # not a module import: leave it for --check
            parent, base = new.rsplit(".", 1)
            lines.append(f"{indent}from {parent} import {base}" + (f" as {alias}" if alias != base else ""))
        return "\n".join(lines)

    return _OLD_PKG_IMPORT.sub(fix, text)


def rewrite_text(text: str) -> str:
    text = _rewrite_package_imports(text)
    for old in sorted(MODULES, key=len, reverse=True):
        text = _boundary(old).sub(MODULES[old], text)
    for old, new in sorted(MOVES.items(), key=lambda kv: len(kv[0]), reverse=True):
        text = re.sub(r"(?<![\w/])" + re.escape(old) + r"(?!\w)", new, text)
        short_old, short_new = old.removeprefix("vlmscale/"), new.removeprefix("vlmscale/")  # `engine/trainer.py`
        text = re.sub(r"(?<=[`'\"( ])" + re.escape(short_old) + r"(?!\w)", short_new, text)
    return text


def do_rewrite() -> None:
    for p in text_files():
        old = p.read_text()
        new = rewrite_text(old)
        if new != old:
            p.write_text(new)
            print(f"rewrote {p.relative_to(ROOT)}")
        if p.suffix == ".py" and re.search(r"^from vlmscale\.", new, re.M):
            tidy_vlmscale_imports(p)  # renamed modules sort differently; idempotent on a sorted block


# ---------------------------------------------------------------- phase 3: split


_BLOCKS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _defined(stmt: ast.stmt) -> set[str]:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {stmt.name}
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return set()


def _used(nodes: list[ast.AST]) -> set[str]:
    return {n.id for node in nodes for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.value.id for node in nodes for n in ast.walk(node)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}


def _start(stmt: ast.stmt, lines: list[str]) -> int:
    """0-based first line of a statement, with its decorators and the comment block right above it."""
    first = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])]) - 1
    while first > 0 and lines[first - 1].lstrip().startswith("#"):
        first -= 1
    return first


def _import_line(indent: str, module: str, names: list[str]) -> str:
    line = f"{indent}from {module} import {', '.join(names)}"
    if len(line) <= 120:
        return line
    return f"{indent}from {module} import (\n" + "".join(f"{indent}    {n},\n" for n in names) + f"{indent})"


def _alias_text(a: ast.alias) -> str:
    return a.name + (f" as {a.asname}" if a.asname else "")


def prune_imports(path: Path) -> None:
    """Drop the top-level import names a module no longer uses."""
    src = path.read_text()
    tree = ast.parse(src)
    imports = [s for s in tree.body if isinstance(s, (ast.Import, ast.ImportFrom))]
    used = _used([s for s in tree.body if s not in imports])
    all_names = {e.value for s in tree.body if isinstance(s, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "__all__" for t in s.targets)
                 for e in ast.walk(s.value) if isinstance(e, ast.Constant)}
    lines = src.splitlines(keepends=True)
    for s in sorted(imports, key=lambda s: s.lineno, reverse=True):
        if isinstance(s, ast.ImportFrom) and s.module == "__future__":
            continue
        keep = [a for a in s.names if (a.asname or a.name.split(".")[0]) in used | all_names]
        if len(keep) == len(s.names):
            continue
        if isinstance(s, ast.Import):
            new = f"import {', '.join(_alias_text(a) for a in keep)}\n" if keep else ""
        else:
            new = _import_line("", "." * s.level + (s.module or ""), [_alias_text(a) for a in keep]) + "\n" if keep else ""
        lines[s.lineno - 1:s.end_lineno] = [new]
        if not new and s.lineno >= 2 and s.lineno - 1 < len(lines) and not lines[s.lineno - 2].strip() \
                and not lines[s.lineno - 1].strip():
            del lines[s.lineno - 1]
    path.write_text(_tidy("".join(lines)))
    tidy_vlmscale_imports(path)


def tidy_vlmscale_imports(path: Path) -> None:
    """Merge ``from vlmscale.X import`` lines of one module and sort the block by module name."""
    src = path.read_text()
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return
    lines = src.splitlines(keepends=True)
    group = [s for s in tree.body if isinstance(s, ast.ImportFrom) and (s.module or "").startswith("vlmscale")
             and s.level == 0]
    if not group:
        return
    first, last = group[0].lineno - 1, group[-1].end_lineno
    between = [s for s in tree.body if first < s.lineno - 1 < last and s not in group]
    if between or any("#" in ln for ln in lines[first:last]):
        return  # not one contiguous block, or commented: leave it
    merged: dict[str, list[str]] = {}
    for s in group:
        merged.setdefault(s.module, [])
        merged[s.module] += [t for t in (_alias_text(a) for a in s.names) if t not in merged[s.module]]
    block = "".join(_import_line("", m, names) + "\n" for m, names in sorted(merged.items()))
    if block != "".join(lines[first:last]):
        lines[first:last] = [block]
        path.write_text("".join(lines))


def _tidy(text: str) -> str:
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.rstrip("\n") + "\n"


def _insert_import(text: str, line: str) -> str:
    tree = ast.parse(text)
    imports = [s for s in tree.body if isinstance(s, (ast.Import, ast.ImportFrom))]
    ours = [s for s in imports if (getattr(s, "module", None) or "").startswith("vlmscale")
            or any(a.name.startswith("vlmscale") for a in s.names if isinstance(s, ast.Import))]
    anchor = (ours or imports)[-1] if imports else None
    lines = text.splitlines(keepends=True)
    at = anchor.end_lineno if anchor else 0
    lines.insert(at, ("" if ours else "\n") + line + "\n")
    return "".join(lines)


def extract(src_mod: str, dst_mod: str, names: list[str]) -> bool:
    src_path, dst_path = module_path(src_mod), module_path(dst_mod)
    if not src_path.exists():
        return False
    src = src_path.read_text()
    tree = ast.parse(src)
    lines = src.splitlines(keepends=True)
    wanted = set(names)
    moved = [s for s in tree.body if _defined(s) and _defined(s) <= wanted]
    partial = [s for s in tree.body if _defined(s) & wanted and not _defined(s) <= wanted]
    if partial:
        sys.exit(f"{src_mod}: line {partial[0].lineno} defines {sorted(_defined(partial[0]))}, only part of which moves")
    if not moved:
        return False
    staying = [s for s in tree.body if s not in moved]
    imports = [s for s in staying if isinstance(s, (ast.Import, ast.ImportFrom))]
    stay_defs = set().union(*(_defined(s) for s in staying if s not in imports)) if staying else set()
    needs = _used(moved) & stay_defs
    shared = {n for n in needs if n == "log"}  # the module logger is re-created, not imported
    if needs - shared:
        sys.exit(f"{dst_mod} would need {sorted(needs - shared)} from {src_mod}: add them to the split")
    moved_names = set().union(*(_defined(s) for s in moved))

    body = ""
    for i, s in enumerate(moved):
        body += "".join(lines[_start(s, lines):s.end_lineno])
        nxt = moved[i + 1] if i + 1 < len(moved) else None
        plain = not isinstance(s, _BLOCKS) and nxt is not None and not isinstance(nxt, _BLOCKS)
        body += "" if plain else "\n\n"
    real = [s for s in imports if not (isinstance(s, ast.ImportFrom) and s.module == "__future__")]
    import_text = "".join(lines[real[0].lineno - 1:real[-1].end_lineno]) if real else ""  # groups, blank lines
    if dst_path.exists():
        dst = dst_path.read_text().rstrip("\n") + "\n\n\n" + body
        dst = _insert_import(dst, import_text.rstrip("\n")) if import_text else dst
    else:
        doc = NEW_MODULE_DOCS.get(dst_mod, f"Moved from {src_mod}.")
        close = '\n"""' if "\n" in doc else '"""'
        dst = f'"""{doc}{close}\n\nfrom __future__ import annotations\n\n{import_text}\n'
        if shared:
            dst += 'log = logging.getLogger(__name__)\n'
        dst += "\n\n" + body
    dst_path.write_text(_tidy(dst))
    prune_imports(dst_path)

    keep_lines = list(lines)
    for s in sorted(moved, key=lambda s: s.lineno, reverse=True):
        del keep_lines[_start(s, lines):s.end_lineno]
    rest = "".join(keep_lines)
    still_used = sorted(moved_names & _used([s for s in ast.parse(rest).body]), key=names.index)
    if still_used:
        rest = _insert_import(rest, _import_line("", dst_mod, still_used))
    src_path.write_text(_tidy(rest))
    prune_imports(src_path)
    subprocess.run(["git", "add", str(dst_path.relative_to(ROOT))], cwd=ROOT, check=True)
    print(f"split {sorted(moved_names)} from {src_mod} into {dst_mod}")
    return True


def rewrite_symbol_imports(path: Path, src_mod: str, dst_mod: str, names: set[str]) -> bool:
    """``from src import a, MOVED`` -> ``from src import a`` + ``from dst import MOVED`` (at any depth);
    ``"src.MOVED"`` strings -> ``"dst.MOVED"``."""
    text = path.read_text()
    new_text = text
    for name in names:
        new_text = _boundary(f"{src_mod}.{name}").sub(f"{dst_mod}.{name}", new_text)
    if path.suffix == ".py" and path != module_path(dst_mod):
        try:
            tree = ast.parse(new_text)
        except SyntaxError:
            tree = None
        if tree is not None:
            lines = new_text.splitlines(keepends=True)
            nodes = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == src_mod
                     and any(a.name in names for a in n.names)]
            for n in sorted(nodes, key=lambda n: n.lineno, reverse=True):
                indent = re.match(r"\s*", lines[n.lineno - 1]).group(0)
                stay = [_alias_text(a) for a in n.names if a.name not in names]
                move = [_alias_text(a) for a in n.names if a.name in names]
                new = ([_import_line(indent, src_mod, stay)] if stay else []) + [_import_line(indent, dst_mod, move)]
                lines[n.lineno - 1:n.end_lineno] = [line + "\n" for line in new]
            new_text = "".join(lines)
    if new_text != text:
        path.write_text(new_text)
        return True
    return False


def apply_renames() -> set[Path]:
    touched = set()
    for mod, renames in RENAMES.items():
        users = [p for p in text_files() if p.suffix == ".py" and mod in p.read_text()] + [module_path(mod)]
        for old, new in renames.items():
            for p in users:
                t = p.read_text()
                t2 = re.sub(rf"(?<!\w){re.escape(old)}\b", new, t)
                if t2 != t:
                    p.write_text(t2)
                    touched.add(p)
    return touched


def do_split() -> None:
    touched: set[Path] = set()
    split_modules = set()
    for src_mod, dst_mod, names in SPLITS:
        extract(src_mod, dst_mod, names)
        split_modules |= {module_path(src_mod), module_path(dst_mod)}
        for p in text_files():
            if rewrite_symbol_imports(p, src_mod, dst_mod, set(names)):
                touched.add(p)
                print(f"rewrote imports of {dst_mod} in {p.relative_to(ROOT)}")
    touched |= apply_renames()
    for p in sorted(split_modules | touched):
        if not p.exists() or p.suffix != ".py":
            continue
        if p in split_modules:
            prune_imports(p)  # a module that lost definitions may no longer need some imports
        else:
            tidy_vlmscale_imports(p)  # elsewhere only merge the import lines the rewrite split


# ---------------------------------------------------------------- check


def do_check() -> int:
    patterns = [_boundary(o) for o in MODULES] + [_boundary(_dotted(p)) for p in OLD_PACKAGES] + [
        re.compile(r"(?<![\w/])" + re.escape(o) + r"(?![\w.])") for o in OLD_PACKAGES + list(MOVES)]
    left = 0
    for p in text_files():
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if any(pat.search(line) for pat in patterns):
                print(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
                left += 1
    print(f"{left} line(s) still name an old module or path" if left else "no old module names or paths left")
    return 1 if left else 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--moves", action="store_true", help="git mv modules (commit afterwards)")
    g.add_argument("--rewrite", action="store_true", help="rewrite module names and paths in every text file")
    g.add_argument("--split", action="store_true", help="move definitions between modules, fix their imports")
    g.add_argument("--check", action="store_true", help="list old names that survived")
    args = ap.parse_args(argv)
    if args.moves:
        do_moves()
    elif args.rewrite:
        do_rewrite()
    elif args.split:
        do_split()
    else:
        return do_check()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
