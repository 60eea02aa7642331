"""Clients for the CRMs the relay delivers to, and the HTTP plumbing they share."""
