"""`ddq quantize` under torchrun (PyTorch DDP, gloo on CPU, 2 processes)."""

import json
import subprocess
import sys


def test_torchrun_two_processes_meets_budget(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--standalone", "-m", "ddq.cli.main", "quantize", "--model", "small_cnn",
        "--subset", "256", "--epochs", "2", "--fp-epochs", "1", "--first-last", "learn",
        "--no-progress", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report:") == 1  # only rank 0 reports
    totals = json.loads((out / "report.json").read_text())["totals"]
    assert totals["budget_met"] and totals["avg_weight_bits"] <= 4.0
