"""`python -m circuits_attribution.prepare_model`: convert the bundled SmolLM2 once (idempotent).

Prints the checkpoint directory. `--force` re-converts.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m circuits_attribution.prepare_model", description=__doc__)
    parser.add_argument("--force", action="store_true", help="re-convert even if the cache exists")
    args = parser.parse_args(argv)

    from circuits_core.errors import CircuitsError, error_line

    from circuits_attribution.models import SMOLLM2_NAME, is_prepared, prepare_smollm2

    already = is_prepared() and not args.force
    started = time.perf_counter()
    try:
        target = prepare_smollm2(force=args.force)
    except CircuitsError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    state = "already prepared" if already else f"prepared in {time.perf_counter() - started:.1f}s"
    print(f"{SMOLLM2_NAME}: {state} at {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
