"""mlxmoe: one Mixture-of-Experts LLM across the Macs you own.

Data flow (see README): split (checkpoint -> bundles) -> manifest -> runtime
(node: masked MoE, sessions, generation) -> placement -> cluster (discovery,
wire, router, API) -> ui.
"""

__version__ = "0.1.0"
