"""``python -m guest_agent`` is ``guest-agent``."""

from guest_agent.cli import main

if __name__ == "__main__":
    main()
