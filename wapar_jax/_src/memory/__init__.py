"""Per-device memory of a candidate: arguments plus the peak of live temporaries.

`buffers` says which values a compiler keeps and for how long; `liveness` turns them into
live-byte curves per sharding category, from which each mesh's peak is one weighted max.
"""
