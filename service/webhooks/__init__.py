"""CRM and generic webhooks in, stored first, answered fast; the forwarder relays them after."""
