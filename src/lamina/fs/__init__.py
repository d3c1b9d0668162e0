"""Filesystem mechanisms: safe paths inside a root, mounts, quotas, locks, copies."""
