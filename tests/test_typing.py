"""mypy sees the compiled API: the examples and the README's Python snippets type-check
against the package (the compiled core through ``loops_sdk/_scorer/core.pyi``), and a call
with a wrong argument type is an error, which proves the stub is what mypy reads.

One mypy run checks every file (a cold run takes seconds, not one per file).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("mypy")

ROOT = Path(__file__).resolve().parent.parent

# Settings that pass today: errors inside loops_sdk itself are not this test's subject
# (follow_imports=silent still reads every type), and README snippets continue each other
# (``client``, ``x``, ``features``... come from the prose around them), so an undefined name
# there is not an error.
# grpc ships no stubs. The cache lives outside the tree and makes later runs quick.
MYPY_ARGS = ["--follow-imports=silent", "--ignore-missing-imports", "--no-error-summary",
             "--show-error-codes", "--hide-error-context", "--no-color-output",
             "--python-version", "3.10",
             "--cache-dir", str(Path(tempfile.gettempdir()) / "loops-sdk-mypy-cache")]

# Snippets that must fail, each with the error mypy must report.
BAD = {
    # decide's name is a str (core.pyi); a wrong type here only errors when the stub is read.
    "bad_decide_name.py": (
        "import numpy as np\n"
        "from loops_sdk import DecisionClient\n"
        "client = DecisionClient()\n"
        "client.decide(42, np.zeros(3))\n",
        r'Argument 1 to "decide" of "Engine" has incompatible type "int"; expected "str"'),
    "bad_reward_value.py": (
        "from loops_sdk import DecisionClient\n"
        "client = DecisionClient()\n"
        "client.reward('0' * 32, 'twelve')\n",
        r'Argument 2 to "reward" of "Engine" has incompatible type "str"; expected "float"'),
    # decide returns the compiled Decision: a misspelt attribute is caught.
    "bad_decision_attr.py": (
        "import numpy as np\n"
        "from loops_sdk import DecisionClient\n"
        "d = DecisionClient().decide('bonus', np.zeros(3))\n"
        "d.probabilty\n",
        r'"Decision" has no attribute "probabilty"'),
    # decide_batch returns a DecisionBatch (not Any).
    "bad_batch_attr.py": (
        "import numpy as np\n"
        "from loops_sdk import DecisionClient\n"
        "b = DecisionClient().decide_batch('bonus', np.zeros((2, 3)))\n"
        "b.no_such_column\n",
        r'"DecisionBatch" has no attribute "no_such_column"'),
}


def readme_snippets() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def run_mypy(files: list[Path], *extra: str) -> dict[str, list[str]]:
    """mypy's error lines per file name (every file given gets an entry)."""
    proc = subprocess.run([sys.executable, "-m", "mypy", *MYPY_ARGS, *extra,
                           *map(str, files)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr   # 2: mypy itself failed
    errors: dict[str, list[str]] = {f.name: [] for f in files}
    for line in proc.stdout.splitlines():
        m = re.match(r"(.+?\.py):\d+: error: (.*)", line)
        if m:
            errors.setdefault(Path(m.group(1)).name, []).append(m.group(2))
    return errors


@pytest.fixture(scope="module")
def mypy_results(tmp_path_factory) -> dict[str, list[str]]:
    tmp = tmp_path_factory.mktemp("typing")
    snippets = readme_snippets()
    assert len(snippets) >= 3, "the README's ```python blocks were not found"
    files = []
    for i, code in enumerate(snippets):
        f = tmp / f"readme_{i + 1}.py"
        f.write_text(code, encoding="utf-8")
        files.append(f)
    for name, (code, _) in BAD.items():
        f = tmp / name
        f.write_text(code, encoding="utf-8")
        files.append(f)
    examples = sorted((ROOT / "examples").glob("*.py"))
    assert examples
    results = run_mypy(files, "--disable-error-code", "name-defined")
    results.update(run_mypy(examples))
    return results


def test_examples_type_check(mypy_results):
    for f in sorted((ROOT / "examples").glob("*.py")):
        assert mypy_results[f.name] == [], f"{f.name}: {mypy_results[f.name]}"


def test_readme_snippets_type_check(mypy_results):
    bad = {name: errs for name, errs in mypy_results.items()
           if name.startswith("readme_") and errs}
    assert not bad, bad


@pytest.mark.parametrize("name", sorted(BAD))
def test_mypy_sees_the_compiled_api(mypy_results, name):
    """Each wrong call is flagged with the stub's own wording (class, argument, type)."""
    errors = mypy_results[name]
    assert any(re.search(BAD[name][1], e) for e in errors), errors
