"""Storage, encoding and subscription plumbing."""
