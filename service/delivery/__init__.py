"""Delivery to the CRM: the worker, the rate gate, the cluster bucket, the contact guard and the
pause control.
"""
