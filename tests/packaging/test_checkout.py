"""A checkout runs its own code: bench.ab benches other revisions from worktrees while this
checkout is installed in editable mode, so `mnist_edge.<stage>` must resolve inside the tree
the command runs from, not in the installed one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_worktree_imports_its_own_stage_folders(tmp_path):
    tree = tmp_path / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), "HEAD"], cwd=REPO, check=True, capture_output=True)
    try:
        code = "import mnist_edge.server.app as m, mnist_edge.client as c; print(m.__file__); print(c.__file__)"
        proc = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        for line in proc.stdout.split():
            assert Path(line).resolve().is_relative_to(tree.resolve()), f"{line} is not from the worktree {tree}"
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
