"""The runtime formats run on the edge box: importing them must not need torch."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "mlxtend", "sympy"):
            raise ImportError("not installed on an edge box: " + name)
sys.meta_path.insert(0, NoTorch())
import toco_core.compression.matmul_nbits, toco_core.compression.qdq_int8, toco_core.compression.structured
print("ok")
"""


def test_formats_import_without_torch():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
