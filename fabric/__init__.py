"""The ground floor every ragloom service stands on: server bootstrap, client channels, errors,
settings, TLS, telemetry, metrics, resources and text utilities. It imports no service."""
