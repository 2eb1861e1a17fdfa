"""`rdepth train` on a CPU keeps freed activation memory in the process (runtime.tune_cpu_allocator), so a step's
re-allocated activations do not page-fault in again."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from recurrent_depth.runtime import tune_cpu_allocator


def _faults_of(fn) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_reallocated_activations_do_not_fault_again() -> None:
    assert tune_cpu_allocator() is True
    assert tune_cpu_allocator() is True  # idempotent

    def step() -> None:  # 64 activations of 4 MB, written, then all freed (a training step in miniature)
        acts = [torch.ones(2**20) for _ in range(64)]
        del acts

    step()
    pages = 64 * 4 * 2**20 // resource.getpagesize()
    faults = _faults_of(step)
    assert faults < pages // 20, f"{faults} page faults re-allocating {pages} pages"
