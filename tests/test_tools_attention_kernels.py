"""tools/attention_kernels.py: the attention kernels agree on padded merged batches, and the table shows each."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import load_tool

attention_kernels = load_tool("attention_kernels")


pytestmark = pytest.mark.usefixtures("restore_threads")  # main() sets torch's thread count


def test_kernels_agree_and_the_table_has_a_row_per_length(capsys):
    args = attention_kernels.build_parser().parse_args(
        ["--lengths", "40", "9", "--batch", "3", "--heads", "2", "--head-dim", "8", "--seconds", "0", "--threads", "1"]
    )
    rows = attention_kernels.main(args)
    assert [r.length for r in rows] == [40, 9]
    assert all(r.max_abs_diff < 1e-5 and set(r.ms) == {"sdpa", "flex"} and min(r.ms.values()) > 0 for r in rows)
    table = capsys.readouterr().out.splitlines()
    assert table[-4].startswith("| tokens | sdpa ms | flex ms |")
    assert table[-2].startswith("| 40 |") and table[-1].startswith("| 9 |")


def test_batch_inputs_mask_only_padding_and_add_log_sizes():
    q, k, v, bias = attention_kernels.batch_inputs(6, 50, 2, 4, torch.device("cpu"))
    assert q.shape == (6, 2, 50, 4) and bias.shape == (6, 1, 1, 50)
    real = torch.isfinite(bias[:, 0, 0])
    assert real[0].all() and (real.sum(1) >= 30).all()
    assert torch.equal(real, torch.arange(50) < real.sum(1, keepdim=True))  # padding only at the end
    logs = bias[:, 0, 0][real]
    assert (logs >= 0).all() and (logs > 0).any()  # log(size): sizes 1-4


def test_bad_sizes_are_refused():
    args = attention_kernels.build_parser().parse_args(["--batch", "0"])
    with pytest.raises(ValueError, match="--batch must be positive"):
        attention_kernels.main(args)
