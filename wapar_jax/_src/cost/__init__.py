"""Cost of a traced step: per-equation XLA cost analysis, roofline time, collectives."""
