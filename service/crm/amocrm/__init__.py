"""amoCRM / Kommo: the API client, what it answers, and find-or-create for a batch of people."""
