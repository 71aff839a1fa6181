"""Forward+backward time and memory of ``DDQQuantizer`` against PyTorch's fake-quantize ops.

Cases, all on the same float32 tensor ``x`` (``requires_grad``), each followed by a
backward pass with the same random upstream gradient:

- ``fake_quantize``: ``torch.fake_quantize_per_tensor_affine`` (8 bit, the fused op, the
  reference of every ratio), with the scale and zero point of the uniform DDQ case;
- ``fake_quantize_learnable``: ``torch._fake_quantize_learnable_per_tensor_affine``, scale
  and zero point tensors requiring grad (LSQ-style);
- ``ddq_{uniform,adaptive}_{8,4}bit``: ``DDQQuantizer(max_bits=8)`` in training mode with
  all 8 gates open, or with 4 open (trainable) gates. The adaptive levels are perturbed
  after initialisation so that they are genuinely non-uniform, as after training.

Time: every repeat runs every case once, in a shuffled order, so that the load of a
shared machine falls on all cases alike; the medians over the repeats (after warm-up)
are reported in ms and as ratios to ``fake_quantize`` at the same size. The default is
one intra-op thread: on a small shared machine, OpenMP threads that wait for a busy core
make multi-threaded timings meaningless (``--threads`` changes it).

Memory, two measures:

- saved for backward (exact, deterministic): the bytes of the tensors that autograd saves
  during the forward (``torch.autograd.graph.saved_tensors_hooks``), split into tensors
  with one entry per element of ``x`` (bytes per element) and the rest (fixed bytes);
  a saved tensor that *is* the input ``x`` is counted apart: it adds nothing as long as
  the caller keeps ``x`` anyway. O(N) memory means equal bytes per element at every size.
- peak RSS (Linux): a fresh process per case and size resets the peak resident set
  (``/proc/self/clear_refs``) after set-up and reports how far one forward+backward
  raises it. This includes the output, ``x.grad`` and all temporaries; it is rounded to
  pages and affected by the allocator, so compare it across sizes (the slope between
  sizes is given too) rather than to the byte.

The minor page faults per iteration are reported as well: on some machines a fresh large
tensor costs more in page faults than the arithmetic on it, so they explain timings.

``--compare-lookup FILE`` adds the DDQ cases once more (suffix ``@alt``) with another
version of ``ddq/quantizer/lookup.py`` (for example the previous commit's), measured in
the same run, for before/after comparisons.

Usage:
    PYTHONPATH=src python benchmarks/bench_quantizer.py
    PYTHONPATH=src python benchmarks/bench_quantizer.py --quick
    git show HEAD~1:src/ddq/quantizer/lookup.py > /tmp/lookup_old.py
    PYTHONPATH=src python benchmarks/bench_quantizer.py --compare-lookup /tmp/lookup_old.py

Writes ``quantizer.json`` and ``quantizer.md`` to ``--out-dir`` and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

try:
    import ddq.quantizer.quantizer as ddq_quantizer_module
except ImportError:  # run from a checkout without PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import ddq.quantizer.quantizer as ddq_quantizer_module

from ddq import DDQQuantizer

BASELINE = "fake_quantize"
CASES: tuple[str, ...] = (
    "fake_quantize",
    "fake_quantize_learnable",
    "ddq_uniform_8bit",
    "ddq_uniform_4bit",
    "ddq_adaptive_8bit",
    "ddq_adaptive_4bit",
)
ALT_SUFFIX = "@alt"
DEFAULT_SIZES = (1 << 20, 1 << 22)
QUICK_SIZES = (4096, 16384)
MAX_BITS = 8
TARGET_RATIO = 4.0  # this bound for uniform mode; the later goal is 1.2
_LOOKUP_NAMES = ("AdaptiveIndexer", "UniformIndexer", "table_lookup")


# --------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One benchmark case bound to its input: ``forward()`` and what to clear between runs."""

    name: str
    x: torch.Tensor
    grad: torch.Tensor
    forward: Callable[[], torch.Tensor]
    params: list[torch.Tensor] = field(default_factory=list)

    def run(self) -> tuple[float, float]:
        """One forward and backward; returns their times in seconds."""
        self.x.grad = None
        for p in self.params:
            p.grad = None
        t0 = time.perf_counter()
        y = self.forward()
        t1 = time.perf_counter()
        y.backward(self.grad)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1


