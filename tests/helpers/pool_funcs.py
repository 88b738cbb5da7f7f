"""Checks for WorkerPool tests: run inside worker processes (the tests put this folder on PYTHONPATH)."""

import os
import time


def prepare(key):
    if key == "hang":
        time.sleep(3600)
    return key


def check(parsed, item):
    if item == "hang":
        time.sleep(3600)
    if item == "die":
        os._exit(3)
    if item == "raise":
        raise ZeroDivisionError
    return item == parsed, "same" if item == parsed else "different"


def prepare_logged(key):
    with open(os.environ["R1FLOW_TEST_PREPARE_LOG"], "a") as f:
        f.write(key + "\n")
    return key
