"""The per-hypervisor metadata server: what a droplet sees of the cloud's maintenance."""
