"""Benchmarks (`imagenet-ray bench ...`): measurements that the docs quote, rerunnable on any machine."""
