"""Kubernetes integration: node labels and taints, the pod admission webhook, the controller (docs/kubernetes.md)."""
