"""Every top-level script stands alone: shared blocks are byte-identical copies, no script imports another, and every
checkpoint is loaded with weights_only=True."""
import ast
import os
import re

from conftest import ROOT

SCRIPTS = ["poison.py", "moco.py", "byol.py", "msf.py", "jigsaw.py", "rotnet.py", "mae.py", "badencoder.py",
           "linear_probe.py", "compress_defense.py"]
PRESENT = [s for s in SCRIPTS if os.path.exists(os.path.join(ROOT, s))]
BLOCK = re.compile(r"^# shared: (.+?) \(same in every script\)\n(.*?)^# end shared$", re.S | re.M)


def blocks(script):
    return {name: body for name, body in BLOCK.findall(open(os.path.join(ROOT, script)).read())}


def test_shared_blocks_are_identical():
    seen = {}
    for script in PRESENT:
        for name, body in blocks(script).items():
            seen.setdefault(name, []).append((script, body))
    assert {"file lists", "encoder builder", "checkpoint io", "training utilities"} <= set(seen)
    for name, copies in seen.items():
        first_script, first = copies[0]
        for script, body in copies[1:]:
            assert body == first, f"shared block '{name}' differs between {first_script} and {script}"


def test_trainers_carry_every_block():
    for script in PRESENT:
        if script not in ("poison.py", "linear_probe.py"):
            assert {"file lists", "encoder builder", "checkpoint io", "training utilities"} <= set(blocks(script)), script


def test_scripts_stand_alone_and_load_safely():
    modules = {s[:-3] for s in SCRIPTS}
    for script in PRESENT:
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
