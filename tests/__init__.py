"""Tests for edge-classify: each module reads like the story of someone using the system."""
