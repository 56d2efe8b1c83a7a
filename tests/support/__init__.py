"""Helpers that tests and benches share: a real mosquitto, free ports, polling, stopping child processes.

Plain modules, no pytest import, so bench/*.py can use them outside a test run.
"""
