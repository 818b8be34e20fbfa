"""Observability: Prometheus metrics, the access log, per-consumer usage and trace context.

Workers count in shared memory and push access records into their rings
(`nexus.telemetry`, `access_log.AccessRecorder`); the master's
`service.ObservabilityService` exports, drains and writes, off the request
path.
"""
