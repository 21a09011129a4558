"""The guest agent: a daemon inside the droplet that runs its owner's hooks around a maintenance event."""
