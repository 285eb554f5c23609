"""lunsync.snapshots: the storage engine (backends, volumes, snapshots, catalog, copy engine, resync)."""
