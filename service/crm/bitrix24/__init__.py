"""Bitrix24: the REST client (webhook or OAuth app), what it answers, and find-or-create per batch.
"""
