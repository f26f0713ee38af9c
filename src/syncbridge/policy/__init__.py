"""Practice policies: cancellation and fees, privacy of calendar text."""
