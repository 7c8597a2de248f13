"""The benchmarks of tools/benchmark.py: ``harness`` (worker processes, timing, memory, markdown) and
one module per benchmark, each with ``measure(spec)`` (one configuration, in a worker process),
``run(preset, args, device)`` (every configuration of a preset) and ``render(run, cmdline)`` (its
markdown section)."""
