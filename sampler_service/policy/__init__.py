"""Policies: named, versioned data describing a chain of processors and one selector."""
