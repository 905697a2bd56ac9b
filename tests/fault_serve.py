"""`dsv2 serve` whose model raises on chosen forward calls: the server of the fault-injection tests.

    python -m tests.fault_serve CALLS serve ARGS...

CALLS: comma-separated 1-based call numbers of the model's forward ("3,8"), or "N-" for call N and every
later one. Everything else is the real `dsv2` command line, run by the real entry point.
"""

from __future__ import annotations

import sys

from dsv2.cli import main
from dsv2.model import Transformer


def _failing(spec: str) -> object:
    from_n = int(spec[:-1]) if spec.endswith("-") else None
    calls = set() if from_n is not None else {int(c) for c in spec.split(",")}
    forward, count = Transformer.hidden_states, [0]

    def hidden_states(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        count[0] += 1
        if count[0] in calls or (from_n is not None and count[0] >= from_n):
            raise RuntimeError(f"injected fault on forward call {count[0]}")
        return forward(self, *args, **kwargs)

    return hidden_states


if __name__ == "__main__":
    Transformer.hidden_states = _failing(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
