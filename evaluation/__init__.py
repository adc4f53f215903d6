"""regvi evaluation: integration metrics on any embedding stored in an AnnData."""
