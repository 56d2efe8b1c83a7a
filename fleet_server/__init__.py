"""The TOCO fleet server: registry, analysis jobs, signed bundles over MQTT, drift policy,
HTTP API and dashboard. Imports toco_core only; never the agent."""
