"""zmachine-agent: the node agent that provisions and supervises Zmachine VMs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("zmachine-operator")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
