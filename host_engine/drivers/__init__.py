"""Hypervisor drivers: the mechanism of a migration (the controller is the policy)."""
