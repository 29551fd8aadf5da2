"""The documentation against the code (no training): every --flag in a code block of README.md and docs/*.md exists in
the parser of the script it is passed to, every file path and link the README names exists, the README's quickstart
methods are quickstart.sh's; and scripts/reproduce.sh without RUNS continues with the runs its ROOT holds."""
import argparse
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess

import pytest

from conftest import ROOT

DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
TRAINERS = ["moco", "byol", "msf", "jigsaw", "rotnet", "mae"]


def read(path):
    return open(os.path.join(ROOT, path), encoding="utf-8").read()


def code_commands(text):
    """The shell commands of the markdown's fenced code blocks: continuation lines joined, comments dropped, split at
    ';', '&&', '||', '|' and 'do'."""
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # a table or prose line inside a block
                continue
            command = []
            for w in words:
                end = w in (";", "&&", "||", "|", "do", "then") or w.endswith(";")
                if w not in (";", "&&", "||", "|", "do", "then"):
                    command.append(w[:-1] if w.endswith(";") else w)
                if end:
                    commands.append(command)
                    command = []
            commands.append(command)
    return [c for c in commands if c]


class Parsed(Exception):
    pass


def flags_of(script, cache={}):
    """Every option string of SCRIPT's argparse parser: the script is imported (scripts are self-contained) and its
    parser caught when it parses."""
    if script not in cache:
        spec = importlib.util.spec_from_file_location("doc_" + os.path.basename(script)[:-3], os.path.join(ROOT, script))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)

        def grab(self, *args, **kwargs):
            raise Parsed(self)

        saved = argparse.ArgumentParser.parse_args
        argparse.ArgumentParser.parse_args = grab
        try:
            (module.parse_args if hasattr(module, "parse_args") else module.main)([])
        except Parsed as e:
            cache[script] = set(e.args[0]._option_string_actions)
        finally:
            argparse.ArgumentParser.parse_args = saved
    return cache[script]


def flag_uses(doc):
    """(script, flag, command) of every --flag in DOC's code blocks: a flag after a .py script belongs to it; flags in
    EXTRA="..." belong to the trainer that quickstart.sh runs (or each of METHODS for reproduce.sh), in POISON_EXTRA to
    poison.py."""
    uses = []
    for command in code_commands(read(doc)):
        env = dict(w.split("=", 1) for w in command if re.fullmatch(r"[A-Z_]+=.*", w))
        script = None
        for i, w in enumerate(command):
            if w.endswith(".py") and not w.startswith("-"):
                script = w
            elif w.startswith("--") and script:
                uses.append((script, w.split("=")[0], " ".join(command)))
            if w.endswith("quickstart.sh") or w.endswith("reproduce.sh"):
                after = command[i + 1] if i + 1 < len(command) else "byol"  # quickstart.sh's default
                methods = (after.split() if w.endswith("quickstart.sh") and after in TRAINERS else
                           env.get("METHODS", " ".join(TRAINERS)).split() or TRAINERS)
                for f in re.findall(r"--[a-z0-9-]+", env.get("EXTRA", "")):
                    uses += [(f"{m}.py", f, " ".join(command)) for m in methods]
                for f in re.findall(r"--[a-z0-9-]+", env.get("POISON_EXTRA", "")):
                    uses.append(("poison.py", f, " ".join(command)))
    return uses


@pytest.mark.parametrize("doc", DOCS)
def test_every_flag_in_a_code_block_exists_in_its_scripts_parser(doc):
    uses = flag_uses(doc)
    assert uses or doc != "README.md"
    missing = []
    for script, flag, command in uses:
        if not os.path.isfile(os.path.join(ROOT, script)):
            missing.append(f"{script} does not exist: {command}")
        elif flag not in flags_of(script):
            missing.append(f"{script} has no {flag}: {command}")
    assert not missing, f"{doc}:\n" + "\n".join(missing)


def test_the_flag_check_reads_commands_as_the_shell_does():
    text = ("```bash\nRUNS=3 EXTRA=\"--epochs 40\" POISON_EXTRA=\"--rate 0.5\" bash scripts/quickstart.sh byol OUT\n"
            "torchrun --nproc_per_node 8 moco.py --train-list L \\\n    --out D; python poison.py --out X  # --no-such\n```\n")
    commands = code_commands(text)
    assert commands[1] == ["torchrun", "--nproc_per_node", "8", "moco.py", "--train-list", "L", "--out", "D"]
    assert commands[2] == ["python", "poison.py", "--out", "X"]
    original = read
    try:
        globals()["read"] = lambda path: text
        got = {(s, f) for s, f, _ in flag_uses("x.md")}
    finally:
        globals()["read"] = original
    assert got == {("byol.py", "--epochs"), ("poison.py", "--rate"), ("moco.py", "--train-list"), ("moco.py", "--out"),
                   ("poison.py", "--out")}  # not torchrun's --nproc_per_node, not the comment's flag
    assert "--no-amp" in flags_of("moco.py") and "--no-such" not in flags_of("moco.py")


