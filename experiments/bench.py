"""Inference latency, memory, power and training cost: thin CLI over :mod:`softlm_jax.bench`. Regenerates
BENCHMARKS.md#inference-speed-and-memory (its ``speedup.png`` is ``docs/speedup_bert_base_cpu.png``).

  python experiments/bench.py --model bert-base --batch 8 --seq 128 --out runs/bench/bert-base
  python experiments/bench.py --help       # the same options as python -m softlm_jax.bench
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from softlm_jax import bench  # noqa: E402

if __name__ == "__main__":
  bench.main()
