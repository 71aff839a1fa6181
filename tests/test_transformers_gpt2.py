"""A Hugging Face GPT-2 (built from a small config: nothing downloaded) quantized by ddq.

Its ``transformers.pytorch_utils.Conv1D`` layers become ``nn.Linear`` through the rewrite
in ``ddq/layers/hf_conv1d.py``; the oracle for the rewrite is the original module. Then
the whole lifecycle: prepare, calibrate, training steps, finalize, export, ``ddq.load``
with a ``model_factory``, and the tied ``lm_head``/``wte`` weight handled as documented
there.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

import ddq  # noqa: E402
from ddq.data.stdlib_text import load_stdlib_text, random_windows  # noqa: E402
from ddq.layers import QuantLinear  # noqa: E402
from ddq.layers.hf_conv1d import is_hf_conv1d, linear_from_conv1d  # noqa: E402
from ddq.layers.rewrite import rewrite_modules  # noqa: E402

Conv1D = transformers.pytorch_utils.Conv1D

# Byte vocabulary; dropout off so that train-mode steps are deterministic.
GPT2_KWARGS = dict(
    vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
    embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
)  # fmt: skip
SEQ = 32


def _gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_KWARGS))


def _factory(arch):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**arch["kwargs"]))


def _conv1d_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is Conv1D]


@pytest.fixture(scope="module")
def text():
    return load_stdlib_text(["textwrap.py", "heapq.py"], ["bisect.py"])


def test_the_rewrite_computes_conv1d(one_thread):
    conv = Conv1D(nf=6, nx=4)
    with torch.no_grad():
        conv.bias.normal_()
    assert is_hf_conv1d(conv) and not is_hf_conv1d(nn.Linear(4, 6))
    assert not is_hf_conv1d(type("Conv1D", (Conv1D,), {"__module__": "mine"})(6, 4))
    linear = linear_from_conv1d(conv)
    assert type(linear) is nn.Linear and linear.weight.shape == (6, 4)
    assert torch.equal(linear.weight, conv.weight.t()) and torch.equal(linear.bias, conv.bias)
    assert linear.weight.data_ptr() != conv.weight.data_ptr()  # a copy, not a view
    x = torch.randn(3, 5, 4)
    torch.testing.assert_close(linear(x), conv(x), rtol=1e-6, atol=1e-6)


def test_gpt2_rewritten_is_the_same_float_model(one_thread):
    original = _gpt2().eval()
    rewritten = copy.deepcopy(original)
    names = _conv1d_names(original)
    assert len(names) == 4 * GPT2_KWARGS["n_layer"]
    assert sorted(rewrite_modules(rewritten)) == sorted(names)
    assert not _conv1d_names(rewritten)
    assert all(type(rewritten.get_submodule(n)) is nn.Linear for n in names)
    x = torch.randint(0, 256, (3, SEQ))
    torch.testing.assert_close(rewritten(x).logits, original(x).logits, rtol=1e-5, atol=1e-5)


def _loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())


def test_gpt2_through_the_lifecycle_export_and_load(tmp_path, text, one_thread):
    model = _gpt2()
    g = torch.Generator().manual_seed(0)
    batches = [random_windows(text.train, SEQ, 8, g) for _ in range(12)]
    conv_names = _conv1d_names(model)
    ddq.prepare(model, ddq.DDQConfig(), example_inputs=batches[0][0][:1])

    # Every Conv1D became a quantized Linear, listed as such by ddq.summary.
    rows = {r["name"]: r for r in ddq.summary(model)}
    for n in conv_names:
        assert isinstance(model.get_submodule(n), QuantLinear), n
        assert rows[n]["mode"] == "adaptive" and rows[n]["w_bits"] <= 8, rows[n]
    assert set(model.ddq_state.quantized) == {*conv_names, "lm_head"}
    # The tied head: quantized (last layer, 8 bits), still sharing the float embedding's
    # parameter, which the embedding lookup reads unquantized.
    assert model.lm_head.weight is model.transformer.wte.weight
    assert rows["lm_head"]["w_bits"] == 8

    # The first/last layers (h.0's c_attn and the head) are a third of the weights at 8
    # bits: 5 bits on average asks the rest to go down to 3.5.
    budget = ddq.Budget(avg_weight_bits=5, max_act_bits=8)
    cfg = ddq.TrainConfig(epochs=2, freeze_epochs=1, lr=0.05, calib_batches=2, fit_batches=2,
                          progress=False)  # fmt: skip
    trainer = ddq.DDQTrainer(model, budget, cfg, steps_per_epoch=4)
    assert trainer.calibrate(batches) > 0
    opt = trainer.optimizer()
    first = _loss(model, batches[-1]).item()
    for epoch in range(cfg.epochs):
        if trainer.should_finalize:
            trainer.finalize(batches, _loss)
        model.train()
        for batch in batches[epoch * 4 : epoch * 4 + 4]:
            loss = trainer.loss(_loss(model, batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
            trainer.step()
    trainer.finalize(batches, _loss)
    assert trainer.fitted and trainer.usage() <= 1 + 1e-9
    assert ddq.CostModel(model).avg_weight_bits() <= 5 + 1e-9
    assert min(r["w_bits"] for n, r in {r["name"]: r for r in ddq.summary(model)}.items()
               if n in conv_names) < 8  # fmt: skip
    model.eval()
    with torch.no_grad():
        assert _loss(model, batches[-1]).item() < first
    assert model.lm_head.weight is model.transformer.wte.weight  # training kept the tie

    path = tmp_path / "gpt2.ddq.safetensors"
    ddq.export(model, path, arch={"name": "gpt2-tiny", "kwargs": GPT2_KWARGS})
    runtime = ddq.load(path, model_factory=_factory)
    manifest = runtime.ddq_manifest
    assert set(manifest.layers) == {*conv_names, "lm_head"}
    # The float table is stored once, for the embedding; the head as packed indices.
    assert "transformer.wte.weight" in manifest.float_tensors
    assert not any(k.startswith("lm_head.") for k in manifest.float_tensors)
    assert torch.equal(runtime.transformer.wte.weight, model.transformer.wte.weight)
    x = torch.cat([batches[-1][0], batches[-2][0]])
    with torch.no_grad():
        expected = model(x).logits
        got = runtime(x).logits
    assert torch.equal(got, expected), (got - expected).abs().max()