def slug(heading):
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_path_and_link_the_readme_names_exists():
    text = read("README.md")
    paths = set(re.findall(r"`((?:\.ci|scripts|docs|tests)/[\w./-]+|[\w-]+\.(?:py|sh))`", text))
    paths |= {w for c in code_commands(text) for w in c if re.fullmatch(r"(scripts/)?[\w-]+\.(py|sh)", w)}
    assert "scripts/quickstart.sh" in paths and "poison.py" in paths
    assert [p for p in sorted(paths) if not os.path.exists(os.path.join(ROOT, p))] == []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", read(doc)):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
            assert os.path.exists(os.path.join(ROOT, path)), f"{doc}: link to {target}: no such file"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", read(path), flags=re.M)
                assert anchor in {slug(h) for h in headings}, f"{doc}: link to {target}: no such heading in {path}"


def test_the_readmes_quickstart_methods_are_quickstart_sh_s():
    case = re.search(r"case \"?\$METHOD\"? in ([\w|]+)\) ;;", read("scripts/quickstart.sh")).group(1).split("|")
    readme = re.search(r"METHOD is one of ((?:`\w+`(?:, )?)+)", read("README.md")).group(1)
    assert re.findall(r"`(\w+)`", readme) == case


def test_no_document_speaks_of_its_making():
    for doc in DOCS:
        text = read(doc)
        for word in (r"\bsession", r"\bissue \d", r"\b20\d\d-\d\d-\d\d\b", r"[Ee]arlier measurement", "DESIGN.md",
                     r"`reference/"):
            assert not re.search(word, text), f"{doc}: {word}"


