"""The admin API and dashboard under `/admin` (bearer `ADMIN_TOKEN`)."""
