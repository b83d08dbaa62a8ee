"""Protocol buffer sources and the Python modules generated from them.

Regenerate with ``python -m mnist_edge.protos.generate``; ``--check`` reports drift.

This module stays empty on purpose: importing ``protos`` must not load any
generated module. In particular ``protos.inference`` registers the protobuf
package ``inference``, which clashes with tritonclient's own copy, so only
code that serves or speaks the v2 protocol imports it, explicitly.
"""
