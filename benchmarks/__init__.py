"""Benchmarks of sessionledger against the raw database floor and plain eventsourcing.

Run from the checkout: ``python -m benchmarks`` (``--quick``, ``--json PATH``,
``--postgres URL``). See benchmarks/__main__.py.
"""
