"""Smoke tests of the experiment scripts."""
