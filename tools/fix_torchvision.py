"""Make a CUDA build of torchvision importable on CPU-only torch (idempotent, only where needed).

PyPI's torchvision wheels are CUDA builds; with a CPU torch their compiled ops fail to load, and
``torchvision/_meta_registrations.py`` then crashes at import on two unconditional
``@torch.library.register_fake("torchvision::nms"/"qnms")`` decorators ("operator torchvision::nms
does not exist"). That breaks ``import timm``. We guard exactly those two decorators with
``torchvision.extension._has_ops()``, the same check the file already uses for its other ops.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

OPS = ("torchvision::nms", "torchvision::qnms")


def _imports_cleanly() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True)
    return probe.returncode == 0


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return 0
    if _imports_cleanly():
        return 0
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    patched = text
    for op in OPS:
        old = f'@torch.library.register_fake("{op}")'
        new = (
            f'@(torch.library.register_fake("{op}") '
            "if torchvision.extension._has_ops() else (lambda f: f))"
        )
        patched = patched.replace(old, new)
    if patched != text:
        path.write_text(patched)
        print(f"fix_torchvision: guarded {', '.join(OPS)} in {path}")
    if not _imports_cleanly():
        print("fix_torchvision: torchvision still fails to import", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
