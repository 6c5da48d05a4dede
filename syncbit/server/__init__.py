"""The control plane (``syncbit server``): datasets, assignments, scheduling, node state."""
