"""Whole jobs: the run folder of ``ddq quantize`` (``run_quantize``, ``load_run``) and where
it runs (device check, ``torchrun`` process group). Built on ``training``; the CLI calls it."""

from .distributed import check_device, init_distributed
from .run import RunConfig, load_run, run_quantize

__all__ = ["RunConfig", "check_device", "init_distributed", "load_run", "run_quantize"]
