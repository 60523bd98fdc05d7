"""Shared contracts of both phases: the released head, checkpoint IO, the cache format, samples."""
