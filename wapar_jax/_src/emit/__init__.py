"""Plan -> mesh, shardings, a jitted sharded train step, sharded initialisation."""
