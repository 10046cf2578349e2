"""tools/attention_kernels.py: both kernels agree on the patch's layouts, and the table says which one runs."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import load_tool

attention_kernels = load_tool("attention_kernels")


pytestmark = pytest.mark.usefixtures("restore_threads")  # main() sets torch's thread count


def test_kernels_agree_and_table_names_the_patch_choice(capsys):
    args = attention_kernels.build_parser().parse_args(
        ["--lengths", "200", "24", "--groups", "3", "--heads", "2", "--head-dim", "8", "--seconds", "0", "--threads", "1"]
    )
    rows = attention_kernels.main(args)
    assert [r.length for r in rows] == [200, 24]
    assert all(r.max_abs_diff < 1e-5 and r.fused_ms > 0 and r.matmul_ms > 0 for r in rows)
    table = capsys.readouterr().out.splitlines()
    assert table[-2].startswith("| 200 |") and table[-2].endswith("| fused |")
    assert table[-1].startswith("| 24 |") and table[-1].endswith("| matmul |")


def test_group_inputs_mask_only_padding():
    qkv, mask = attention_kernels.group_inputs(6, 50, 2, 4)
    assert qkv.shape == (6, 50, 3, 2, 4) and mask.shape == (6, 1, 1, 50)
    real = torch.isfinite(mask[:, 0, 0])
    assert real[0].all() and (real.sum(1) >= 45).all()
    assert torch.equal(real, torch.arange(50) < real.sum(1, keepdim=True))  # padding only at the end


def test_bad_sizes_are_refused():
    args = attention_kernels.build_parser().parse_args(["--groups", "0"])
    with pytest.raises(ValueError, match="--groups must be positive"):
        attention_kernels.main(args)
