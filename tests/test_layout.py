"""The package imports from an editable install whatever the current folder holds:
a clone named ``convbn_pass`` in it would otherwise shadow the package as an empty
namespace package (``AttributeError: module 'convbn_pass' has no attribute 'options'``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import convbn_pass
from helpers import run_fresh


def test_a_folder_named_like_the_package_does_not_shadow_it(tmp_path: Path) -> None:
    (tmp_path / "convbn_pass").mkdir()  # as a clone of this repository would be
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", "import convbn_pass; print(convbn_pass.__file__, "
         "callable(convbn_pass.options))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [convbn_pass.__file__, "True"], proc.stdout


def test_the_cache_key_hashes_the_core_and_nothing_else() -> None:
    # Editing a tool (the CLI, a reference model) must not invalidate users' cached graphs,
    # and no code that can change a rewrite may escape the key.
    from convbn_pass.core import inductor

    package = Path(convbn_pass.__file__).parent
    hashed = {p.relative_to(package).as_posix() for p in inductor.hashed_sources()}
    assert hashed == {p.relative_to(package).as_posix() for p in (package / "core").glob("*.py")}
    assert "zoo.py" not in hashed and "inspect.py" not in hashed
    # The core imports nothing of the package outside itself, so what it runs is what it hashes.
    for path in (package / "core").glob("*.py"):
        text = path.read_text()
        assert not any(line.lstrip().startswith(("from ..", "import convbn_pass", "from convbn_pass"))
                       for line in text.splitlines()), path.name


def test_tools_are_attributes_of_the_package() -> None:
    """``convbn_pass.backends.light``, as the README writes it, after ``import
    convbn_pass`` alone (a fresh process, so no earlier import helps), and the tool is
    loaded only then."""
    got = run_fresh("""
        import json, sys
        import convbn_pass
        loaded_at_import = "convbn_pass.backends" in sys.modules
        print(json.dumps([loaded_at_import, callable(convbn_pass.backends.light),
                          callable(convbn_pass.zoo.randomize_bn)]))
    """)
    assert got == [False, True, True]
    # Every tool module of the package is one.
    package = Path(convbn_pass.__file__).parent
    assert set(convbn_pass._SUBMODULES) == {p.stem for p in package.glob("*.py")} - {"__init__"}
