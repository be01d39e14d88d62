"""Execute each notebook's setup cell and import cell (its first two code cells) in a fresh kernel.

Run with the Python of the environment under test: the kernel is that Python's own ``python3``.
It checks that ``dsm_lite`` is imported from that environment's site-packages (not from the
checkout), and exits non-zero if any cell raises.
"""
import json
import os
import sys
from pathlib import Path

from jupyter_client.manager import start_new_kernel

# the kernel must be this environment's Python, and dsm_lite its installed copy
# and the stored sweep results (package data) must have come with it: chapters 3-5 read them
CHECK = (f"import dsm_lite, sys\nassert sys.prefix == {sys.prefix!r}, sys.prefix\n"
         "assert 'site-packages' in dsm_lite.__file__, 'dsm_lite imported from the checkout'\n"
         "from dsm_lite.store_format import BOOK_STORE, ResultStore\n"
         "assert 'site-packages' in str(BOOK_STORE) and len(ResultStore(BOOK_STORE)) > 0, BOOK_STORE")


def run(kc, code: str) -> list:
    errors = []

    def hook(msg):
        if msg["msg_type"] == "error":
            errors.append(f"{msg['content']['ename']}: {msg['content']['evalue']}")
        elif msg["msg_type"] == "stream":
            sys.stdout.write(msg["content"]["text"])

    reply = kc.execute_interactive(code, timeout=600, output_hook=hook)
    if reply["content"]["status"] != "ok" and not errors:
        errors.append(reply["content"].get("ename", "error"))
    return errors


def main(paths) -> int:
    failed = 0
    for path in map(Path, paths):
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"][:2]
        km, kc = start_new_kernel(kernel_name="python3", cwd=str(path.parent.resolve()))
        try:
            errors = []
            for cell in cells:
                errors += run(kc, "".join(cell["source"]))
            errors += run(kc, CHECK)
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
        print(f"{'ok  ' if not errors else 'FAIL'} {path.name}" + "".join(f"\n     {e}" for e in errors))
        failed += bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
