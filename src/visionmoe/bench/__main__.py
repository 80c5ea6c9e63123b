"""``python -m visionmoe.bench``: the bench as a program (the environment applied first, as the
``visionmoe`` program does)."""

import sys

from visionmoe.cli.environment import apply_environment

from .run import main

try:
    apply_environment()  # allocator, native mode and cache, as `visionmoe` does
    code = main()
except ValueError as e:  # e.g. a mistyped VISIONMOE_MALLOC / VISIONMOE_NATIVE: one line, as the program says it
    print(f"visionmoe bench: error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
raise SystemExit(code)
