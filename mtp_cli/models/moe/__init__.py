"""Mixture-of-experts layers: router, routed experts, shared experts, token dispatch."""
