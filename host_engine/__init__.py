"""The host engine: inventory, placement, planning with notice, and running live migrations."""
