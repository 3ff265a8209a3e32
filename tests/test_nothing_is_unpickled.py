"""Nothing minilora reads is unpickled: no reader in the package can unpickle (a scan of its source),
and a checkpoint in the old torch.distributed.checkpoint format, whose dcp/.metadata is a pickle,
is refused with one sentence before anything in it is opened (a crafted .metadata runs no code).
"""

import ast
import io
import os
import pickle
import subprocess
import sys
import tokenize

import pytest

from minilora.cli import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("minilora", "models", "kernels", "train.py", "eval.py")
# modules and names whose whole purpose is unpickling (or that unpickle what they read)
PICKLERS = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve"}
NAMES = PICKLERS | {"Unpickler", "read_pickle", "FileSystemReader"}
DCP = "torch.distributed.checkpoint"  # its default reader unpickles .metadata
DCP_ALLOWED = (f"{DCP}.state_dict",)  # state-dict helpers: read no files


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str:
    """`np.load` -> "numpy.load" (through this file's imports); "" for anything but a name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def _keyword(call: ast.Call, name: str):
    kw = next((k for k in call.keywords if k.arg == name), None)
    return None if kw is None else (kw.value.value if isinstance(kw.value, ast.Constant) else "not a constant")


def _is_dcp(name: str) -> bool:
    return (name == DCP or name.startswith(DCP + ".")) and not name.startswith(DCP_ALLOWED)


def unpickling(source: str) -> list[str]:
    """Every way `source` can unpickle: identifiers (never comments or docstrings) naming a pickler,
    imports of one or of torch.distributed.checkpoint, torch.load without weights_only=True,
    numpy.load with allow_pickle other than False."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.string in NAMES:
            found.append(f"line {tok.start[0]}: {tok.string}")
        if tok.type == tokenize.STRING and tok.string.strip("'\"") in PICKLERS:  # import_module("pickle")
            found.append(f"line {tok.start[0]}: {tok.string}")
    tree = ast.parse(source)
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if _is_dcp(a.name):
                    found.append(f"line {node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                if _is_dcp(node.module) or _is_dcp(f"{node.module}.{a.name}"):
                    found.append(f"line {node.lineno}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_dcp(_dotted(node, aliases)):
            found.append(f"line {node.lineno}: {_dotted(node, aliases)}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        if name in ("torch.load", "torch.serialization.load") and _keyword(node, "weights_only") is not True:
            found.append(f"line {node.lineno}: {name} without weights_only=True")
        if name == "numpy.load" and _keyword(node, "allow_pickle") not in (None, False):
            found.append(f"line {node.lineno}: numpy.load(allow_pickle=...)")
    return found


UNPICKLING = [
    "import pickle\n",
    "import pickle as p\np.load(f)\n",
    "from pickle import loads\n",
    "import cloudpickle\n",
    "import dill\n",
    "from joblib import load\n",
    "import shelve\n",
    "import importlib\nimportlib.import_module('pickle')\n",
    "import torch\ntorch.load(f)\n",
    "import torch\ntorch.load(f, weights_only=False)\n",
    "from torch import load\nload(f)\n",
    "import numpy as np\nnp.load(f, allow_pickle=True)\n",
    "import torch.distributed.checkpoint as dcp\n",
    "from torch.distributed.checkpoint import FileSystemReader\n",
    "from torch.distributed import checkpoint\n",
    "import torch\ntorch.distributed.checkpoint.load(sd, checkpoint_id=p)\n",
]
SAFE = '''"""Checkpoints without pickle: safetensors and JSON."""
import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict

x = torch.load(f, weights_only=True)  # never a pickle of our own
y = np.load(f)
z = np.load(f, allow_pickle=False)
'''


def test_no_reader_in_the_package_can_unpickle():
    """The scan flags each way to unpickle (and not the word in comments and docstrings), then finds
    none in minilora/, models/, kernels/, train.py and eval.py."""
    for snippet in UNPICKLING:
        assert unpickling(snippet), snippet
    assert unpickling(SAFE) == []
    files = []
    for top in SCANNED:
        path = os.path.join(ROOT, top)
        if os.path.isfile(path):
            files.append(path)
        for folder, _, names in os.walk(path):
            files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    assert len(files) > 30
    found = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            hits = unpickling(f.read())
        if hits:
            found[os.path.relpath(path, ROOT)] = hits
    assert not found, found


class _RunsCode:
    """Unpickling this runs `open(marker, "w").write(...)`: what a crafted .metadata could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


def test_old_dcp_checkpoint_is_refused_and_never_unpickled(tmp_path):
    """A run folder whose checkpoint holds dcp/.metadata (the old FSDP format; here a pickle that
    would write a marker file) is refused with one sentence by `train.py --resume` and by the
    checkpoint reader; the marker is never written."""
    from minilora.parallel import sharded_checkpoint as SC

    out, marker = tmp_path / "run", tmp_path / "unpickled"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out", str(out), "--eval-generate", "0"]
    cmd += ["--eval-every", "0", "--threads", "1", "--max-steps", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = out / "checkpoints" / "step_0000001"
    os.remove(ckpt / "optimizer.safetensors")  # as the old FSDP format: dcp/ in its place
    (ckpt / "dcp").mkdir()
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(_RunsCode(str(marker))))
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()}

    p = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and line.endswith("."), line
    assert str(ckpt) in line and "old torch.distributed.checkpoint format" in line and "another --out" in line
    with pytest.raises(UsageError, match="old torch.distributed.checkpoint format"):
        SC.read_state(str(ckpt), None, None)
    assert not marker.exists()
    assert {path: path.stat().st_mtime_ns for path in before} == before  # nothing rewritten
