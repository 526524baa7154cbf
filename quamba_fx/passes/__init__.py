"""Graph passes. Each is a `torch.fx.passes.infra.pass_base.PassBase` (or any callable returning a
`PassResult`) and runs alone or inside a `quamba_fx.Pipeline`."""

from .verify import VerifyTopology, node_graph, verify_topology

__all__ = ["VerifyTopology", "node_graph", "verify_topology"]
