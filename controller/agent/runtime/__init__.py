"""The machine runtime.

The machine table, per-VM records, supervision, detached processes, events and the serial console.
"""
