"""Delivering events to webhooks: signing, one attempt over HTTP, the delivery loop."""
