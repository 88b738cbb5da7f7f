"""Entry point of a verifier worker: python -m r1flow.rewards._worker_main module:prepare module:check

The protocol (pickled messages) runs on stdin and a duplicate of stdout; stdout itself is pointed at
stderr so that stray prints from libraries cannot corrupt it.
"""

import importlib
import logging
import os
import sys
from multiprocessing.connection import Connection

from r1flow.rewards.workers import serve


def _resolve(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


if __name__ == "__main__":
    proto_out = os.dup(1)
    os.dup2(2, 1)
    # The pool enforces the time limit; Math-Verify's warning that its own timeout is off is noise here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    serve(Connection(0), Connection(proto_out), _resolve(sys.argv[1]), _resolve(sys.argv[2]))
