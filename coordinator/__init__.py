"""The tspace coordinator: hands out units and shards, verifies and registers checkpoints."""
