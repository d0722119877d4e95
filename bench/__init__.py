"""Benchmarks: policyd against postgrey and a do-nothing server, memtable
against raw pymemcache and ``postmap -q -``, and policyd's memory.

Entry point: ``python -m bench.run`` (``./dev bench``); it writes
docs/benchmarks.md.  Nothing here is imported by memtable or policyd.
"""
