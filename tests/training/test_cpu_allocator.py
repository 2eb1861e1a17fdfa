"""`rdepth train` on a CPU keeps freed activation memory in the process (runtime.tune_cpu_allocator), so a step's
re-allocated activations do not page-fault in again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from recurrent_depth.runtime import tune_cpu_allocator

# A training step in miniature, in a fresh process (a heap that earlier tests have not shaped): 64 activations of
# 4 MB written and all freed, once to warm up, then twice measured; prints the page faults of the two measured steps.
# Tuned, the heap's layout can still shift there (1,000-9,000 faults in some runs, then none); plain malloc faults
# nearly every page in both (glibc's dynamic mmap threshold settles it only from about the fourth step on).
_STEP = """
import json, resource, sys, torch
if sys.argv[1] == "tuned":
    from recurrent_depth.runtime import tune_cpu_allocator
    assert tune_cpu_allocator() is True
def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    acts = [torch.ones(2**20) for _ in range(64)]
    del acts
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
step()
print(json.dumps({"faults": step() + step(), "pages": 64 * 4 * 2**20 // resource.getpagesize()}))
"""


def _steady_step(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _STEP, mode], capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["faults"], result["pages"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_reallocated_activations_do_not_fault_again() -> None:
    assert tune_cpu_allocator() is True
    assert tune_cpu_allocator() is True  # idempotent
    tuned, pages = _steady_step("tuned")
    plain, _ = _steady_step("plain")
    assert tuned < pages // 4, f"tuned: {tuned} page faults re-allocating {pages} pages twice"
    assert plain > pages, (f"plain malloc faulted only {plain} times re-allocating {pages} pages twice: "
                           "the test shows nothing here")
