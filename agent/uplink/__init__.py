"""The platform uplink: reads the outbox, feeds the dispatcher, never touches charging."""
