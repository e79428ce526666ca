"""All benchmarks behind ``neurohand bench`` (docs: bench/README.md), and the
report that writes bench/results.json and results.md.  Nothing that
``neurohand run`` imports may import this."""
