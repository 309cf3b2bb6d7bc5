"""`make bench`: the benchmark harness (not part of the installed package); see bench/README.md."""
