"""The tspace worker: joins a coordinator, leases units, trains, uploads signed checkpoints."""
