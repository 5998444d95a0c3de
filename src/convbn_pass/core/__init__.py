"""The pass itself: what reads a graph, decides and rewrites it, and registers it.

Data flows one way: graph → ``match`` (candidates, read through the rows of
``forms``) → ``policy`` (a choice per block) → ``rewrite`` (``algebra``'s math)
→ graph, with one ``records.Decision`` per candidate. ``inductor`` registers the
pass with ``torch.compile``; ``compat`` holds what differs between torch
releases. The sources of this subpackage, and only these, key Inductor's cache
(``inductor.hashed_sources``): the tools around the pass live beside it.
"""
