"""Opt-in: the reference implementation loads OUR saved checkpoints (fp32, and bf16-cast-then-saved) and computes our
logits within 1e-5. It reads the stored `freqs_cis` as it is, so this checks that we write the exact fp32 table.

    REFERENCE_DIR=/work/reference/recpre REFERENCE_PYTHON=.venv-tf4/bin/python \
        pytest tests/model/test_reference_reads_ours.py

REFERENCE_DIR holds the reference's raven_modeling_minimal.py and raven_config_minimal.py (kept outside this repo);
REFERENCE_PYTHON is an interpreter with the transformers version the reference needs (4.57).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from recurrent_depth import RecurrentDepthConfig, RecurrentDepthForCausalLM

REPO = Path(__file__).resolve().parents[2]
REFERENCE_DIR, REFERENCE_PYTHON = os.environ.get("REFERENCE_DIR"), os.environ.get("REFERENCE_PYTHON")
pytestmark = pytest.mark.skipif(not (REFERENCE_DIR and REFERENCE_PYTHON),
                                reason="set REFERENCE_DIR (the reference's recpre folder) and REFERENCE_PYTHON (an "
                                       "interpreter with transformers 4.57) to run the reference on our checkpoints")

_WORKER = """
import sys, torch
from safetensors.torch import load_file, save_file
sys.path.insert(0, sys.argv[1] + "/benchmarks")
from reference_import import import_reference
raven = import_reference(sys.argv[2])[0]
dtype = getattr(torch, sys.argv[6])
model = raven.RavenForCausalLM.from_pretrained(sys.argv[3], torch_dtype=dtype).eval()
ids = load_file(sys.argv[4])["input_ids"]
with torch.no_grad():
    logits = model(ids, num_steps=4, init_scale=0.0).logits.float()
save_file({"logits": logits.contiguous()}, sys.argv[5])
"""


def _model() -> RecurrentDepthForCausalLM:
    torch.manual_seed(0)
    model = RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug")).eval()
    with torch.no_grad():  # non-trivial norms and qk_bias, as in the fixtures
        for name, p in model.named_parameters():
            if "norm" in name or "qk_bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _reference_logits(tmp_path: Path, ids: torch.Tensor, dtype: str) -> torch.Tensor:
    """The reference's logits (fp32) at num_steps=4, zero initial state, for our checkpoint at tmp_path/ckpt loaded
    in `dtype`."""
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    proc = subprocess.run([REFERENCE_PYTHON, str(worker), str(REPO), REFERENCE_DIR, str(tmp_path / "ckpt"),
                           str(tmp_path / "ids.safetensors"), str(tmp_path / "out.safetensors"), dtype],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(tmp_path / "out.safetensors"))["logits"]


@pytest.mark.parametrize("stored", ["fp32", "bf16-cast"])
def test_reference_computes_our_logits_from_our_checkpoint(tmp_path: Path, stored: str) -> None:
    model = _model()
    if stored == "bf16-cast":
        model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 256, (2, 200))
    reference = _reference_logits(tmp_path, ids, "float32")
    ours = RecurrentDepthForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    with torch.no_grad():
        logits = ours(ids, num_steps=4, init_scale=0.0).logits
    diff = (logits - reference).abs().max().item()
    print(f"{stored}: max |ours - reference| = {diff:.3g}")
    assert diff <= 1e-5


def test_our_bf16_inference_against_the_reference_bf16_inference(tmp_path: Path) -> None:
    """The same bf16 checkpoint run in bf16 by both: our logits are as close to the fp32 network's as the
    reference's bf16 logits are (bf16 rounding differs between the two, so not bit for bit), and close to them."""
    model = _model().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 256, (2, 200))
    reference = _reference_logits(tmp_path, ids, "bfloat16")
    exact = RecurrentDepthForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    ours = RecurrentDepthForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    with torch.no_grad():
        truth = exact(ids, num_steps=4, init_scale=0.0).logits
        logits = ours(ids, num_steps=4, init_scale=0.0).logits.float()
    ours_err, ref_err = (logits - truth).abs().max().item(), (reference - truth).abs().max().item()
    gap = (logits - reference).abs().max().item()
    print(f"bf16: max |ours - fp32| = {ours_err:.3g}, |reference - fp32| = {ref_err:.3g}, |ours - reference| = "
          f"{gap:.3g}")
    assert ours_err <= 1.25 * ref_err
    assert gap <= 2 * ref_err