def test_reproduce_sh_without_runs_continues_with_the_runs_root_holds(tmp_path):
    """No RUNS: as many runs as ROOT/data/run<r> holds (the highest r + 1; a killed poison.py's temporary folder does
    not count), at least 1; RUNS=N as given. Nothing is trained (no METHODS) and PRESET=paper writes no document."""
    def runs(root, **env):
        got = subprocess.run(["bash", os.path.join(ROOT, "scripts", "reproduce.sh"), str(root)], cwd=ROOT,
                             env={**os.environ, "METHODS": " ", "PRESET": "paper", **env}, capture_output=True,
                             text=True, timeout=120)
        assert got.returncode == 0, got.stderr
        return re.findall(r"^reproduce.sh: RUNS=(\d+)", got.stdout, flags=re.M)

    assert runs(tmp_path / "new") == ["1"]
    for r in (0, 1, 2):
        os.makedirs(tmp_path / "old" / "data" / f"run{r}")
        (tmp_path / "old" / "data" / f"run{r}" / "poison.json").write_text(json.dumps({}))
    os.makedirs(tmp_path / "old" / "data" / "run3.tmp-host-1-x")
    assert runs(tmp_path / "old") == ["3"]
    assert runs(tmp_path / "old", RUNS="2") == []  # given: used as is, nothing printed
    assert runs(tmp_path / "old", FIRST="1") == ["2"]  # runs 1 and 2: the test block's FIRST=8 works alike
    bad = subprocess.run(["bash", os.path.join(ROOT, "scripts", "reproduce.sh"), str(tmp_path / "old")], cwd=ROOT,
                         env={**os.environ, "FIRST": "x"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "reproduce.sh: FIRST='x' is not a whole number >= 0"


def doc_tables():
    spec = importlib.util.spec_from_file_location("doc_tables", os.path.join(ROOT, "scripts", "tables.py"))
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    return tables


def fake_test_runs(root, fps):
    """ROOT/test/moco/run<8+i>: clean and backdoored patched FP fps[i] at every probe seed, the control at 1."""
    def metrics(path, fp, encoder="x"):
        os.makedirs(path)
        (path / "metrics.json").write_text(json.dumps(
            {"acc_clean": 60.0, "fp_clean": 3, "acc_patched": 40.0, "fp_patched": fp, "asr": 100 * fp / 350,
             "num_classes": 8, "n_patched_nontarget": 350, "target": 2, "target_name": "rings", "method": "moco",
             "encoder": encoder, "args": {"protocol": "demo"}}))
    for i, (clean_fp, bd_fp) in enumerate(fps):
        run = root / "test" / "moco" / f"run{8 + i}"
        for kind, fp in (("clean", clean_fp), ("poisoned", bd_fp)):
            metrics(run / kind / "probe", fp)
            for k in range(5):
                metrics(run / "probe_seeds" / kind / f"s{k}", fp + k)
        metrics(run / "control" / "probe", 1, str(root / "test" / "moco" / "run9" / "poisoned" / "checkpoint.pt"))
        (run / "poisoned" / "log.jsonl").write_text(json.dumps({"epoch": 20, "seconds": 300.0 * (i + 1),
                                                                 "images_per_s": 90.0}) + "\n")


def test_glance_table_one_row_per_method(tmp_path):
    """The README's results at a glance: the paper's patched FP, k of N test runs shown (the probe-seed rule), the
    median patched FP of both models, one model's train time, and 'no' without a paper-preset root beside ROOT."""
    fake_test_runs(tmp_path / "demo", [(10, 60), (5, 8)])
    lines = doc_tables().glance_table(str(tmp_path / "demo")).splitlines()
    assert lines[2] == "| MoCo v2 (demo preset) | 461.1 vs 22.8 | 1 of 2 | 36 vs 9.5 | 7.5 min | no |"
    assert lines[3] == "| BYOL | 1442.3 vs 15.4 | (no test runs) | | | no |"
    assert "MoCo v2 (demo preset): shown in 1 of 2 test runs" in lines  # the verdict line, for the README's prose
    assert lines[-1] == ("Demo: test runs (8 and up), 8 classes, FP out of 350 non-target val images; Machines (trainers' "
                         "log.jsonl): unknown: 2 runs.")  # the machines of the runs, not of the one that runs tables.py


def test_test_table_reports_test_runs_only(tmp_path):
    """The reported verdicts: test runs only (a dev run beside them is left out), one verdict line per method."""
    fake_test_runs(tmp_path / "demo", [(10, 60), (5, 8)])
    dev = tmp_path / "demo" / "test" / "moco" / "run0"
    shutil.copytree(tmp_path / "demo" / "test" / "moco" / "run8", dev)
    text = doc_tables().test_table(str(tmp_path / "demo"))
    assert "| MoCo v2 (demo preset) | 1 of 2 | 62 10 | 12 7 | 1 1 | 60.0 ± 0.0 / 60.0 ± 0.0 | 7.5 min |" in text
    assert "\nMoCo v2 (demo preset): shown in 1 of 2 test runs\n" in text
    assert "| 8 | test | 2 'rings' | - | 62 (60-64) | 12 (10-14) | 1 (run 9) | 60 | 5 of 5 | shown |" in text
    assert "| 0 |" not in text
    os.makedirs(tmp_path / "demo" / "main")  # reproduce.sh's layout, here the same runs: each folder counted once
    os.symlink(tmp_path / "demo" / "test" / "moco", tmp_path / "demo" / "main" / "moco")
    assert doc_tables().test_table(str(tmp_path / "demo")).count("shown in 1 of 2 test runs") == 1


def test_the_readmes_test_run_verdicts_come_from_a_generated_table():
    """Every 'shown in k of N test runs' of the README is a verdict line of docs/results.md's tables.py output."""
    readme, results = read("README.md"), read("docs/results.md")
    claims = re.findall(r"([A-Z][\w ]*\([^)]+\)): shown in (\d+) of (\d+) test runs", readme)
    assert claims, "the README states no test-run verdict"
    for name, k, n in claims:
        assert f"\n{name}: shown in {k} of {n} test runs\n" in results, (name, k, n)


def test_the_readmes_result_figures_come_from_generated_blocks():
    """Every decimal figure in the README's results prose (outside its tables and generated blocks) stands in a block
    that scripts/tables.py writes (between BEGIN/END markers) in README.md or docs/*.md: no figure typed by hand."""
    readme = read("README.md")
    section = readme[readme.index("## Results at a glance"):readme.index("## Install, run, test")]
    blocks = "\n".join(b for doc in DOCS for b in re.findall(r"<!-- BEGIN \w+ -->\n(.*?)<!-- END \w+ -->", read(doc), re.S))
    prose = "\n".join(line for line in re.sub(r"<!-- BEGIN \w+ -->.*?<!-- END \w+ -->", "", section, flags=re.S).splitlines()
                      if not line.startswith("|"))
    figures = re.findall(r"\d+\.\d+(?: ± \d+\.\d+)?", prose)
    assert figures, "the check reads no figure"
    assert [f for f in figures if f not in blocks] == []
