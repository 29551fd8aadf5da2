"""Every top-level script stands alone: shared blocks are byte-identical copies, no script imports another, and every
checkpoint is loaded with weights_only=True. A block is marked '# shared: NAME (same in every script)' (identical
wherever it appears) or '# shared: NAME (same in a.py, b.py)' (exactly in the files named, identical in each)."""
import ast
import glob
import os
import re

from conftest import ROOT

SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")))
TRAINERS = ["moco.py", "byol.py", "msf.py", "jigsaw.py", "rotnet.py", "mae.py", "badencoder.py", "compress_defense.py"]
BLOCK = re.compile(r"^# shared: (.+?) \(same in (.+?)\)\n(.*?)^# end shared$", re.S | re.M)


def blocks(script):
    return {name: (scope, body) for name, scope, body in BLOCK.findall(open(os.path.join(ROOT, script)).read())}


def test_block_markers_are_parsed():
    text = "x\n# shared: aug (same in a.py, b.py)\ndef f(): pass\n# end shared\n"
    assert BLOCK.findall(text) == [("aug", "a.py, b.py", "def f(): pass\n")]


def test_shared_blocks_are_identical():
    seen = {}
    for script in SCRIPTS:
        for name, (scope, body) in blocks(script).items():
            seen.setdefault(name, []).append((script, scope, body))
    assert {"file lists", "encoder builder", "checkpoint io", "training utilities"} <= set(seen)
    for name, copies in seen.items():
        first_script, first_scope, first = copies[0]
        for script, scope, body in copies[1:]:
            assert scope == first_scope, f"shared block '{name}': scope differs between {first_script} and {script}"
            assert body == first, f"shared block '{name}' differs between {first_script} and {script}"
        if first_scope != "every script":  # a subset block lives in exactly the files it names
            named = sorted(s.strip() for s in first_scope.split(","))
            assert sorted(s for s, _, _ in copies) == named, f"shared block '{name}' is not in exactly {named}"


def test_trainers_carry_every_block():
    for script in TRAINERS:
        assert {"file lists", "encoder builder", "checkpoint io", "training utilities"} <= set(blocks(script)), script


def test_scripts_stand_alone_and_load_safely():
    modules = {s[:-3] for s in SCRIPTS}
    assert len(SCRIPTS) >= 10
    for script in SCRIPTS:
        tree = ast.parse(open(os.path.join(ROOT, script)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & modules, f"{script} imports a sibling"
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in modules, f"{script} imports a sibling"
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load" and \
                    getattr(node.func.value, "id", "") == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, script
