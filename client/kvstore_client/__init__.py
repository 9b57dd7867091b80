"""kvstore thin client."""
