"""Forms in: bodies, normalising, the idempotency window, per-key locks, the group commit and the
spool.
"""
