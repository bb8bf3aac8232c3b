"""Model implementations; one parameterised decoder serves every supported architecture."""

from radixlm.model.models.decoder import STACKED_WEIGHTS, CausalLM

__all__ = ["CausalLM", "STACKED_WEIGHTS"]
