"""Checks a notebook cannot make about itself: package in sync, clean notebooks, README and RESULTS.md, their commands."""
import json, re, shlex, shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name):
    exe = BIN / name
    return str(exe) if exe.exists() else shutil.which(name)


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    "A copy of the project's tracked sources, to run nbdev's writers in"
    dst = tmp_path_factory.mktemp("proj") / "proj"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    return dst


def _snapshot(root, sub):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / sub).rglob("*")) if p.is_file()
            and "__pycache__" not in p.parts}


def test_package_in_sync_with_notebooks(copy):
    before = _snapshot(copy, "bk_nbdev")
    subprocess.run([_tool("nbdev-export")], cwd=copy, check=True, capture_output=True)
    after = _snapshot(copy, "bk_nbdev")
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"nbdev-export changed {changed}: run nbdev-export and commit bk_nbdev/"


def test_notebooks_clean_and_parameters_tag_kept(copy):
    before = _snapshot(copy, "nbs")
    subprocess.run([_tool("nbdev-clean")], cwd=copy, check=True, capture_output=True)
    after = _snapshot(copy, "nbs")
    changed = sorted(k for k in before if before[k] != after.get(k))
    assert not changed, f"nbdev-clean changed {changed}: run nbdev-clean and commit nbs/"
    for name, data in after.items():
        if not name.endswith(".ipynb"): continue
        nb = json.loads(data)
        for c in nb["cells"]:
            if c["cell_type"] == "code":
                assert not any(o.get("output_type") == "error" for o in c.get("outputs", [])), name
        srcs = ["".join(c["source"]) for c in nb["cells"]]
        if any(re.search(r"^preset\s*=", s, re.M) for s in srcs):  # a papermill notebook
            tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
            assert len(tagged) == 1, f"{name}: papermill needs exactly one cell tagged 'parameters' after cleaning"