def load_lookup(path: str | Path) -> ModuleType:
    """Import another version of ``ddq/quantizer/lookup.py`` as a stand-alone module."""
    spec = importlib.util.spec_from_file_location("ddq_alt_lookup", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _lookup_swapped(module: ModuleType | None) -> Iterator[None]:
    """Make ``DDQQuantizer.forward`` use ``module``'s lookup for the duration."""
    if module is None:
        yield
        return
    saved = {n: getattr(ddq_quantizer_module, n) for n in _LOOKUP_NAMES}
    try:
        for n in _LOOKUP_NAMES:
            setattr(ddq_quantizer_module, n, getattr(module, n))
        yield
    finally:
        for n, obj in saved.items():
            setattr(ddq_quantizer_module, n, obj)


def _ddq(mode: str, bits: int, x: torch.Tensor, seed: int) -> DDQQuantizer:
    """A training-mode quantizer initialised from ``x`` with ``bits`` open gates."""
    q = DDQQuantizer(max_bits=MAX_BITS, mode=mode)  # type: ignore[arg-type]
    q.init_from(x)
    if mode == "adaptive":  # non-uniform levels, as after training (still sorted)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            q.raw_gaps.add_(0.5 * torch.randn(q.raw_gaps.shape, generator=gen))
    if bits != MAX_BITS:
        q.set_bits(bits, trainable=True)
    return q


def _inputs(numel: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The input ``x`` (requires grad) and the upstream gradient, both N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen).requires_grad_()
    grad = torch.randn(numel, generator=gen)
    return x, grad


def make_case(
    name: str, x: torch.Tensor, grad: torch.Tensor, seed: int, alt: ModuleType | None = None
) -> Case:
    """Build case ``name`` (one of ``CASES``, optionally with the ``@alt`` suffix) on ``x``."""
    base = name.removesuffix(ALT_SUFFIX)
    if base != name and alt is None:
        raise ValueError(f"{name}: no --compare-lookup module given")
    # Scale and zero point of the uniform quantizer's 8-bit grid, for all fused ops.
    scale, zero_point = _ddq("uniform", MAX_BITS, x.detach(), seed).uniform_params()
    qmax = 2**MAX_BITS - 1
    if base == "fake_quantize":
        return Case(
            name,
            x,
            grad,
            lambda: torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, qmax),
        )
    if base == "fake_quantize_learnable":
        s = torch.tensor([scale], requires_grad=True)
        z = torch.tensor([float(zero_point)], requires_grad=True)
        return Case(
            name,
            x,
            grad,
            lambda: torch._fake_quantize_learnable_per_tensor_affine(x, s, z, 0, qmax, 1.0),
            [s, z],
        )
    if base.startswith("ddq_"):
        _, mode, bits = base.split("_")
        q = _ddq(mode, int(bits.removesuffix("bit")), x.detach(), seed)
        module = alt if base != name else None

        def forward() -> torch.Tensor:
            with _lookup_swapped(module):
                return q(x)

        return Case(name, x, grad, forward, list(q.parameters()))
    raise ValueError(f"unknown case {name!r}; expected one of {CASES}")


# --------------------------------------------------------------------------- measures
def time_cases(cases: list[Case], repeats: int, warmup: int, seed: int) -> dict[str, Any]:
    """Interleaved timing: each repeat runs every case once in a shuffled order."""
    rng = random.Random(seed)
    fwd: dict[str, list[float]] = {c.name: [] for c in cases}
    total: dict[str, list[float]] = {c.name: [] for c in cases}
    faults: dict[str, list[int]] = {c.name: [] for c in cases}
    for rep in range(warmup + repeats):
        order = list(cases)
        rng.shuffle(order)
        for case in order:
            minflt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t_fwd, t_bwd = case.run()
            minflt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - minflt
            if rep >= warmup:
                fwd[case.name].append(t_fwd * 1e3)
                total[case.name].append((t_fwd + t_bwd) * 1e3)
                faults[case.name].append(minflt)
    return {
        c.name: {
            "fwd_ms": round(statistics.median(fwd[c.name]), 4),
            "total_ms": round(statistics.median(total[c.name]), 4),
            "total_ms_all": [round(t, 4) for t in total[c.name]],
            "page_faults_per_iter": statistics.median(faults[c.name]),
        }
        for c in cases
    }


