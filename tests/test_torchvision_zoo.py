"""Every torchvision classification model goes through prepare -> calibrate -> two
DDQTrainer steps -> finalize -> export -> load, and the loaded artifact computes exactly
what the fake-quantized model computes (the oracle: the model ddq trained, in eval mode).

The check is ``check_model`` of ``benchmarks/supported_models.py``, which also writes
``docs/supported_models.md``; a fast test keeps that table's model list equal to
torchvision's. Models whose check takes more than about 10 s on the 2-core CI machine are
marked ``slow`` (or ``heavy``, over 100M parameters): the default ``pytest`` run leaves
them out (see ``conftest.py``) and CI runs them in a step of their own: two one-thread
pytest processes side by side, ``-m "(slow or heavy) and large"`` (the models over 100M
parameters, 3-10 GB each, one after another) and ``-m "(slow or heavy) and not large"``,
so that two large ones never run at once. The two ``huge`` models (over 600M parameters,
13-19 GB) run in a last step alone: ``pytest -m huge tests/test_torchvision_zoo.py``.

With ``DDQ_ZOO_ROWS=FILE`` set, each check appends its row (JSON) to ``FILE``, which
``python benchmarks/supported_models.py --from-rows FILE ...`` turns into the table.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "supported_models.py"
DOC = ROOT / "docs" / "supported_models.md"


def _load_script():
    spec = importlib.util.spec_from_file_location("supported_models", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["supported_models"] = mod
    spec.loader.exec_module(mod)
    return mod


zoo = _load_script()


# The tier of each model (``zoo.tier``): the default run, CI's zoo step (``-m "slow or
# heavy"``), or huge (CI's last step, alone: memory). A model a future torchvision adds
# is slow until measured. ``large``: over 100M parameters (``zoo.LARGE``), which CI runs
# in a process of their own.
_MARKS = {
    "default": (),
    "slow": (pytest.mark.slow,),
    "heavy": (pytest.mark.heavy,),
    "huge": (pytest.mark.huge,),
}
_LARGE = (pytest.mark.large,)
MODELS = [
    pytest.param(name, marks=_MARKS[zoo.tier(name)] + (_LARGE if name in zoo.LARGE else ()))
    for name in torchvision.models.list_models(module=torchvision.models)
]


@pytest.fixture
def zoo_threads(request):
    """One intra-op thread (many small tensors; CI runs two processes on its 2 cores),
    except for the huge models, which run alone and use every core."""
    saved = torch.get_num_threads()
    if not request.node.get_closest_marker("huge"):
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("name", MODELS)
def test_model_quantizes_exports_and_reloads_bit_exact(name, tmp_path, zoo_threads):
    row = zoo.check_model(name, tmp_path)
    if os.environ.get("DDQ_ZOO_ROWS"):
        with open(os.environ["DDQ_ZOO_ROWS"], "a") as f:
            f.write(json.dumps(row) + "\n")
    assert row["quantized"] > 0
    left = [k for k in row["float_layers"] if k.split(" ")[0] in zoo.QUANTIZABLE_TYPES]
    assert not left, f"{name}: Conv/Linear layers left float: {left}"
    assert row["exact"], f"{name}: loaded artifact differs by {row['max_abs_diff']}"


def test_supported_models_table_lists_exactly_torchvision_models():
    listed = zoo.listed_models(DOC.read_text())
    assert sorted(listed) == sorted(zoo.model_names())
    assert len(listed) == len(set(listed))


def test_models_over_100m_parameters_are_marked_large():
    # CI's memory: two of these at once in its two zoo processes could hold 20 GB.
    rows = zoo._read_rows(ROOT / "benchmarks" / "results" / "supported_models_rows.jsonl")
    assert {r["model"] for r in rows if r["params"] > 100e6} - zoo.HUGE == zoo.LARGE


def test_table_parser_reads_what_table_writes():
    # The staleness test above can only fail if the parser sees the rows it should.
    rows = [
        {"model": "a", "params": 10, "input": 32, "quantized": 3, "float_layers": {},
         "artifact_bytes": 100, "max_abs_diff": 0.0, "exact": True, "seconds": 1.0},
        {"model": "b", "error": "RuntimeError: boom"},
    ]  # fmt: skip
    doc = zoo.table(rows, total=2)
    assert zoo.listed_models(doc) == ["a", "b"]
    assert "**1 of 2 models pass**" in doc


def test_layer_run_only_in_training_costs_no_macs():
    # GoogLeNet's auxiliary heads run only in training: prepare's eval-mode example never
    # reaches them. They must count 0 MACs (nothing at inference), not block the budget.
    import torch
    from torch import nn

    import ddq

    class AuxNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head, self.aux = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            h = self.body(x)
            return (self.head(h), self.aux(h)) if self.training else self.head(h)

    net = ddq.prepare(AuxNet(), example_inputs=torch.zeros(1, 4))
    assert (net.body.macs, net.head.macs, net.aux.macs) == (16, 8, 0)
    cost = ddq.CostModel(net)  # raised "no MAC count" before
    assert sum(lc.macs for lc in cost.layers) == 24
