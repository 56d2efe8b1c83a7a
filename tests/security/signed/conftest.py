"""The security suite's fixtures: the agent end-to-end parts (mosquitto, signed LeNet-5 bundles, the
bundle publisher, real agent processes), reused from tests/agent_e2e/conftest.py."""

from tests.agent_e2e.conftest import analysis_dirs, bundles, fleet, keys  # noqa: F401  (pytest fixtures)