def saved_tensor_bytes(case: Case) -> dict[str, Any]:
    """Bytes autograd saves for backward during one forward of ``case`` (exact).

    Unique storages only; split into tensors with ``x.numel()`` entries, other tensors,
    and the input ``x`` itself (which costs nothing extra while the caller holds it).
    """
    numel, x_ptr = case.x.numel(), case.x.data_ptr()
    seen: dict[int, dict[str, Any]] = {}
    held: list[torch.Tensor] = []  # no address is reused while we count by address

    def pack(t: torch.Tensor) -> torch.Tensor:
        held.append(t)
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen[ptr] = {
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "bytes": t.untyped_storage().nbytes(),
                "is_input": ptr == x_ptr,
                "per_element": t.numel() == numel,
            }
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = case.forward()
    del y
    held.clear()
    tensors = list(seen.values())
    own = [t for t in tensors if not t["is_input"]]
    return {
        "per_element_bytes": sum(t["bytes"] for t in own if t["per_element"]) / numel,
        "fixed_bytes": sum(t["bytes"] for t in own if not t["per_element"]),
        "input_alias_bytes": sum(t["bytes"] for t in tensors if t["is_input"]),
        # The size-proportional tensors in full; the small ones (levels, gates) counted.
        "per_element_tensors": [
            {k: t[k] for k in ("dtype", "bytes", "is_input")}
            for t in tensors
            if t["per_element"] or t["is_input"]
        ],
        "n_fixed_tensors": sum(1 for t in own if not t["per_element"]),
    }


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_child(name: str, numel: int, seed: int, threads: int, alt_path: str | None) -> dict:
    """In a fresh process: how much one forward+backward raises the peak RSS (bytes)."""
    torch.set_num_threads(threads)
    alt = load_lookup(alt_path) if alt_path else None
    # Warm up lazily initialised state (autograd engine, caches) on a tiny input first.
    make_case(name, *_inputs(4096, seed), seed, alt).run()
    case = make_case(name, *_inputs(numel, seed), seed, alt)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS ("VmHWM") to the current RSS
    before = _proc_status_kib("VmRSS")
    case.run()
    peak = _proc_status_kib("VmHWM")
    return {"peak_delta_bytes": (peak - before) * 1024}


