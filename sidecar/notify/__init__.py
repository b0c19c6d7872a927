"""Owner notifications: the owners file, the outbox and signed webhook delivery."""
