"""pnc.bench: evaluation and benchmarks, the top layer (imports pnc.zoo, pnc.surgery,
pnc.adapters; nothing imports it but the CLI in :mod:`pnc.bench.cli`).

- :mod:`~pnc.bench.metrics`: Ori / Tar / Avg, MACs, locality similarity;
- :mod:`~pnc.bench.baselines`: the paper's methods on one clone task;
- :mod:`~pnc.bench.paper`, :mod:`~pnc.bench.hetero`, :mod:`~pnc.bench.incremental`,
  :mod:`~pnc.bench.figures`: Tables 1-3 and the figures;
- :mod:`~pnc.bench.ray_backend`: the optional Ray backend (``pnc[ray]``) of the search and
  of the tables' cells;
- :mod:`~pnc.bench.machine`: the CPU model a result file names;
- scripts (``python -m pnc.bench.<name>``): timm coverage, ONNX latency, zoo defaults,
  the M-scale diagnosis, in-process vs Ray wall time (``ray_backend_bench``).
"""
