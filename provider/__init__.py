"""lunsync.provider: the control plane (VSS-style provider, management API, CLI, metrics, config, daemon)."""
