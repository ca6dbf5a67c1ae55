"""The scheduler and the library entry points built on it."""
