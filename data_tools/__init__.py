"""Offline tools: synthetic captioned videos, encoding videos to latent shards, inspecting shards."""
