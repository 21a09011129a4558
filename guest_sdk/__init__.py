"""Client for the droplet maintenance-event endpoint (DESIGN.md §8, §11)."""
