"""Benchmarks that ship with the package (``engram bench ...``), so they run wherever engram is installed.

    offload   prefill/decode tokens/s per Engram table tier (device, host, disk, disk+cache, disk-cold)

The scripts under benchmarks/ in the repository measure the library's parts; this package holds the
ones a user runs on their own machine. Research code: the library never imports it.
"""
