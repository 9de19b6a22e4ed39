"""The agent's fixtures (tests/agent/conftest.py), shared with the fault tests."""

from tests.agent.conftest import (  # noqa: F401
    agent_busybox_flist,
    agent_netns,
    agent_pki,
    agent_standin_guest_dir,
)
