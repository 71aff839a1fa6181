"""`ddq quantize` under torchrun (PyTorch DDP, gloo on CPU, 2 processes).

Both ranks must end with the same state: the same bits for every quantizer, the same
levels and channel scales, the same weights. A small launcher (written by the test, not
part of the library) runs the CLI and has every rank save its final prepared model.
"""

import json
import subprocess
import sys
import textwrap

import torch

# Runs `ddq quantize` and, on every rank, saves the trained model's state and the bits
# of every quantizer to $DDQ_TEST_STATE_DIR/rank<N>.pt.
LAUNCHER = textwrap.dedent(
    """
    import os
    import sys

    import torch
    import torch.distributed as dist

    from ddq.cli.main import main
    from ddq.layers import quantizers_of
    from ddq.jobs import run as pipeline
    from ddq.training import loop

    _train_ddq, _calibrate = pipeline.train_ddq, loop.calibrate
    calibrated = {}

    def calibrate_and_keep(model, *args, **kwargs):
        # Before DDP wraps the model (and broadcasts rank 0's state): the quantizers'
        # state straight out of calibration, which must already agree across ranks.
        n = _calibrate(model, *args, **kwargs)
        calibrated.update(
            {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if "quantizer" in k}
        )
        return n

    def train_and_save(model, *args, **kwargs):
        result = _train_ddq(model, *args, **kwargs)
        rank = dist.get_rank() if dist.is_initialized() else 0
        state = {
            "calibrated": calibrated,
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "bits": {n: int(q.bits) for n, q in quantizers_of(model).items()},
            "fit_actions": [repr(a) for a in result.fit_actions],
            "test_acc": result.test_acc,
        }
        torch.save(state, os.path.join(os.environ["DDQ_TEST_STATE_DIR"], f"rank{rank}.pt"))
        return result

    loop.calibrate = calibrate_and_keep
    pipeline.train_ddq = train_and_save
    sys.exit(main(sys.argv[1:]))
    """
)


def _differences(a: dict, b: dict) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            out.append(f"{k}: only on one rank")
            continue
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            out.append(f"{k}: shape/dtype {tuple(x.shape)}/{x.dtype} vs {tuple(y.shape)}/{y.dtype}")
        elif not torch.equal(x, y):
            diff = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
            out.append(f"{k}: max abs difference {diff:.3g}")
    return out


def test_torchrun_two_processes_meet_budget_with_identical_state(tmp_path):
    out = tmp_path / "ddp"
    states = tmp_path / "states"
    states.mkdir()
    launcher = tmp_path / "launch_ddq.py"
    launcher.write_text(LAUNCHER)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--standalone", str(launcher), "quantize", "--model", "small_cnn",
        "--subset", "256", "--epochs", "2", "--fp-epochs", "1", "--first-last", "learn",
        "--no-progress", "--out", str(out),
    ]  # fmt: skip
    env = {**__import__("os").environ, "DDQ_TEST_STATE_DIR": str(states), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report:") == 1  # only rank 0 reports
    assert proc.stdout.count("epoch 2/2:") == 1  # per-epoch lines from rank 0 only
    totals = json.loads((out / "report.json").read_text())["totals"]
    assert totals["budget_met"] and totals["avg_weight_bits"] <= 4.0

    r0 = torch.load(states / "rank0.pt", weights_only=True)
    r1 = torch.load(states / "rank1.pt", weights_only=True)
    assert r0["bits"] and r0["bits"] == r1["bits"], (r0["bits"], r1["bits"])
    assert r0["fit_actions"] == r1["fit_actions"]
    sd0, sd1 = r0["state_dict"], r1["state_dict"]
    # The comparison covers weights, levels, channel scales and gates.
    for part in ("raw_gaps", "log_channel_scale", "gate_logits", "running_mean", ".weight"):
        assert any(k.endswith(part) for k in sd0), (part, sorted(sd0))
    diffs = _differences(sd0, sd1)
    assert not diffs, "ranks differ:\n" + "\n".join(diffs)
    # Calibration gathers its statistics over both processes, so the ranges and levels
    # agree before DDP's initial broadcast would hide a difference.
    assert r0["calibrated"] and any(
        k.endswith("input_quantizer.raw_gaps") for k in r0["calibrated"]
    )
    diffs = _differences(r0["calibrated"], r1["calibrated"])
    assert not diffs, "ranks calibrated differently:\n" + "\n".join(diffs)
    assert r0["test_acc"] == r1["test_acc"]
