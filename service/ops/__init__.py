"""What operators read and do: health probes, metrics, alerts and the admin API."""
