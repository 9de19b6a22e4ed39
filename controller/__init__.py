"""zmachine-operator: Zero-OS Zmachines on Kubernetes."""

__version__ = "0.1.0"