def test_clean_keeps_a_parameters_tag(tmp_path, copy):
    "The configuration itself keeps tags: a tagged cell survives nbdev-clean"
    nb = {"cells": [{"cell_type": "code", "execution_count": 3, "id": "x", "outputs": [],
                     "metadata": {"tags": ["parameters"], "collapsed": True}, "source": ["preset = 'smoke'"]}],
          "metadata": {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    f = copy / "nbs" / "zz_tag_check.ipynb"
    f.write_text(json.dumps(nb))
    try:
        subprocess.run([_tool("nbdev-clean"), "--fname", str(f)], cwd=copy, check=True, capture_output=True)
        cell = json.loads(f.read_text())["cells"][0]
        assert cell["metadata"] == {"tags": ["parameters"]}
        assert cell["execution_count"] is None
    finally:
        f.unlink()


def _readme_block(heading):
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"^## {heading}\n.*?^```sh\n(.*?)^```", text, re.M | re.S)
    assert m, f"README.md has no ```sh block under '## {heading}'"
    return m.group(1).strip()


def test_readme_shows_the_commands_ci_uses():
    install, test = _readme_block("Install"), _readme_block("Test")
    assert "torch==2.13.0" in install and '".[dev]"' in install
    assert "nbdev-test" in test and test.rstrip().endswith("pytest"), "pytest must run last"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_cmd Install" in ci and "readme_cmd Test" in ci and 'eval "$test_cmd"' in ci
    # the run command is near the top, before the test command
    text = (ROOT / "README.md").read_text()
    assert text.index("## Install") < text.index("## Run") < text.index("## Test")
    run = _readme_block("Run")
    assert "bk run transformer baseline full" in run


def test_readme_answers_on_its_first_screen():
    "The answer first, the install command within the first 60 lines, the whole README within 150"
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; the rest belongs in RESULTS.md"
    assert lines.index("## The answer") < lines.index("## Install") < 60
    assert lines.index("pip install torch==2.13.0 && pip install -e \".[dev]\"") < 60


def test_readme_is_the_index_notebook():
    nb = json.loads((ROOT / "nbs" / "index.ipynb").read_text())
    md = "\n\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert md + "\n" == (ROOT / "README.md").read_text(), "README.md differs from nbs/index.ipynb"


def test_settings_ini_is_not_nbdev_config():
    text = (ROOT / "settings.ini").read_text()
    assert text.startswith("# bk_nbdev benchmark presets") and "NOT nbdev's configuration" in text


def _parameters_cell() -> dict:
    "name -> (type, default) from the override lines `name = None  # type, default REPR` of 06's parameters cell"
    nb = json.loads((ROOT / "nbs" / "06_benchmark.ipynb").read_text())
    cell, = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    out = {}
    for line in "".join(cell["source"]).splitlines():
        m = re.match(r"^(\w+)\s*= None\s*# (\w+), default (.*)$", line)
        if m: out[m[1]] = (m[2], m[3])
    return out


def test_parameters_cell_lists_every_config_field_with_its_default():
    from dataclasses import fields
    from bk_nbdev.config import BenchmarkConfig
    want = {f.name: (f.type, repr(f.default)) for f in fields(BenchmarkConfig)}
    assert _parameters_cell() == want


def _sections() -> dict:
    import configparser
    cp = configparser.ConfigParser(); cp.read(ROOT / "settings.ini")
    return {name: dict(cp[name]) for name in cp.sections()}


def test_settings_keys_are_fields_and_every_base_resolves():
    from bk_nbdev.config import BenchmarkConfig, load_preset, preset_names
    from dataclasses import fields
    types = {f.name for f in fields(BenchmarkConfig)}
    for name, keys in _sections().items():
        assert set(keys) <= types | {"base"}, (name, set(keys) - types)
    for name in preset_names(ROOT / "settings.ini"): load_preset(name, ROOT / "settings.ini")


def test_no_block_of_settings_is_written_twice():
    "Two sections share at most one setting (base and model_name aside): a block shared is a base of its own"
    own = {n: {(k, v) for k, v in s.items() if k not in ("base", "model_name")} for n, s in _sections().items()}
    names = sorted(own)
    shared = [(a, b, sorted(own[a] & own[b])) for i, a in enumerate(names) for b in names[i + 1:] if len(own[a] & own[b]) > 1]
    assert not shared, shared


SHOWN_BY = {"print", "print_table", "show", "display"}


def _shows(src: str) -> bool:
    "Whether the cell, outside the functions it defines, prints, displays, or draws with show=True"
    import ast
    try: tree = ast.parse(src)
    except SyntaxError: return False  # IPython magics
    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)): return False
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name in SHOWN_BY or any(k.arg == "show" and getattr(k.value, "value", None) is True for k in node.keywords):
                return True
        return any(visit(c) for c in ast.iter_child_nodes(node))
    return visit(tree)
CHURN = re.compile(r"/tmp/|/work/|/home/|/root/|/Users/| at 0x[0-9a-f]+|\d{4}-\d\d-\d\dT\d\d:\d\d")


def _code_cells(nb_path):
    for c in json.loads(nb_path.read_text())["cells"]:
        src = "".join(c["source"])
        if c["cell_type"] == "code" and not re.match(r"#\|\s*(slow|gpu|notest|export|hide)\b", src):
            yield src, c.get("outputs", [])


def _text(outputs):
    return "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")) for o in outputs)


@pytest.mark.parametrize("nb", sorted((ROOT / "nbs").glob("[0-9]*.ipynb")), ids=lambda p: p.name)
def test_notebooks_committed_with_outputs(nb):
    "A cell that prints a table or shows a figure carries the output of the default run (`nbdev-test --save`)"
    empty = [src.splitlines()[0] for src, outs in _code_cells(nb) if _shows(src) and not outs]
    assert not empty, f"{nb.name}: cells without their output: {empty}; run the README's 'Develop' command"
    churn = [m.group(0) for _, outs in _code_cells(nb) if (m := CHURN.search(_text(outs)))]
    assert not churn, f"{nb.name}: outputs hold machine paths, addresses or timestamps: {churn}"


