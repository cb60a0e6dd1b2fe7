"""The pipeline machinery: config, atomic IO and manifests, sharded resumable outputs, lock, tracking, loop."""
