"""The simulated fleet (real X25519/HKDF/AES-CBC sessions with key-level faults) and wa-sidecar demo."""
