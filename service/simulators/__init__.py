"""The CRM simulators we ship: real HTTP servers that limit and misbehave like the vendors.

Used by the tests, `crm-relay fake-crm` and the no-CRM demo mode; nothing on the delivery path
imports them.
"""
