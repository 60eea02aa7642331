"""The Bitrix24 REST simulator."""
