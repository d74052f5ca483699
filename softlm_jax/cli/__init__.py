"""``softlm``: compress, train, export, evaluate, benchmark and generate from the command line.

  softlm train    --task sst2 --out runs/sst2                  # dense vs static SVD vs SoftLM at CR 0.5
  softlm train    --task wikitext --model smollm2 --methods softlm,static --cr 0.5 --out runs/smollm2
  softlm eval     runs/sst2/softlm/compact.safetensors         # GLUE metric (or perplexity) of a compact model
  softlm bench    runs/sst2/softlm/compact.safetensors         # latency: dense vs compact
  softlm compress --task wikitext --model smollm2 --method static --out runs/smollm2
  softlm generate runs/smollm2/static/compact.safetensors --prompt "The capital of France is"
  softlm export   runs/sst2/softlm                             # training checkpoint -> compact checkpoint

Each command prints its progress, writes JSON and Markdown next to its output and ends with a
summary. ``softlm <command> --help`` lists the options. ``--task`` is a GLUE task, ``wikitext``
(causal LM: perplexity on WikiText-2), or your own CSV/TSV/JSONL (``--train-file`` with
``--text-cols`` and ``--label-col``). Defaults come from a named preset (``--preset``;
:mod:`softlm_jax.presets`).

Each subcommand is one module of this package with ``COMMAND`` (its name), ``ORDER`` (its place in
``--help``), ``add_parser(subparsers)`` and ``run(args)``; the parser finds them by themselves, so a
new subcommand is one new file.
"""
from __future__ import annotations

import argparse
import faulthandler
import importlib
import os
import pkgutil
import signal
from typing import Optional

from softlm_jax import distributed
from softlm_jax.bench.machine import apply_default_cpu_threads, apply_default_xla_flags
from softlm_jax.cli import options
from softlm_jax.interrupt import exit_interrupted
from softlm_jax.run import BudgetMissError, RunStopped, RunWriteError

_NOT_COMMANDS = {"options", "common", "__main__"}


def commands() -> list:
  """The subcommand modules of this package, in ``ORDER``."""
  mods = [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)
          if m.name not in _NOT_COMMANDS]
  return sorted((m for m in mods if hasattr(m, "COMMAND")), key=lambda m: m.ORDER)


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="softlm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="command", required=True, metavar="command")
  for mod in commands():
    p = mod.add_parser(sub)
    p.set_defaults(func=mod.run)
  return ap


def run(argv: Optional[list] = None):
  """Parses ``argv`` and runs the command; returns its result (a dict). User errors (a missing file,
  a bad value, a missed budget) exit with one line naming what is wrong (``SOFTLM_DEBUG=1``: the
  traceback)."""
  apply_default_xla_flags()  # the measured-faster CPU path, before jax starts ($XLA_FLAGS wins)
  apply_default_cpu_threads()  # several CPU devices: a thread pool their collectives cannot starve
  ap = build_parser()
  args = options.parse(ap, argv)
  timeout = getattr(args, "process_timeout", distributed.DEFAULT_TIMEOUT_S)
  try:
    several = distributed.initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                                     getattr(args, "process_id", None), timeout_s=int(timeout),
                                     heartbeat_s=int(min(60, timeout)))
  except ValueError as e:
    ap.error(str(e))
  status = 1
  try:
    result = args.func(args)
    status = 0
    return result
  except RunStopped as e:
    print(f"softlm {args.command}: {e}")
    status = 0
    return {"stopped": str(e)}
  except (FileNotFoundError, ValueError, BudgetMissError, RunWriteError) as e:
    if os.environ.get("SOFTLM_DEBUG"):
      raise
    raise SystemExit(f"softlm {args.command}: error: {e}") from None
  finally:
    if several:  # every process ends with process 0's status (or its own failure)
      final = distributed.finish(status, timeout)
      if final and not status:
        raise SystemExit(f"softlm {args.command}: process 0 ended with status {final}")


def main(argv: Optional[list] = None) -> int:
  """The ``softlm`` entry point: exit status 0 on success, 130 after Ctrl-C (training has saved its
  checkpoint and said where a rerun resumes; the interpreter's slow teardown is skipped). ``kill -USR1``
  prints every thread's Python stack to stderr (a run that seems stuck: where is it?)."""
  if hasattr(signal, "SIGUSR1"):
    faulthandler.register(signal.SIGUSR1, all_threads=True)
  try:
    run(argv)
  except KeyboardInterrupt:
    exit_interrupted(130)
  return 0


if __name__ == "__main__":
  main()
