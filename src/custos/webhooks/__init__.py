"""Signed outbound webhooks: subscriptions, a delivery log, and the job that sends them."""
