"""Pulling studies from archives (issue 19): query a configured source (node.sources), retrieve
the matches at the source's pace, and let them flow through the node like pushed studies.

``query`` (what to pull), ``dimse`` and ``dicomweb`` (the two ways of asking), ``jobs`` (pull jobs
in the store), ``runner`` (the node's thread doing the work), ``command`` (``vesalius pull``).
"""