def test_published_results_hold_no_machine_paths():
    "results/reference names its files by paths inside the checkout: no absolute path, no output folder outside the repository"
    leak = re.compile(r"/tmp/|/work/|/home/|/root/|/Users/|\.\./\.\./")
    found = {str(f.relative_to(ROOT)): m.group(0) for f in (ROOT / "results" / "reference").rglob("*")
             if f.suffix in (".json", ".ipynb", ".csv") and (m := leak.search(f.read_text()))}
    assert not found, f"machine paths in published results (publish with paths relative to the checkout): {found}"


def test_readme_and_results_md_are_rendered_from_the_reference_json():
    "Every number of the README's answer and of RESULTS.md comes from results/reference (bk report)"
    from bk_nbdev.report import answer_section
    from bk_nbdev.results_page import results_markdown
    ref = ROOT / "results" / "reference"
    assert answer_section(ref) in (ROOT / "README.md").read_text(), "README.md's answer differs: run bk report"
    assert results_markdown(ref) == (ROOT / "RESULTS.md").read_text(), "RESULTS.md differs: run bk report"


def test_report_loads_no_training_module():
    "Rendering the results stands on the modules that read them, not on the ones that train"
    code = "import json, sys, bk_nbdev.results_page; print(json.dumps([m for m in sys.modules if m.startswith('bk_nbdev')]))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout))
    assert loaded == {"bk_nbdev", "bk_nbdev.results_page", "bk_nbdev.report", "bk_nbdev.tables", "bk_nbdev.results", "bk_nbdev.curves",
                      "bk_nbdev.runtime"}, loaded


def test_every_committed_results_file_reads_back():
    "The published runs pass the same check as any results file the benchmark reads back"
    from bk_nbdev.benchmark import read_results
    files = sorted((ROOT / "results").rglob("*_results.json"))
    assert len(files) >= 50, len(files)
    for f in files: read_results(f)


SMOKE = {"dataset": "synthetic", "d_model": "32", "n_seq": "32", "batch_size": "8", "epochs": "1",
         "max_train_tokens": "2048", "warmup_steps": "1", "eval_batch_size": "16"}  # the smoke preset's size, one short epoch


def _shown_commands() -> list[tuple[str, str]]:
    "(document, command line) of every `bk` command README.md and RESULTS.md show, in ```sh blocks or inline code"
    out = {}
    for doc in ("README.md", "RESULTS.md"):
        text = (ROOT / doc).read_text()
        for span in re.findall(r"```sh\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text):
            for line in span.splitlines():
                words = shlex.split(line)
                if "bk" in words: out.setdefault(shlex.join(words[words.index("bk"):]), doc)
    return [(doc, cmd) for cmd, doc in out.items()]


def _at_smoke_size(words: list[str], out: Path) -> list[str]:
    "The command's arguments as written, writing to `out` at smoke size; a bare subcommand name only shows its --help"
    if len(words) < 2 or words[1].startswith("-"): return words[1:]
    cmd, args = words[1], words[2:]
    if not args: return [cmd, "--help"]
    if "--output-dir" in args: i = args.index("--output-dir"); args = args[:i] + args[i + 2:]
    if cmd == "scaling": return [cmd, *args, "--output-dir", str(out), "--max-n", "256", "--tokens", "256", "--max-seconds", "5"]
    return [cmd, *args, "--output-dir", str(out), *(x for k, v in SMOKE.items() for x in ("-p", f"{k}={v}"))]


def test_the_documents_show_bk_commands():
    shown = [cmd for _, cmd in _shown_commands()]
    assert "bk run transformer baseline full" in shown and "bk --help" in shown
    assert {c.split()[1] for c in shown if len(c.split()) > 1} >= {"run", "sweep", "seeds", "ablation", "scaling", "report"}


@pytest.mark.parametrize("doc,cmd", _shown_commands())
def test_every_command_shown_runs_at_smoke_size(doc, cmd, tmp_path):
    "Each `bk` command of README.md and RESULTS.md, as written but smoke-sized and writing to a temporary folder"
    argv = [_tool("bk"), *_at_smoke_size(shlex.split(cmd), tmp_path / "out")]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, f"{doc}: {cmd}\n(ran {shlex.join(argv[1:])})\n{r.stderr[-3000:]}"
