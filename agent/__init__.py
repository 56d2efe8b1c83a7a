"""The TOCO edge agent: probe, MQTT link, bundle transfer, local recompression, A/B store,
inference API, drift monitor. Imports toco_core only; never torch or the fleet server."""
