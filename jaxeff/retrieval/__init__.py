"""Retrieval for in-context learning: MSIER's supervised example retriever (`msier`)."""
