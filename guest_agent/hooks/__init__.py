"""Hook kinds the agent can run: command, webhook, nested_vms, systemd."""