def rss_in_subprocess(
    name: str, numel: int, seed: int, threads: int, alt_path: str | None = None
) -> dict | None:
    """Run :func:`rss_child` in a fresh interpreter; None where it cannot be measured."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    spec = json.dumps([name, numel, seed, threads, alt_path])
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--rss-child", spec],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        print(f"peak RSS of {name} at {numel}: child failed:\n{proc.stderr}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report
def _fmt_size(numel: int) -> str:
    if numel % (1 << 20) == 0:
        return f"{numel >> 20}M"
    if numel % (1 << 10) == 0:
        return f"{numel >> 10}K"
    return str(numel)


def _saved_txt(saved: dict[str, Any], numel: int) -> str:
    text = f"{saved['per_element_bytes']:g}"
    if saved["input_alias_bytes"]:
        text += f" (+{saved['input_alias_bytes'] / numel:g} input x)"
    return text


def render_markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table with the set-up and how to read it."""
    meta = report["meta"]
    lines = [
        "# DDQQuantizer vs fused fake-quantize: forward+backward on CPU",
        "",
        f"torch {meta['torch']}, {meta['threads']} thread(s), {meta['cpu']} "
        f"({meta['cpu_count']} cores), {meta['date']}; median of {meta['repeats']} "
        f"interleaved repeats after {meta['warmup']} warm-up; load average "
        f"{meta['loadavg_start']} -> {meta['loadavg_end']}.",
        "",
        "Ratio = time / `fake_quantize` time at the same size, same run. Saved = bytes per "
        "element autograd keeps for backward (exact; a saved input `x` is not counted), "
        "fixed saved B = the small saved tensors (levels, gates) independent of the size. "
        "Peak RSS = how far one forward+backward raises the process peak, per element "
        "(fresh process per case; includes output, `x.grad` and temporaries). Page "
        "faults/iter = median minor page faults in one forward+backward (fresh large "
        "tensors fault in page by page; on small VMs that can cost more than the "
        "arithmetic). On a shared machine the ratios move by about +-20% between runs.",
        "",
        "| size | case | fwd ms | fwd+bwd ms | ratio fwd+bwd | ratio fwd | saved B/elem "
        "| fixed saved B | peak RSS B/elem | page faults/iter |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        peak = (r.get("rss") or {}).get("peak_delta_bytes")
        peak_txt = "n/a" if peak is None else f"{peak / r['numel']:.1f}"
        lines.append(
            f"| {_fmt_size(r['numel'])} | {r['case']} | {r['fwd_ms']:.2f} | "
            f"{r['total_ms']:.2f} | {r['ratio_total']:.2f} | {r['ratio_fwd']:.2f} | "
            f"{_saved_txt(r['saved'], r['numel'])} | {r['saved']['fixed_bytes']} | "
            f"{peak_txt} | "
            f"{r['page_faults_per_iter']:g} |"
        )
    slopes = report.get("rss_slope_bytes_per_element") or {}
    if slopes:
        lines += [
            "",
            "Peak RSS slope between the sizes (bytes per element, constant overheads "
            "removed): "
            + ", ".join(f"{k} {v:.1f}" for k, v in slopes.items() if v is not None)
            + ".",
        ]
    lines += ["", "Uniform DDQ (8 bits) vs the fused op, fwd+bwd:"]
    for r in report["results"]:
        if r["case"] == "ddq_uniform_8bit":
            verdict = "within" if r["ratio_total"] <= TARGET_RATIO else "ABOVE"
            lines.append(
                f"- {_fmt_size(r['numel'])}: {r['ratio_total']:.2f}x ({verdict} the "
                f"{TARGET_RATIO:g}x target; later goal 1.2x)"
            )
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", help="element counts (default 1M 4M)")
    p.add_argument("--repeats", type=int, help="timed repeats per case (default 21)")
    p.add_argument("--warmup", type=int, help="untimed repeats first (default 3)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats, no RSS")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument(
        "--rss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure peak RSS in fresh processes (default: on, off with --quick)",
    )
    p.add_argument("--compare-lookup", type=Path, help="another lookup.py to run as @alt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = args.sizes or list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    args.repeats = args.repeats or (2 if args.quick else 21)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.rss = (not args.quick) if args.rss is None else args.rss
    if BASELINE not in args.cases:
        args.cases.insert(0, BASELINE)
    if len(set(args.sizes)) < 2:
        p.error("give at least two different --sizes (the O(N) memory check compares them)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write ``quantizer.json`` and ``quantizer.md``, print the table."""
    args = parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(*json.loads(args.rss_child))))
        return {}
    torch.set_num_threads(args.threads)
    alt = load_lookup(args.compare_lookup) if args.compare_lookup else None
    names = list(args.cases)
    if alt is not None:
        names += [c + ALT_SUFFIX for c in args.cases if c.startswith("ddq_")]
    alt_path = str(args.compare_lookup.resolve()) if args.compare_lookup else None
    load_start = os.getloadavg()
    results: list[dict[str, Any]] = []
    for numel in args.sizes:
        x, grad = _inputs(numel, args.seed)
        cases = [make_case(n, x, grad, args.seed, alt) for n in names]
        timing = time_cases(cases, args.repeats, args.warmup, args.seed)
        base = timing[BASELINE]
        for case in cases:
            t = timing[case.name]
            results.append(
                {
                    "case": case.name,
                    "numel": numel,
                    **t,
                    "ratio_total": round(t["total_ms"] / base["total_ms"], 4),
                    "ratio_fwd": round(t["fwd_ms"] / base["fwd_ms"], 4),
                    "saved": saved_tensor_bytes(case),
                    "rss": (
                        rss_in_subprocess(case.name, numel, args.seed, args.threads, alt_path)
                        if args.rss
                        else None
                    ),
                }
            )
        del cases, x, grad
    slopes: dict[str, float | None] = {}
    if args.rss:
        lo, hi = min(args.sizes), max(args.sizes)
        by_key = {(r["case"], r["numel"]): r["rss"] for r in results}
        for name in names:
            a, b = by_key.get((name, lo)), by_key.get((name, hi))
            slopes[name] = (
                (b["peak_delta_bytes"] - a["peak_delta_bytes"]) / (hi - lo) if a and b else None
            )
    report = {
        "meta": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "sizes": args.sizes,
            "max_bits": MAX_BITS,
            "baseline": BASELINE,
            "target_ratio_uniform": TARGET_RATIO,
            "compare_lookup": alt_path,
            "loadavg_start": [round(v, 2) for v in load_start],
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(
                ["PYTHONPATH=src python benchmarks/bench_quantizer.py"]
                + (argv if argv is not None else sys.argv[1:])
            ),
        },
        "results": results,
        "rss_slope_bytes_per_element": slopes,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "quantizer.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = render_markdown(report)
    (args.out_dir / "quantizer.md").write_text(markdown)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
