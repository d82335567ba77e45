"""Planning: trace the step, cost it, search the meshes and shardings, make the Plan."""
