"""The pure core of sessionledger: the session aggregate, its events, status rules and errors.

Nothing here does I/O or knows about storage.
"""
